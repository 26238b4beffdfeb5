"""The Ray Tune callback that logs every trial as a child run of the search run, from the
driver (workers never write to the store). It lives in the search, beside the trial contract
it reads, so that ``autoprune.tracking`` (the store, its records, charts and notes) imports
no Ray."""

from __future__ import annotations

import math
import os
import pickle
import queue
import sys
import threading
import time
from pathlib import Path

from ..contract import COST_KEYS, FINAL_KEYS, SEARCHER_KEYS, is_final, task_metric_keys, trial_label
from ..errors import AutopruneError
from ..rayenv import quiet_environment
from ..tracking.store import (
    BASELINE,
    ERROR,
    MAX_PARAM,
    NODE_ID,
    NUMBER,
    PARENT,
    ROLE,
    TRIAL_ID,
    client,
    flat_params,
    log,
    param_value,
    tracking_down,
)
from . import journal
from .baselines import baseline_of
from .outbox import Outbox

quiet_environment()
from ray.tune import Callback  # noqa: E402

EPOCH_METRICS = ("val_loss", "loss")  # a series over the epochs (step: the epoch), with the task's metric
# the prefix of those series: the UI's section of that name comes first on a run's page, before
# the single values; the task's metric is also kept unprefixed, its latest value, for the runs table
CURVES = "epochs"
REALISED = "realised_pruned_fraction"  # metric prefix: the pruned fraction a trial reached per group or layer
CLOSE_WAIT_S = 300.0  # at the end of a search: how long the writer waits for a tracking server that went away
BEHIND_RETRY_MAX_S = 15.0  # the longest pause between two tries of a store that does not answer
POLICY = "policy"  # param prefix: the policy fields the searcher chose (``policy.ratios.<group>``: requested)


def cost_metrics(result: dict) -> dict[str, float]:
    """The pruned model's cost in a report, as single-value metrics: :data:`COST_KEYS`, a
    searcher's :data:`SEARCHER_KEYS` and ``realised_pruned_fraction.<group>``. Empty before pruning is done."""
    out = {k: result[k] for k in (*COST_KEYS, *SEARCHER_KEYS) if result.get(k) is not None}
    out.update({f"{REALISED}.{k}": v for k, v in (result.get("ratios") or {}).items()})
    return out


def trial_params(config: dict) -> dict[str, str]:
    """A trial's params: ``policy.<field>`` (nested: ``policy.finetune.lr``), always with
    its method (the default where the searcher left it: runs filter by method), and
    ``budget_fraction`` / ``space_error`` when the searcher set them."""
    from ..config import Policy

    params = flat_params(POLICY, {"method": Policy.method, **config.get("policy", {})})
    if config.get("budget_fraction") is not None:
        params["budget_fraction"] = param_value(float(config["budget_fraction"]))
    if config.get("space_error") is not None:
        params["space_error"] = str(config["space_error"])[:MAX_PARAM]
    return params


def trial_error(trial) -> str:
    """The exception a trial raised, as ``Type: message`` (Tune pickles it beside the trial;
    ``trial.get_error()`` is not yet set when callbacks run)."""
    path = getattr(trial, "pickled_error_file", None)
    if path and os.path.exists(path):
        try:
            with open(path, "rb") as f:
                exc = pickle.load(f)
            cause = getattr(exc, "cause", None) or exc
            return f"{type(cause).__name__}: {cause}"
        except Exception:  # noqa: BLE001 - fall back to the text file
            pass
    path = getattr(trial, "error_file", None)
    if path and os.path.exists(path):
        lines = [line for line in Path(path).read_text().splitlines() if line.strip()]
        return lines[-1] if lines else "unknown error"
    return "unknown error"


class TrialLogger(Callback):
    """Logs each Ray Tune trial as a child run of the search run, from the driver.

    The callbacks run on Tune's event loop, and a trial waits there after every report (Tune
    resumes it only once the loop has handled the result). So the callbacks only note what
    happened and when, in the search's outbox (:mod:`.outbox`); one writer thread makes the
    store calls, in order. Nothing on the loop waits for the store: a tracking server that
    stops answering delays the runs, not the trials (the writer tries again until it
    answers, and says once that tracking is behind).

    A child run is named after its trial (``#7 snip/global``: :func:`trial_label`,
    numbered in the order the trials started, after the trials a resumed search recorded); an
    agent's episode is renamed by its reward when it ends. Per epoch it gets the task's metric
    (``val_acc``, ``val_rmse`` ...), ``loss`` and ``val_loss`` as ``epochs/<key>`` (step: the
    epoch: the run page's first charts); the task's metric's latest value, the pruned model's
    cost, once known (also for a trial the scheduler stops later), and the final report's
    metrics are single values at step 0 (the runs table's columns).

    Each trial that ends gets its record in the search folder (:mod:`.journal`: what
    ``--resume`` reads) on the loop, before its run is ended. Tune pickles the callback with
    the Tuner, so it holds only the store's URI, run ids and folders, and finds the child run
    of a trial by its tag when it does not know it yet."""

    def __init__(
        self, uri: str, experiment_id: str, parent: str, path: str, outbox_dir: str | None = None, first: int = 1
    ) -> None:
        self.uri = uri
        self.experiment_id = experiment_id
        self.parent = parent
        self.path = path  # the search's folder (or bucket URI): the trials' records go under it
        self.outbox_dir = outbox_dir or path  # a local folder: the events not yet in the store
        self._runs: dict[str, str] = {}
        self._numbers: dict[str, int] = {}  # trial id -> its run's number
        self._curves: dict[str, list[dict]] = {}  # trial id -> what its record keeps of each report
        self._configs: dict[str, dict] = {}
        self._started: dict[str, float] = {}
        self._costs: dict[str, dict[str, float]] = {}  # the cost metrics logged per trial (logged once)
        self._next = first  # the number of the next new trial
        self._client = None
        self._queue: queue.Queue | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._outbox: Outbox | None = None
        self._deadline: float | None = None  # while closing: when the writer stops waiting for the store
        self._behind_since: float | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_client": None, "_queue": None, "_thread": None, "_error": None, "_outbox": None}

    @property
    def mlflow(self):
        if self._client is None:
            self._client = client(self.uri)
        return self._client

    # ---- the writer

    def _ops(self) -> dict:
        return {"start": self._start, "result": self._result, "ended": self._ended}

    def _submit(self, op: str, *args) -> None:
        self._raise()
        if self._thread is None:
            self._outbox = Outbox(Path(self.outbox_dir))
            self._queue = queue.Queue()
            self._thread = threading.Thread(target=self._work, name="autoprune-mlflow", daemon=True)
            self._thread.start()
            _WRITERS.add(self)
        self._outbox.append(op, list(args))
        self._queue.put((op, args))

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                if self._error is None:
                    self.apply(*item)
                    self._outbox.applied()
            except BaseException as exc:  # noqa: BLE001 - raised on Tune's loop at the next event
                self._error = exc
            finally:
                self._queue.task_done()

    def apply(self, op: str, args) -> None:
        """Make one event's store calls; while the tracking server does not answer, wait for
        it (until the deadline :meth:`close` sets) rather than lose or reorder anything."""
        delay = 1.0
        while True:
            try:
                self._ops()[op](*args)
                break
            except Exception:
                if not tracking_down(self.uri):
                    raise
                self._behind(delay)
                delay = min(2 * delay, BEHIND_RETRY_MAX_S)
        if self._behind_since is not None:
            print(
                f"note: MLflow at {self.uri} answers again after {time.monotonic() - self._behind_since:.0f} s; "
                "the trials' waiting results are being written",
                file=sys.stderr,
            )
            self._behind_since = None

    def _behind(self, delay: float) -> None:
        if self._behind_since is None:
            self._behind_since = time.monotonic()
            where = self._outbox.file if self._outbox is not None else self.outbox_dir
            print(
                f"note: MLflow at {self.uri} is not answering; the trials go on and their results wait in "
                f"{str(where)!r}, written in order once it answers (or by --resume)",
                file=sys.stderr,
            )
        if self._deadline is not None and time.monotonic() > self._deadline:
            left = self._outbox.behind if self._outbox is not None else 0
            raise TrackingBehind(
                f"MLflow at {self.uri} has not answered for {time.monotonic() - self._behind_since:.0f} s; "
                f"{left} trial event(s) wait in {str(self.outbox_dir)!r} and are written by --resume"
            )
        time.sleep(delay)

    def _raise(self) -> None:
        if self._error is not None:
            exc, self._error = self._error, None
            if isinstance(exc, TrackingBehind):
                raise AutopruneError(str(exc)) from None
            raise AutopruneError(f"MLflow logging to {self.uri} failed: {type(exc).__name__}: {exc}") from exc

    def flush(self) -> None:
        """Wait until every noted event is in the store."""
        if self._queue is not None:
            self._queue.join()
        self._raise()

    def close(self, wait_s: float = CLOSE_WAIT_S) -> None:
        """Let the writer finish, waiting at most ``wait_s`` for a tracking server that does not
        answer (what is left stays in the outbox, for ``--resume``)."""
        if self._thread is not None:
            self._deadline = time.monotonic() + wait_s
            self._queue.put(None)
            self._thread.join()
            self._thread = None
            _WRITERS.discard(self)
            if self._error is None and self._outbox.behind == 0:
                self._outbox.clear()
            self._outbox.close()
        self._raise()

    def get_state(self) -> None:
        return None  # Tune's snapshot is never read back: it waits for nothing

    def on_experiment_end(self, trials, **info):
        self.close()

    # ---- Tune's events, noted on its loop

    def on_trial_start(self, iteration, trials, trial, **info):
        self._started[trial.trial_id] = time.time()
        self._curves[trial.trial_id] = []
        self._configs[trial.trial_id] = dict(trial.config)
        if trial.trial_id not in self._numbers:  # a trial Tune runs again keeps its number
            self._numbers[trial.trial_id], self._next = self._next, self._next + 1
        self._submit("start", trial.trial_id, dict(trial.config), self._numbers[trial.trial_id])

    def on_trial_result(self, iteration, trials, trial, result, **info):
        step = int(result.get("epoch", result.get("training_iteration", 0)))
        tags = {NODE_ID: result["node_id"]} if result.get("node_id") and step <= 1 else None
        metrics = {f"{CURVES}/{k}": result.get(k) for k in (*EPOCH_METRICS, *task_metric_keys(result))}
        # the cost once it is known (and again only if it changed), the final metrics at the end
        logged = self._costs.setdefault(trial.trial_id, {})
        once = {
            k: v
            for k, v in cost_metrics(result).items()
            if k not in logged or not math.isclose(logged[k], v, rel_tol=1e-9)
        }
        logged.update(once)
        once.update({k: result.get(k) for k in task_metric_keys(result)})  # the latest (step 0: one value)
        if is_final(result):
            once.update({k: result.get(k) for k in FINAL_KEYS})
        self._curves.setdefault(trial.trial_id, []).append(journal.curve_point(result))
        self._submit("result", trial.trial_id, metrics, once, tags, step, int(time.time() * 1000))

    def on_trial_complete(self, iteration, trials, trial, **info):
        result = dict(trial.last_result or {})
        self._trial_ended(trial, "completed" if is_final(result) else "stopped", result, None)  # stopped: the scheduler

    def on_trial_error(self, iteration, trials, trial, **info):
        self._trial_ended(trial, "failed", dict(trial.last_result or {}), trial_error(trial))

    def _trial_ended(self, trial, status: str, result: dict, error: str | None) -> None:
        """A trial ended: its record first, here (what a resume keeps; the stopped trial's too,
        else a resume would run it again), then its run, by the writer (its cost was logged
        with its reports; the per-group ratio charts are drawn once, when the search ends)."""
        trial_id = trial.trial_id
        config = self._configs.pop(trial_id, None) or dict(trial.config)
        number = self._numbers.get(trial_id) or self._next
        rec = journal.record(trial_id, number, status, config, result, self._curves.pop(trial_id, []), error)
        journal.save(self.path, rec)
        self._costs.pop(trial_id, None)
        started = self._started.pop(trial_id, None)
        wall = {"trial_wall_s": time.time() - started} if started is not None else {}
        # an agent's episode is named by its reward once it has one (contract.trial_label)
        policy = config.get("policy") if isinstance(config.get("policy"), dict) else {}
        name = trial_label(policy, number, baseline_of(config), result) if result.get("reward") is not None else None
        self._submit("ended", trial_id, status, error, wall, name)

    # ---- the store, on the writer thread

    def _find(self, trial_id: str):
        runs = self.mlflow.search_runs(
            [self.experiment_id], f"tags.`{PARENT}` = '{self.parent}' and tags.`{TRIAL_ID}` = '{trial_id}'"
        )
        return runs[0] if runs else None

    def _start(self, trial_id: str, config: dict, number: int) -> None:
        old = self._find(trial_id)
        if old is not None:
            # run again from scratch (Tune retries a failed trial): replace its run, so no
            # epoch is logged twice and MLflow shows the outcome of this run; ended first, so
            # that the deleted run is not left RUNNING
            if old.info.status == "RUNNING":
                self.mlflow.set_terminated(old.info.run_id, status="KILLED")
            self.mlflow.delete_run(old.info.run_id)
        policy = config.get("policy", {})
        baseline = baseline_of(config)
        run = self.mlflow.create_run(
            self.experiment_id,
            run_name=trial_label(policy if isinstance(policy, dict) else {}, number, baseline),
            tags={
                PARENT: self.parent,
                ROLE: "trial",
                TRIAL_ID: trial_id,
                NUMBER: str(number),
                "ray.trial_id": trial_id,
                **({BASELINE: baseline} if baseline else {}),
            },
        )
        run_id = run.info.run_id
        self._runs[trial_id] = run_id
        log(self.mlflow, run_id, params=trial_params(config))
        self.mlflow.log_dict(run_id, policy, "policy.json")

    def _run_id(self, trial_id: str) -> str | None:
        if trial_id not in self._runs:
            run = self._find(trial_id)
            if run is None:
                return None
            self._runs[trial_id] = run.info.run_id
        return self._runs[trial_id]

    def _result(self, trial_id: str, metrics: dict, once: dict, tags: dict | None, step: int, at_ms: int) -> None:
        run_id = self._run_id(trial_id)
        if run_id is not None:
            log(self.mlflow, run_id, metrics, tags=tags, step=step, at_ms=at_ms, once=once)

    def _ended(self, trial_id: str, status: str, error: str | None, wall: dict, name: str | None = None) -> None:
        run_id = self._run_id(trial_id)
        if run_id is None:
            return
        named = {"mlflow.runName": name} if name else {}
        if status == "failed":
            self.mlflow.log_text(run_id, error + "\n", "error.txt")
            self._end(run_id, "FAILED", wall, {}, {ERROR: error[:MAX_PARAM], **named})
        else:
            self._end(
                run_id, "FINISHED", wall, {}, {"autoprune.stopped_early": str(status == "stopped").lower(), **named}
            )

    def _end(self, run_id: str, status: str, wall: dict, params: dict[str, str], tags: dict[str, str]) -> None:
        log(self.mlflow, run_id, params=params, tags=tags, once=wall)
        self.mlflow.set_terminated(run_id, status=status)


class TrackingBehind(Exception):
    """The tracking server did not answer before the writer's deadline."""


def apply_outbox(logger: TrialLogger) -> int:
    """Before a resume: the events a dead driver left in the outbox, applied in order (the
    store answers: the search checked it); the outbox is then emptied. How many."""
    box = Outbox(Path(logger.outbox_dir))
    events = box.pending()
    for op, args in events:
        logger.apply(op, args)
        box.applied()
    box.clear()
    return len(events)


_WRITERS: set[TrialLogger] = set()  # loggers with a writer thread, for close_writers


def close_writers(wait_s: float = CLOSE_WAIT_S) -> None:
    """Let every trial logger's writer finish (after ``Tuner.fit``, also when it was
    interrupted: the logger Tune ran is its own copy), waiting at most ``wait_s`` for a
    tracking server that does not answer."""
    for writer in list(_WRITERS):
        writer.close(wait_s)
