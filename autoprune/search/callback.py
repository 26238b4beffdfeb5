"""The Ray Tune callback that logs every trial as a child run of the search run, from the
driver (workers never write to the store). It lives in the search, beside the trial contract
it reads, so that ``autoprune.tracking`` (the store, its records, charts and notes) imports
no Ray."""

from __future__ import annotations

import math
import os
import pickle
import queue
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
    trial_runs,
)
from . import journal
from .baselines import baseline_of

quiet_environment()
from ray.tune import Callback  # noqa: E402

EPOCH_METRICS = ("val_loss", "loss")  # a series over the epochs (step: the epoch), with the task's metric
REALISED = "realised_pruned_fraction"  # metric prefix: the pruned fraction a trial reached per group or layer
POLICY = "policy"  # param prefix: the policy fields the searcher chose (``policy.ratios.<group>``: requested)


def cost_metrics(result: dict) -> dict[str, float]:
    """The pruned model's cost in a report, as single-value metrics: :data:`COST_KEYS`, a
    searcher's :data:`SEARCHER_KEYS` and ``realised_pruned_fraction.<group>``. Empty before pruning is done."""
    out = {k: result[k] for k in (*COST_KEYS, *SEARCHER_KEYS) if result.get(k) is not None}
    out.update({f"{REALISED}.{k}": v for k, v in (result.get("ratios") or {}).items()})
    return out


def trial_params(config: dict) -> dict[str, str]:
    """A trial's params: ``policy.<field>`` (nested: ``policy.finetune.lr``), and
    ``budget_fraction`` / ``space_error`` when the searcher set them."""
    params = flat_params(POLICY, config.get("policy", {}))
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
    happened and when; one writer thread makes the store calls, in order (``get_state``, which
    Tune calls before its snapshots, waits until the writer has caught up).

    A child run is named after its trial (``channel/snip/global #7``: :func:`trial_label`,
    numbered in the order the trials started, after the runs already there on a resume). Per
    epoch it gets the task's metric (``val_acc``, ``val_rmse`` ...) and ``loss`` (step: the epoch); the pruned model's cost, once
    known (also for a trial the scheduler stops later), and the final report's metrics are
    single values at step 0.

    Each trial that ends gets its record in the search folder (:mod:`.journal`: what
    ``--resume`` reads) before its run is ended. Tune pickles the callback with the Tuner, so
    it holds only the store's URI and run ids, and finds the child run of a trial by its tag
    when it does not know it yet."""

    def __init__(self, uri: str, experiment_id: str, parent: str, path: str) -> None:
        self.uri = uri
        self.experiment_id = experiment_id
        self.parent = parent
        self.path = path  # the search's folder (or bucket URI): the trials' records go under it
        self._runs: dict[str, str] = {}
        self._numbers: dict[str, int] = {}  # trial id -> its run's number
        self._curves: dict[str, list[dict]] = {}  # trial id -> what its record keeps of each report
        self._configs: dict[str, dict] = {}
        self._started: dict[str, float] = {}
        self._costs: dict[str, dict[str, float]] = {}  # the cost metrics logged per trial (logged once)
        self._next: int | None = None  # the number of the next new child run (read from the store first)
        self._client = None
        self._queue: queue.Queue | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_client": None, "_queue": None, "_thread": None, "_error": None, "_next": None}

    @property
    def mlflow(self):
        if self._client is None:
            self._client = client(self.uri)
        return self._client

    # ---- the writer

    def _submit(self, fn, *args) -> None:
        self._raise()
        if self._thread is None:
            self._queue = queue.Queue()
            self._thread = threading.Thread(target=self._work, name="autoprune-mlflow", daemon=True)
            self._thread.start()
            _WRITERS.add(self)
        self._queue.put((fn, args))

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                if self._error is None:
                    item[0](*item[1])
            except BaseException as exc:  # noqa: BLE001 - raised on Tune's loop at the next event
                self._error = exc
            finally:
                self._queue.task_done()

    def _raise(self) -> None:
        if self._error is not None:
            exc, self._error = self._error, None
            raise AutopruneError(f"MLflow logging to {self.uri} failed: {type(exc).__name__}: {exc}") from exc

    def flush(self) -> None:
        """Wait until every noted event is in the store."""
        if self._queue is not None:
            self._queue.join()
        self._raise()

    def close(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None
            _WRITERS.discard(self)
        self._raise()

    def get_state(self) -> None:
        self.flush()  # before Tune writes its snapshot
        return None

    def on_experiment_end(self, trials, **info):
        self.close()

    # ---- Tune's events, noted on its loop

    def on_trial_start(self, iteration, trials, trial, **info):
        self._started[trial.trial_id] = time.time()
        self._curves[trial.trial_id] = []
        self._configs[trial.trial_id] = dict(trial.config)
        self._submit(self._start, trial.trial_id, dict(trial.config))

    def on_trial_result(self, iteration, trials, trial, result, **info):
        step = int(result.get("epoch", result.get("training_iteration", 0)))
        tags = {NODE_ID: result["node_id"]} if result.get("node_id") and step <= 1 else None
        metrics = {k: result.get(k) for k in (*EPOCH_METRICS, *task_metric_keys(result))}
        # the cost once it is known (and again only if it changed), the final metrics at the end
        logged = self._costs.setdefault(trial.trial_id, {})
        once = {
            k: v
            for k, v in cost_metrics(result).items()
            if k not in logged or not math.isclose(logged[k], v, rel_tol=1e-9)
        }
        logged.update(once)
        if is_final(result):
            once.update({k: result.get(k) for k in FINAL_KEYS})
        self._curves.setdefault(trial.trial_id, []).append(journal.curve_point(result))
        self._submit(self._result, trial.trial_id, metrics, once, tags, step, int(time.time() * 1000))

    def on_trial_complete(self, iteration, trials, trial, **info):
        result = dict(trial.last_result or {})
        status = "completed" if is_final(result) else "stopped"  # stopped early by the scheduler
        self._submit(self._ended, trial.trial_id, status, self._memo(trial, result, None), self._wall(trial))

    def on_trial_error(self, iteration, trials, trial, **info):
        error = trial_error(trial)
        memo = self._memo(trial, dict(trial.last_result or {}), error)
        self._submit(self._ended, trial.trial_id, "failed", memo, self._wall(trial))

    def _memo(self, trial, result: dict, error: str | None) -> tuple:
        """What the trial's record needs, taken on Tune's loop: config, last report, curve, error."""
        config = self._configs.pop(trial.trial_id, None) or dict(trial.config)
        return config, result, self._curves.pop(trial.trial_id, []), error

    def _wall(self, trial) -> dict[str, float]:
        self._costs.pop(trial.trial_id, None)
        started = self._started.pop(trial.trial_id, None)
        return {"trial_wall_s": time.time() - started} if started is not None else {}

    # ---- the store, on the writer thread

    def _find(self, trial_id: str):
        runs = self.mlflow.search_runs(
            [self.experiment_id], f"tags.`{PARENT}` = '{self.parent}' and tags.`{TRIAL_ID}` = '{trial_id}'"
        )
        return runs[0] if runs else None

    def _number(self, old) -> int:
        """The number of a trial's run: its old run's when it replaces one, else the next
        after every child run of the search (on a resume, those already in the store)."""
        if old is not None and str(old.data.tags.get(NUMBER, "")).isdigit():
            return int(old.data.tags[NUMBER])
        if self._next is None:
            runs = trial_runs(self.uri, self.experiment_id, self.parent).values()
            numbers = [int(r.data.tags[NUMBER]) for r in runs if str(r.data.tags.get(NUMBER, "")).isdigit()]
            self._next = max(numbers, default=0) + 1
        self._next += 1
        return self._next - 1

    def _start(self, trial_id: str, config: dict) -> None:
        old = self._find(trial_id)
        if old is not None:
            # run again from scratch (Tune retries a failed trial): replace its run, so no
            # epoch is logged twice and MLflow shows the outcome of this run; ended first, so
            # that the deleted run is not left RUNNING
            if old.info.status == "RUNNING":
                self.mlflow.set_terminated(old.info.run_id, status="KILLED")
            self.mlflow.delete_run(old.info.run_id)
        number = self._number(old)
        self._numbers[trial_id] = number
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

    def _ended(self, trial_id: str, status: str, memo: tuple, wall: dict) -> None:
        """A trial ended: its record first (what a resume keeps; the stopped trial's too,
        else a resume would run it again), then its run (its cost was logged with its
        reports; the per-group ratio charts are drawn once, when the search ends)."""
        run_id = self._run_id(trial_id)
        if run_id is None:
            return
        config, result, curve, error = memo
        number = self._numbers.get(trial_id) or self._run_number(run_id)
        journal.save(self.path, journal.record(trial_id, number, status, config, result, curve, error))
        if status == "failed":
            self.mlflow.log_text(run_id, error + "\n", "error.txt")
            self._end(run_id, "FAILED", wall, {}, {ERROR: error[:MAX_PARAM]})
        else:
            self._end(run_id, "FINISHED", wall, {}, {"autoprune.stopped_early": str(status == "stopped").lower()})

    def _run_number(self, run_id: str) -> int:
        tag = str(self.mlflow.get_run(run_id).data.tags.get(NUMBER, ""))
        return int(tag) if tag.isdigit() else self._number(None)

    def _end(self, run_id: str, status: str, wall: dict, params: dict[str, str], tags: dict[str, str]) -> None:
        log(self.mlflow, run_id, params=params, tags=tags, once=wall)
        self.mlflow.set_terminated(run_id, status=status)


_WRITERS: set[TrialLogger] = set()  # loggers with a writer thread, for close_writers


def close_writers() -> None:
    """Let every trial logger's writer finish (after ``Tuner.fit``, also when it was
    interrupted: the logger of a restored Tuner is Tune's own copy)."""
    for writer in list(_WRITERS):
        writer.close()
