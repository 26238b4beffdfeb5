"""MLflow tracking of a search: one experiment per search name, a parent *search run* and one
child run per trial, written only by the driver (from Ray Tune callbacks), never by workers.

Child runs hold the policy (params, with the per-group ratios), per-epoch and final metrics,
status FINISHED or FAILED with the error, the Ray trial id and node as tags, and the policy
JSON plus a per-group ratio bar chart as artifacts.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import queue
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from .errors import AutopruneError
from .rayenv import quiet_environment

quiet_environment()
from ray.tune import Callback  # noqa: E402

ROLE = "autoprune.role"  # "search" (the parent run) or "trial"
TRIAL_ID = "autoprune.trial_id"  # the Ray Tune trial id of a child run
NODE_ID = "autoprune.node_id"
PARENT = "mlflow.parentRunId"
FINAL_METRICS = ("val_acc", "flops_ratio", "params_ratio", "latency_ms", "speedup", "engine_s", "report_s")
MAX_PARAM = 6000  # MLflow's limit on a param value's length


# ------------------------------------------------------------------ the store


def resolve_tracking_uri(uri: str | None) -> str:
    """The default store is ``mlflow.db`` in the working directory; SQLite paths become
    absolute, because Ray Tune changes the working directory of trials."""
    if not uri:
        return f"sqlite:///{Path.cwd() / 'mlflow.db'}"
    if uri.startswith("sqlite:///"):
        path = Path(uri[len("sqlite:///") :]).expanduser()
        return f"sqlite:///{path if path.is_absolute() else Path.cwd() / path}"
    return uri


STORE_SCHEMES = ("sqlite", "http", "https", "file", "postgresql", "mysql", "mssql")


def check_tracking_uri(uri: str) -> None:
    """Fail fast, before Ray starts, on a store that cannot work: an unknown scheme, an MLflow
    server that does not answer (it otherwise costs minutes of retries), an SQLite file that
    is not an MLflow store or lies where nothing can be written, a file store MLflow 3 refuses."""
    from .paths import check_output_dir

    scheme = uri.partition("://")[0] if "://" in uri else ""
    if scheme not in STORE_SCHEMES:
        raise AutopruneError(
            f"--tracking-uri {uri!r} is not a tracking store MLflow can open; use sqlite:///path/mlflow.db, "
            "http(s)://host:port (an `mlflow server`) or a database URI (postgresql://, mysql://, mssql://)"
        )
    if scheme in ("http", "https"):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=3) as reply:
                if reply.status != 200:
                    raise OSError(f"HTTP {reply.status}")
        except (OSError, urllib.error.URLError, ValueError) as exc:
            raise AutopruneError(
                f"--tracking-uri {uri!r} does not answer ({exc}); start `mlflow server` there, or leave the "
                "flag out for the local SQLite store mlflow.db"
            ) from None
    elif scheme == "sqlite":
        path = Path(uri[len("sqlite:///") :])
        if not path.parent.is_dir():
            raise AutopruneError(f"--tracking-uri {uri!r}: the folder {str(path.parent)!r} does not exist")
        if path.is_dir():
            raise AutopruneError(f"--tracking-uri {uri!r} names a directory; give the database file, e.g. mlflow.db")
        check_output_dir(path.parent, "--tracking-uri")
        if path.is_file() and path.stat().st_size > 0:
            _check_sqlite_store(path, uri)
    elif scheme == "file":
        if os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() != "true":
            raise AutopruneError(
                f"--tracking-uri {uri!r} is an MLflow file store, which MLflow 3 refuses (maintenance mode); use "
                "sqlite:///path/mlflow.db, or set MLFLOW_ALLOW_FILE_STORE=true to use it anyway"
            )
        check_output_dir(urllib.request.url2pathname(uri[len("file://") :]), "--tracking-uri")


def _check_sqlite_store(path: Path, uri: str) -> None:
    """An existing SQLite file must be a database, and an MLflow store if it has tables
    (opened read-only: nothing is written)."""
    import sqlite3

    with open(path, "rb") as f:
        if f.read(16) != b"SQLite format 3\x00":
            raise AutopruneError(f"--tracking-uri {uri!r}: {str(path)!r} is not an SQLite database")
    try:
        with contextlib.closing(sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True)) as db:
            tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    except sqlite3.DatabaseError as exc:
        raise AutopruneError(f"--tracking-uri {uri!r}: {str(path)!r} cannot be read as a database ({exc})") from None
    if tables and "experiments" not in tables:
        raise AutopruneError(
            f"--tracking-uri {uri!r}: {str(path)!r} is an SQLite database but not an MLflow store (no experiments "
            "table); give another file"
        )


def client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _artifact_location(uri: str, name: str) -> str | None:
    """Artifacts of a SQLite store live beside the database (absolute, whatever the cwd);
    a server decides for itself."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///") :]).parent / "mlartifacts" / name).as_uri()
    return None


def flat_params(prefix: str, data: Any) -> dict[str, str]:
    """Nested config -> flat MLflow params (``finetune.lr``), values as text."""
    if isinstance(data, dict):
        out: dict[str, str] = {}
        for key, value in data.items():
            out.update(flat_params(f"{prefix}.{key}" if prefix else str(key), value))
        return out
    text = json.dumps(data) if isinstance(data, (list, tuple)) else str(data)
    return {prefix: text[:MAX_PARAM]}


def log(
    mlflow,
    run_id: str,
    metrics: dict[str, Any] | None = None,
    params: dict[str, str] | None = None,
    tags: dict[str, str] | None = None,
    step: int = 0,
    at_ms: int | None = None,
) -> None:
    """Metrics (numbers only), params and tags in as few store transactions as MLflow allows
    (at most 100 params per batch)."""
    from mlflow.entities import Metric, Param, RunTag

    now = at_ms if at_ms is not None else int(time.time() * 1000)
    ms = [
        Metric(k, float(v), now, step)
        for k, v in (metrics or {}).items()
        if isinstance(v, (int, float)) and not isinstance(v, bool)
    ]
    ps = [Param(k, v) for k, v in (params or {}).items()]
    ts = [RunTag(k, v) for k, v in (tags or {}).items()]
    while ms or ps or ts:
        mlflow.log_batch(run_id, metrics=ms, params=ps[:100], tags=ts)
        ms, ps, ts = [], ps[100:], []


def open_search_run(uri: str, name: str, params: dict[str, str], resume: bool) -> tuple[str, str]:
    """(experiment id, parent run id). A resumed search reuses its experiment and run."""
    mlflow = client(uri)
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is None:
        experiment_id = mlflow.create_experiment(name, artifact_location=_artifact_location(uri, name))
    elif experiment.lifecycle_stage == "deleted":
        raise AutopruneError(
            f"MLflow experiment {name!r} was deleted but still exists in {uri}; restore it or choose another --name"
        )
    else:
        experiment_id = experiment.experiment_id
    if resume:
        runs = mlflow.search_runs([experiment_id], f"tags.`{ROLE}` = 'search'", max_results=1)
        if runs:
            mlflow.update_run(runs[0].info.run_id, status="RUNNING")
            return experiment_id, runs[0].info.run_id
    run = mlflow.create_run(experiment_id, run_name=name, tags={ROLE: "search"})
    log(mlflow, run.info.run_id, params=params)
    return experiment_id, run.info.run_id


def trial_runs(uri: str, experiment_id: str, parent: str) -> dict[str, Any]:
    """Ray trial id -> the child run of ``parent`` logged for it."""
    mlflow = client(uri)
    found, token = {}, None
    while True:
        page = mlflow.search_runs([experiment_id], f"tags.`{PARENT}` = '{parent}'", max_results=1000, page_token=token)
        for run in page:
            found[run.data.tags.get(TRIAL_ID)] = run
        token = page.token
        if not token:
            return found


# ------------------------------------------------------------------ the Tune callback


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
    happened and when; one writer thread makes the store calls, in order. Tune saves its
    experiment snapshot (what ``--resume`` restores) only after ``get_state``, which waits
    until the writer has caught up, so a snapshot never claims more than the store holds.

    It is pickled with the Tuner (for ``--resume``), so it holds only the store's URI and run
    ids, and finds the child run of a trial by its tag when it does not know it yet."""

    def __init__(self, uri: str, experiment_id: str, parent: str, completed_dir: str) -> None:
        self.uri = uri
        self.experiment_id = experiment_id
        self.parent = parent
        self.completed_dir = completed_dir  # final results by trial id, replayed on --resume
        self._runs: dict[str, str] = {}
        self._logged: set[str] = set()  # trials whose run was finished before a resume: not logged again
        self._started: dict[str, float] = {}
        self._client = None
        self._queue: queue.Queue | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_client": None, "_queue": None, "_thread": None, "_error": None}

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
        self._submit(self._start, trial.trial_id, dict(trial.config))

    def on_trial_result(self, iteration, trials, trial, result, **info):
        step = int(result.get("epoch", result.get("training_iteration", 0)))
        # per epoch: val_acc and loss; with the last epoch also the final metrics
        tags = {NODE_ID: result["node_id"]} if result.get("node_id") and step <= 1 else None
        metrics = {k: result.get(k) for k in ("loss", *FINAL_METRICS)}
        self._submit(self._result, trial.trial_id, metrics, tags, step, int(time.time() * 1000))

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._submit(self._complete, trial.trial_id, dict(trial.last_result or {}), self._wall(trial))

    def on_trial_error(self, iteration, trials, trial, **info):
        self._submit(self._failed, trial.trial_id, trial_error(trial), self._wall(trial))

    def _wall(self, trial) -> dict[str, float]:
        started = self._started.pop(trial.trial_id, None)
        return {"trial_wall_s": time.time() - started} if started is not None else {}

    # ---- the store, on the writer thread

    def _find(self, trial_id: str):
        runs = self.mlflow.search_runs(
            [self.experiment_id], f"tags.`{PARENT}` = '{self.parent}' and tags.`{TRIAL_ID}` = '{trial_id}'"
        )
        return runs[0] if runs else None

    def _start(self, trial_id: str, config: dict) -> None:
        old = self._find(trial_id)
        if old is not None:
            if old.info.status == "FINISHED" and (Path(self.completed_dir) / f"{trial_id}.json").is_file():
                # completed just before an interruption, after Tune's last snapshot: the
                # trial replays its recorded final report (see search.run_trial); log nothing
                self._runs[trial_id] = old.info.run_id
                self._logged.add(trial_id)
                return
            # run again from scratch after an interruption: replace its run, so no epoch
            # is logged twice and MLflow shows the outcome of this run
            self.mlflow.delete_run(old.info.run_id)
        run = self.mlflow.create_run(
            self.experiment_id,
            run_name=f"trial {trial_id}",
            tags={PARENT: self.parent, ROLE: "trial", TRIAL_ID: trial_id, "ray.trial_id": trial_id},
        )
        run_id = run.info.run_id
        self._runs[trial_id] = run_id
        params = flat_params("", config.get("policy", {}))
        if "budget_fraction" in config:
            params["budget_fraction"] = str(config["budget_fraction"])
        if "space_error" in config:
            params["space_error"] = str(config["space_error"])[:MAX_PARAM]
        log(self.mlflow, run_id, params=params)
        self.mlflow.log_dict(run_id, config.get("policy", {}), "policy.json")

    def _run_id(self, trial_id: str) -> str | None:
        if trial_id in self._logged:
            return None
        if trial_id not in self._runs:
            run = self._find(trial_id)
            if run is None:
                return None
            self._runs[trial_id] = run.info.run_id
        return self._runs[trial_id]

    def _result(self, trial_id: str, metrics: dict, tags: dict | None, step: int, at_ms: int) -> None:
        run_id = self._run_id(trial_id)
        if run_id is not None:
            log(self.mlflow, run_id, metrics, tags=tags, step=step, at_ms=at_ms)

    def _complete(self, trial_id: str, result: dict, wall: dict) -> None:
        run_id = self._run_id(trial_id)
        if run_id is None:
            return
        final = result.get("flops_ratio") is not None  # else stopped early by the scheduler
        # (the per-group ratio charts are drawn once, when the search ends: ratio_charts)
        ratios = {f"ratio.{k}": f"{v:.4f}" for k, v in (result.get("ratios") or {}).items()}
        self._end(run_id, "FINISHED", wall, ratios, {"autoprune.stopped_early": str(not final).lower()})
        if final:  # after the run is FINISHED: a resume replays only what the store has
            save_final(self.completed_dir, trial_id, result)

    def _failed(self, trial_id: str, message: str, wall: dict) -> None:
        run_id = self._run_id(trial_id)
        if run_id is None:
            return
        self.mlflow.log_text(run_id, message + "\n", "error.txt")
        self._end(run_id, "FAILED", wall, {}, {"autoprune.error": message[:MAX_PARAM]})

    def _end(self, run_id: str, status: str, wall: dict, params: dict[str, str], tags: dict[str, str]) -> None:
        log(self.mlflow, run_id, wall, params, tags)
        self.mlflow.set_terminated(run_id, status=status)


_WRITERS: set[TrialLogger] = set()  # loggers with a writer thread, for close_writers


def close_writers() -> None:
    """Let every trial logger's writer finish (after ``Tuner.fit``, also when it was
    interrupted: the logger of a restored Tuner is Tune's own copy)."""
    for writer in list(_WRITERS):
        writer.close()


def save_final(folder: str, trial_id: str, result: dict) -> None:
    """A completed trial's final report, kept so that a resumed search can replay it."""
    from .search import REPORTED

    path = Path(folder) / f"{trial_id}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({k: result[k] for k in REPORTED if k in result}))
    tmp.replace(path)


def ratio_charts(mlflow, records: list[dict]) -> None:
    """The per-group ratio bar chart of every completed trial, on its child run."""
    for r in records:
        if r["status"] == "completed" and r["run_id"] and r["ratios"]:
            mlflow.log_figure(r["run_id"], ratio_chart(r["ratios"], f"trial {r['trial_id']}"), "ratios.png")


def load_finals(folder: str) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in Path(folder).glob("*.json")}


# ------------------------------------------------------------------ plots


def _figure(width: float, height: float):
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def ratio_chart(ratios: dict[str, float], title: str):
    """Horizontal bars: the pruned fraction of every group (or layer)."""
    fig = _figure(7, max(2.5, 0.28 * len(ratios) + 1))
    ax = fig.subplots()
    names = list(ratios)
    ax.barh(range(len(names)), [ratios[n] for n in names], color="#4c72b0")
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("pruned fraction")
    ax.set_title(title)
    return fig


def scatter_chart(records: list[dict], front: list[str], budget: float, kind: str, dense_acc: float):
    """Validation accuracy against the kept cost fraction of every completed trial, with the
    Pareto front (higher accuracy, lower cost) joined and marked."""
    fig = _figure(7, 4.5)
    ax = fig.subplots()
    done = [r for r in records if r["status"] == "completed"]
    key = f"{kind}_ratio"
    ax.scatter(
        [r["metrics"][key] for r in done],
        [100 * r["metrics"]["val_acc"] for r in done],
        c="#999999",
        s=22,
        label="trial",
    )
    pts = sorted((r["metrics"][key], 100 * r["metrics"]["val_acc"]) for r in done if r["trial_id"] in front)
    if pts:
        ax.plot(*zip(*pts), "o-", color="#c44e52", ms=6, label="Pareto front")
    ax.axvline(budget, color="#55a868", ls="--", lw=1, label=f"budget {budget:g}")
    ax.axhline(100 * dense_acc, color="#4c72b0", ls=":", lw=1, label="dense")
    ax.set_xlabel(f"{'FLOPs' if kind == 'flops' else 'parameters'} kept (fraction of dense)")
    ax.set_ylabel("validation accuracy (%)")
    ax.legend(fontsize=8)
    return fig


def criteria_chart(records: list[dict]):
    """Per criterion: every completed trial's validation accuracy (dots) and the best (bar)."""
    fig = _figure(7, 4)
    ax = fig.subplots()
    by: dict[str, list[float]] = {}
    for r in records:
        if r["status"] == "completed":
            by.setdefault(r["policy"].get("criterion", "?"), []).append(100 * r["metrics"]["val_acc"])
    names = sorted(by, key=lambda n: -max(by[n]))
    ax.bar(range(len(names)), [max(by[n]) for n in names], color="#dddddd", label="best")
    for i, n in enumerate(names):
        ax.scatter([i] * len(by[n]), by[n], color="#4c72b0", s=16, zorder=3)
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_ylabel("validation accuracy (%)")
    if by:
        low = min(min(v) for v in by.values())
        ax.set_ylim(max(0.0, low - 2), 100.5)
    ax.set_title("criteria compared (completed trials)")
    return fig


def drop_unfinished(uri: str, experiment_id: str, parent: str, known: set[str]) -> int:
    """Before a resume: delete the child runs an interrupted search left RUNNING (their
    trials run again from the start under fresh runs, so no epoch is logged twice), and the
    runs of trials Tune's last snapshot does not know (``known``: they will not be resumed;
    new trials take their place)."""
    mlflow = client(uri)
    stale = [
        r
        for tid, r in trial_runs(uri, experiment_id, parent).items()
        if r.info.status not in ("FINISHED", "FAILED") or tid not in known
    ]
    for run in stale:
        mlflow.delete_run(run.info.run_id)
    return len(stale)
