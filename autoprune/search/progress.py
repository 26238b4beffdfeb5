"""The live progress line that replaces Ray Tune's tables (a Tune callback, pickled with the
Tuner for ``--resume``, so it keeps little state)."""

from __future__ import annotations

import sys
import time

from ..contract import is_final, metric_mode, show_metric
from ..rayenv import quiet_environment

quiet_environment()
from ray.tune import Callback  # noqa: E402


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}"


class ProgressLine(Callback):
    """One live line in place of Tune's tables: trials done / running / failed, the best
    value of the task's validation metric so far, elapsed and estimated remaining time. On a terminal it is
    rewritten in place; otherwise a line is printed whenever a trial ends. Counts come from
    Tune's trial list, so they stay right after ``--resume``."""

    def __init__(self, total: int, enabled: bool = True, score: str = "val_acc") -> None:
        self.total = total
        self.enabled = enabled
        self.score, self.mode = score, metric_mode(score)  # the task's metric, and which way is better
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
