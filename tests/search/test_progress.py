"""The search's progress line: the remaining time counts the trials left and, when the caller
says so, the epochs the driver trains after them, at the trials' measured time per epoch."""

from __future__ import annotations

import pickle
import re
import time

from autoprune.rayenv import quiet_environment

quiet_environment()

from ray.tune.experiment import Trial  # noqa: E402

from autoprune.search.progress import ProgressLine  # noqa: E402


def _trial(status: str, seconds: float | None = None, epochs: int | None = None, acc: float = 0.9) -> Trial:
    trial = Trial("__fake", stub=True)
    trial.set_status(status)
    if seconds is not None:
        trial.update_last_result({"time_total_s": seconds, "training_iteration": epochs, "val_acc": acc, "final": True})
    return trial


def _line(progress: ProgressLine, trials: list[Trial], elapsed: float) -> str:
    for t in trials:
        if t.status in (Trial.TERMINATED, Trial.ERROR):
            progress.on_trial_complete(0, trials, t)
    progress.t0 = time.time() - elapsed  # as if the search had begun ``elapsed`` seconds ago
    return progress.line(trials)


def _left(line: str) -> str:
    return line.rsplit("elapsed", 1)[1]


def test_without_work_after_the_trials_the_estimate_is_the_trials_alone():
    trials = [_trial(Trial.TERMINATED, 30.0, 3), _trial(Trial.TERMINATED, 50.0, 3), _trial(Trial.RUNNING)]
    line = _line(ProgressLine(4, enabled=False), trials, elapsed=60.0)
    assert line.startswith("trials 2/4 done, 1 running, 0 failed | best val acc 90.00%")
    assert _left(line) == ", ~1:00 left"  # 30 s a trial, 2 left


def test_the_work_after_the_trials_is_added_at_the_measured_time_per_epoch():
    # 10 s and 12 s an epoch (a trial the scheduler stopped after 1 epoch counts that epoch): median 11 s
    trials = [_trial(Trial.TERMINATED, 30.0, 3), _trial(Trial.TERMINATED, 12.0, 1), _trial(Trial.RUNNING)]
    line = _line(ProgressLine(4, enabled=False, after_epochs=10), trials, elapsed=60.0)
    assert _left(line) == ", ~2:50 left (1:00 trials + ~1:50 final re-run)"


def test_once_the_trials_are_done_the_line_says_what_is_left_after_them():
    trials = [_trial(Trial.TERMINATED, 40.0, 4), _trial(Trial.TERMINATED, 60.0, 4), _trial(Trial.ERROR)]
    after = _line(ProgressLine(3, enabled=False, after_epochs=24), trials, elapsed=90.0)
    assert after.startswith("trials 3/3 done, 0 running, 1 failed")
    assert _left(after) == ", ~5:00 left (final re-run)"  # 24 epochs at 12.5 s
    assert _left(_line(ProgressLine(3, enabled=False), trials, elapsed=90.0)) == ""


def test_before_any_trial_ends_the_time_left_is_unknown():
    trials = [_trial(Trial.RUNNING), _trial(Trial.PENDING)]
    assert _left(_line(ProgressLine(2, enabled=False, after_epochs=5), trials, elapsed=5.0)) == ", ? left"
    # trials ended, but none with a time per epoch (all failed): the work after is named, not timed
    failed = [_trial(Trial.ERROR), _trial(Trial.RUNNING)]
    line = _line(ProgressLine(3, enabled=False, after_epochs=5), failed, elapsed=20.0)
    assert _left(line) == ", ~0:40 left + the final re-run"


def test_the_line_survives_pickling_with_the_tuner():
    progress = pickle.loads(pickle.dumps(ProgressLine(4, enabled=False, after_epochs=8)))
    trials = [_trial(Trial.TERMINATED, 20.0, 2), _trial(Trial.RUNNING)]
    assert re.search(r"\(0:\d\d trials \+ ~1:20 final re-run\)$", _line(progress, trials, elapsed=10.0))
