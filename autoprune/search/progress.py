"""The live progress line that replaces Ray Tune's tables (a Tune callback, pickled with the
Tuner for ``--resume``, so it keeps little state)."""

from __future__ import annotations

import statistics
import sys
import time

from ..contract import is_final, metric_mode, show_metric
from ..rayenv import quiet_environment

quiet_environment()
from ray.tune import Callback  # noqa: E402


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}"


AFTER = "final re-run"  # what the work after the trials is called in the line


def _eta(left: int, trials_s: float | None, after_s: float | None) -> str:
    """The line's remaining time: ``left`` trials estimated at ``trials_s`` seconds (None: not
    yet known), and the work after them, ``after_s`` seconds (0: none; None: not yet known)."""
    if not left:
        return f", ~{_clock(after_s)} left ({AFTER})" if after_s else ""
    if trials_s is None:
        return ", ? left"
    if after_s == 0:
        return f", ~{_clock(trials_s)} left"
    if after_s is None:
        return f", ~{_clock(trials_s)} left + the {AFTER}"
    return f", ~{_clock(trials_s + after_s)} left ({_clock(trials_s)} trials + ~{_clock(after_s)} {AFTER})"


class ProgressLine(Callback):
    """One live line in place of Tune's tables: trials done / running / failed, the best
    value of the task's validation metric so far, elapsed and estimated remaining time. On a terminal it is
    rewritten in place; otherwise a line is printed whenever a trial ends. Counts come from
    Tune's trial list, so they stay right after ``--resume``.

    ``after_epochs``: the epochs the driver trains once the trials are done (the final re-run
    of the best trials, the matched uniform run), added to the remaining time at the trials'
    measured time per epoch (:meth:`_after_s`); 0 leaves it out."""

    def __init__(self, total: int, enabled: bool = True, score: str = "val_acc", after_epochs: int = 0) -> None:
        self.total = total
        self.enabled = enabled
        self.score, self.mode = score, metric_mode(score)  # the task's metric, and which way is better
        self.after_epochs = after_epochs  # epochs the driver trains after the trials, one run at a time
        self.setup()

    def setup(self, **info) -> None:
        self.t0 = time.time()
        self.ended_here = 0
        self.last_draw = 0.0

    def line(self, trials) -> str:
        done = sum(t.status == "TERMINATED" for t in trials)
        failed = sum(t.status == "ERROR" for t in trials)
        running = sum(t.status == "RUNNING" for t in trials)
        scores = [
            t.last_result[self.score]
            for t in trials
            if t.status == "TERMINATED" and is_final(t.last_result) and self.score in t.last_result
        ]
        top = (max if self.mode == "max" else min)(scores) if scores else None
        best = f"best {self.score.replace('_', ' ')} {show_metric(self.score, top)}"
        elapsed = time.time() - self.t0
        left = max(0, self.total - done - failed)
        trials_left = elapsed / self.ended_here * left if self.ended_here else None
        eta = _eta(left, trials_left, self._after_s(trials) if self.after_epochs else 0.0)
        return f"trials {done + failed}/{self.total} done, {running} running, {failed} failed | {best} | {_clock(elapsed)} elapsed{eta}"

    def _after_s(self, trials) -> float | None:
        """Seconds of the work after the trials: ``after_epochs`` times a trial's median wall
        time per epoch (Tune's ``time_total_s`` over the epochs it reported, so a trial the
        scheduler stopped early counts what it ran); None before any trial has ended. The
        driver runs that work one run at a time, with no more threads than a trial has
        (engine.threads.driver_threads), so one epoch there takes about a trial's epoch."""
        per_epoch = [
            t.last_result["time_total_s"] / t.last_result["training_iteration"]
            for t in trials
            if t.status == "TERMINATED"
            and t.last_result.get("time_total_s")
            and t.last_result.get("training_iteration")
        ]
        return self.after_epochs * statistics.median(per_epoch) if per_epoch else None

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


class ClusterWatch(Callback):
    """Stops a search whose cluster has no node left that could run a trial (every worker
    lost), instead of letting Tune wait for one forever: after ``wait_s`` seconds without such
    a node it raises, the search run is ended FAILED and what was recorded stays."""

    def __init__(self, cpus: float, gpus: float, wait_s: float) -> None:
        self.cpus, self.gpus, self.wait_s = cpus, gpus, wait_s
        self.setup()

    def setup(self, **info) -> None:
        self.since: float | None = None
        self.checked = 0.0

    def on_step_begin(self, iteration, trials, **info) -> None:
        from ..errors import AutopruneError
        from .ray_connection import fitting_nodes

        now = time.monotonic()
        if now - self.checked < 2.0:
            return
        self.checked = now
        if fitting_nodes(self.cpus, self.gpus):
            self.since = None
            return
        self.since = self.since or now
        if now - self.since > self.wait_s:
            raise AutopruneError(
                f"the cluster has had no node that can run a trial ({self.cpus:g} CPU, {self.gpus:g} GPU) for "
                f"{self.wait_s:g} s (--node-wait): its workers are gone, or none was ever added. The trials "
                "recorded so far are kept; bring nodes up and continue with --resume"
            )
