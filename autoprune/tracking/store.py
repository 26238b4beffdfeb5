"""The MLflow store of a search: its URI (checked before Ray starts), the experiment, the
parent *search run*, child-run look-ups and batched logging. Imports neither Ray nor torch."""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from ..errors import AutopruneError

ROLE = "autoprune.role"  # "search" (the parent run) or "trial"
TRIAL_ID = "autoprune.trial_id"  # the Ray Tune trial id of a child run
NUMBER = "autoprune.trial_number"  # the order the trials started in, from 1 (the run name's "#7")
NODE_ID = "autoprune.node_id"
BASELINE = "autoprune.baseline"  # on a baseline trial's run: "uniform" or "global" (search.baselines)
BEST = "autoprune.best"  # "true" on the child run of the trial the search picked
BEST_RUN_ID = "autoprune.best_run_id"  # on the search run: that child run
BEST_TRIAL_ID = "autoprune.best_trial_id"  # on the search run: its Ray Tune trial id
PARENT = "mlflow.parentRunId"
NOTE = "mlflow.note.content"  # a run's description in the UI (markdown)
ERROR = "autoprune.error"  # on a FAILED run: what failed, one line
MAX_PARAM = 6000  # MLflow's limit on a param value's length
# the settings of a search that say nothing about its result: not logged as params
SEARCH_NOISE = ("progress", "engine.progress", "storage", "resume", "tracking_uri")
HEALTH_TIMEOUT_S = 5.0  # how long a tracking server's health check may take


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
    from ..paths import check_output_dir

    scheme = uri.partition("://")[0].partition("+")[0] if "://" in uri else ""  # postgresql+psycopg2: postgresql
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
    elif scheme in ("postgresql", "mysql", "mssql"):
        _check_driver(uri, scheme)
    elif scheme == "file":
        if os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() != "true":
            raise AutopruneError(
                f"--tracking-uri {uri!r} is an MLflow file store, which MLflow 3 refuses (maintenance mode); use "
                "sqlite:///path/mlflow.db, or set MLFLOW_ALLOW_FILE_STORE=true to use it anyway"
            )
        check_output_dir(urllib.request.url2pathname(uri[len("file://") :]), "--tracking-uri")


_DRIVERS = {"psycopg": "psycopg[binary]", "psycopg2": "psycopg2-binary", "MySQLdb": "mysqlclient"}  # module: package


def _check_driver(uri: str, scheme: str) -> None:
    """A database store needs its Python driver, which MLflow does not install; without it
    MLflow fails only once the search has started."""
    import sqlalchemy

    try:
        url = sqlalchemy.engine.make_url(uri)
        url.get_dialect().import_dbapi()
    except ImportError as exc:
        driver = str(getattr(exc, "name", None) or exc)
        package = _DRIVERS.get(driver.partition(".")[0], driver)
        raise AutopruneError(
            f"--tracking-uri {_shown(uri)!r} needs the {scheme} driver {driver!r}, which is not installed: "
            f"pip install {package!r}, or use sqlite:///path/mlflow.db"
        ) from None
    except (sqlalchemy.exc.ArgumentError, ValueError) as exc:
        raise AutopruneError(f"--tracking-uri {_shown(uri)!r} is not a database URI ({exc})") from None


def _shown(uri: str) -> str:
    """A database URI without its password."""
    import sqlalchemy

    try:
        return sqlalchemy.engine.make_url(uri).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - shown as given
        return uri


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


def tracking_down(uri: str) -> bool:
    """Whether the tracking store ``uri`` is an MLflow server that does not answer its health
    check now (an error from a store that answers is an error, not a wait)."""
    if not uri.startswith(("http://", "https://")):
        return False
    import urllib.request

    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=HEALTH_TIMEOUT_S) as reply:
            return reply.status != 200
    except Exception:  # noqa: BLE001 - refused, reset, timed out, an error page: not answering
        return True


def client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _artifact_location(uri: str, name: str) -> str | None:
    """Artifacts of a SQLite store live beside the database (absolute, whatever the cwd);
    a server decides for itself."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///") :]).parent / "mlartifacts" / name).as_uri()
    return None


def param_value(value: Any) -> str:
    """A value as a param's text: floats to 4 significant digits, booleans as ``true`` /
    ``false``, lists as JSON."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return json.dumps([float(param_value(v)) if isinstance(v, float) else v for v in value])[:MAX_PARAM]
    return str(value)[:MAX_PARAM]


SIGNIFICANT = 4  # digits a metric keeps in the store: 0.9896, not 0.98958333 (counts stay whole)


def rounded(value: float) -> float:
    """A metric's value as the store keeps it: whole numbers as they are, others rounded to
    :data:`SIGNIFICANT` digits (more would be noise on a validation split, and crowd the UI)."""
    value = float(value)
    if not math.isfinite(value) or value.is_integer():
        return value
    return float(f"{value:.{SIGNIFICANT}g}")


def flat_params(prefix: str, data: Any, skip: tuple[str, ...] = ()) -> dict[str, str]:
    """Nested config -> flat MLflow params (``finetune.lr``), values as text (see
    :func:`param_value`). Nothing is logged for None, an empty list or a key in ``skip``."""
    if prefix in skip:
        return {}
    if isinstance(data, dict):
        out: dict[str, str] = {}
        for key, value in data.items():
            out.update(flat_params(f"{prefix}.{key}" if prefix else str(key), value, skip))
        return out
    if data is None or (isinstance(data, (list, tuple)) and not data):
        return {}
    return {prefix: param_value(data)}


def search_experiments(uri: str, limit: int = 5) -> list[tuple[str, str]]:
    """(experiment id, name) of the experiments in the store that hold an autoprune search
    run, the newest search first."""
    mlflow = client(uri)
    ids = [e.experiment_id for e in mlflow.search_experiments(max_results=1000)]
    found: dict[str, str] = {}
    for start in range(0, len(ids), 100):
        runs = mlflow.search_runs(
            ids[start : start + 100],
            f"tags.`{ROLE}` = 'search'",
            max_results=1000,
            order_by=["attributes.start_time DESC"],
        )
        for run in runs:
            found.setdefault(run.info.experiment_id, run.info.start_time)
    newest = sorted(found, key=lambda e: -found[e])[:limit]
    return [(e, mlflow.get_experiment(e).name) for e in newest]


def log(
    mlflow,
    run_id: str,
    metrics: dict[str, Any] | None = None,
    params: dict[str, str] | None = None,
    tags: dict[str, str] | None = None,
    step: int = 0,
    at_ms: int | None = None,
    once: dict[str, Any] | None = None,
) -> None:
    """Metrics (numbers only, :func:`rounded`) at ``step``, ``once``: single-value metrics at step 0 (so the UI
    shows them as values, not as one-point series at the last epoch), params and tags, in as
    few store transactions as MLflow allows (per batch: 1000 metrics, 100 params, 100 tags)."""
    from mlflow.entities import Metric, Param, RunTag

    now = at_ms if at_ms is not None else int(time.time() * 1000)

    def numbers(values: dict[str, Any] | None, at: int) -> list:
        return [
            Metric(k, rounded(v), now, at)
            for k, v in (values or {}).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)
        ]

    ms = numbers(metrics, step) + numbers(once, 0)
    ps = [Param(k, v) for k, v in (params or {}).items()]
    ts = [RunTag(k, v) for k, v in (tags or {}).items()]
    while ms or ps or ts:
        mlflow.log_batch(run_id, metrics=ms[:1000], params=ps[:100], tags=ts[:100])
        ms, ps, ts = ms[1000:], ps[100:], ts[100:]


def open_search_run(
    uri: str, name: str, params: dict[str, str], resume: bool, view: dict | None = None
) -> tuple[str, str]:
    """(experiment id, parent run id). A resumed search reuses its experiment and run. The
    runs table's ``view`` of the trials (:func:`.view.trials_view`) is what :func:`.view.runs_link`
    opens."""
    from .view import set_view

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
    if view is not None:
        set_view(mlflow, experiment_id, view)
    if resume:
        runs = mlflow.search_runs([experiment_id], f"tags.`{ROLE}` = 'search'", max_results=1)
        if runs:
            mlflow.update_run(runs[0].info.run_id, status="RUNNING")
            return experiment_id, runs[0].info.run_id
    run = mlflow.create_run(experiment_id, run_name=name, tags={ROLE: "search"})
    log(mlflow, run.info.run_id, params=params)
    return experiment_id, run.info.run_id


def end_search_run(uri: str, run_id: str, status: str, error: str | None = None) -> None:
    """End the search run ``run_id`` with ``status`` (FAILED, KILLED) unless it has ended
    already; a failure's one-line reason goes into its ``autoprune.error`` tag and its
    description."""
    mlflow = client(uri)
    if mlflow.get_run(run_id).info.status != "RUNNING":
        return
    if error:
        mlflow.set_tag(run_id, ERROR, error[:MAX_PARAM])
        mlflow.set_tag(run_id, NOTE, f"**{status}**: {error}")
    mlflow.set_terminated(run_id, status=status)


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


def end_trial_runs(uri: str, experiment_id: str, parent: str, status: str) -> int:
    """End the child runs of ``parent`` still RUNNING with ``status`` (the search stopped
    under them); how many."""
    mlflow = client(uri)
    running = [r for r in trial_runs(uri, experiment_id, parent).values() if r.info.status == "RUNNING"]
    for run in running:
        mlflow.set_terminated(run.info.run_id, status=status)
    return len(running)


def keep_recorded(uri: str, experiment_id: str, parent: str, recorded: dict[str, str]) -> int:
    """Before a resume: the child runs of trials the search recorded (``recorded``: trial id ->
    ``completed``, ``stopped`` or ``failed``) are kept, ended as their record says if an
    interruption came between the record and the run's end; every other child run (a trial
    cut short: it runs again from the start, under a new run) is ended KILLED and deleted, so
    no epoch is logged twice. Returns how many were deleted."""
    mlflow = client(uri)
    deleted = 0
    for trial_id, run in trial_runs(uri, experiment_id, parent).items():
        status = recorded.get(trial_id)
        if status is not None:
            ended = "FAILED" if status == "failed" else "FINISHED"
            if run.info.status != ended:
                mlflow.set_terminated(run.info.run_id, status=ended)
            continue
        if run.info.status == "RUNNING":
            mlflow.set_terminated(run.info.run_id, status="KILLED")
        mlflow.delete_run(run.info.run_id)
        deleted += 1
    return deleted


SYSTEM_METRICS_S = 10.0  # how often the search run samples CPU, memory, disk, network (and GPU)


class SystemMetrics:
    """MLflow's system metrics (``system/cpu_utilization_percentage``, ...) of the search run,
    sampled on a thread from :meth:`start` until :meth:`stop` (which may be called twice).
    A monitor that cannot start is reported on stderr and the search goes on without it."""

    def __init__(self, uri: str, run_id: str, resume: bool = False) -> None:
        self.uri, self.run_id, self.resume = uri, run_id, resume
        self._monitor = None

    def start(self) -> SystemMetrics:
        import logging
        import sys

        # its INFO lines ("Started monitoring ...", "Skip logging GPU metrics") are not for users
        logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self._monitor = SystemMetricsMonitor(
                self.run_id,
                sampling_interval=SYSTEM_METRICS_S,
                samples_before_logging=1,
                resume_logging=self.resume,
                tracking_uri=self.uri,
            )
            self._monitor.start()
        except Exception as exc:  # noqa: BLE001 - a convenience: the search does not depend on it
            self._monitor = None
            print(f"warning: no system metrics for the search run ({type(exc).__name__}: {exc})", file=sys.stderr)
        return self

    def stop(self) -> None:
        monitor, self._monitor = self._monitor, None
        if monitor is None:
            return
        with contextlib.suppress(Exception):
            monitor.finish()
            # MLflow drops the samples taken since the last one it logged: log them, so a run
            # shorter than the sampling interval has its point too
            metrics = monitor.aggregate_metrics()
            if metrics:
                monitor.publish_metrics(metrics)
                monitor.mlflow_logger.flush()
