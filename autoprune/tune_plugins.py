"""Pieces that plug into Ray Tune (imported only by the search, after Ray's environment is
set): the Optuna searcher and the live progress line. Both are pickled with the Tuner for
``--resume``, so they live at module level and keep little state."""

from __future__ import annotations

import contextlib
import sys
import time

from .rayenv import quiet_environment

quiet_environment()
import optuna  # noqa: E402
from optuna.trial import TrialState  # noqa: E402
from ray.tune import Callback  # noqa: E402
from ray.tune.search.optuna import OptunaSearch  # noqa: E402

optuna.logging.set_verbosity(optuna.logging.WARNING)


class PolicyOptunaSearch(OptunaSearch):
    """``OptunaSearch`` that tells the sampler the truth about trials ASHA stopped early.

    Ray's ``OptunaSearch`` completes an early-stopped trial as COMPLETE with its last,
    partial accuracy, so TPE would model a one-epoch accuracy as if it were a full run's.
    Here such a trial is told as PRUNED: Optuna keeps the per-epoch values the trial
    reported (``trial.report``), and TPE ranks pruned trials below completed ones, by
    the step they reached and then their last value. A trial is early-stopped when it
    finished without error and without its final report (which carries ``flops_ratio``)."""

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        stopped = (
            not error
            and result
            and not isinstance(self.metric, list)
            and result.get("flops_ratio") is None
            and trial_id in self._ot_trials
            and trial_id not in self._completed_trials
        )
        if not stopped:
            return super().on_trial_complete(trial_id, result=result, error=error)
        self._completed_trials.add(trial_id)
        # an exhausted GridSampler calls Study.stop() in tell, which only works inside optimize()
        with contextlib.suppress(RuntimeError):
            self._ot_study.tell(self._ot_trials[trial_id], state=TrialState.PRUNED)


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}"


class ProgressLine(Callback):
    """One live line in place of Tune's tables: trials done / running / failed, the best
    validation accuracy so far, elapsed and estimated remaining time. On a terminal it is
    rewritten in place; otherwise a line is printed whenever a trial ends. Counts come from
    Tune's trial list, so they stay right after ``--resume``."""

    def __init__(self, total: int, enabled: bool = True) -> None:
        self.total = total
        self.enabled = enabled
        self.setup()

    def setup(self, **info) -> None:
        self.t0 = time.time()
        self.ended_here = 0
        self.last_draw = 0.0

    def line(self, trials) -> str:
        done = sum(t.status == "TERMINATED" for t in trials)
        failed = sum(t.status == "ERROR" for t in trials)
        running = sum(t.status == "RUNNING" for t in trials)
        accs = [
            t.last_result["val_acc"]
            for t in trials
            if t.status == "TERMINATED" and (t.last_result or {}).get("flops_ratio") is not None
        ]
        best = f"best val {100 * max(accs):.2f}%" if accs else "best val -"
        elapsed = time.time() - self.t0
        left = max(0, self.total - done - failed)
        if not left:
            eta = ""
        elif self.ended_here:
            eta = f", ~{_clock(elapsed / self.ended_here * left)} left"
        else:
            eta = ", ? left"
        return f"trials {done + failed}/{self.total} done, {running} running, {failed} failed | {best} | {_clock(elapsed)} elapsed{eta}"

    def _draw(self, trials, ended: bool = False) -> None:
        if not self.enabled:
            return
        if sys.stderr.isatty():
            if ended or time.time() - self.last_draw >= 1:
                sys.stderr.write("\r\033[K" + self.line(trials))
                sys.stderr.flush()
                self.last_draw = time.time()
        elif ended:
            print(self.line(trials), file=sys.stderr, flush=True)

    def on_step_end(self, iteration, trials, **info) -> None:
        self._draw(trials)

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self.ended_here += 1
        self._draw(trials, ended=True)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self.ended_here += 1
        self._draw(trials, ended=True)

    def on_experiment_end(self, trials, **info) -> None:
        if self.enabled and sys.stderr.isatty():
            sys.stderr.write("\r\033[K" + self.line(trials) + "\n")
