"""Driver loop capacity: trial reports per second the search driver sustains, with and without
its MLflow writer, and the cost of Tune's experiment snapshots and of their sync to storage.

Tune's loop in the driver handles every report in turn (a trial waits in ``tune.report`` until
its report is handled); autoprune's callbacks run on it, its MLflow writer on a thread beside it.
Trials that do no work report ``--reports`` times (an autoprune trial's keys) through the driver
as ``autoprune search`` builds it (local Ray, the runner's Tuner settings and callbacks, the
default searcher's class and sampler, a snapshot every second; the Tuner is built here, as the
runner's ``_tuner`` needs a task, a dense model and a plan). Arms, interleaved over ``--rounds``
after a warm-up: ``tune`` (no MLflow writer), ``sqlite`` (autoprune's TrialLogger, SQLite),
``http`` (the same to ``mlflow server`` on 127.0.0.1), ``sqlite-nolog`` (``sqlite`` with
``TUNE_DISABLE_AUTO_CALLBACK_LOGGERS=1``: no per-trial result files). Ray's internals are timed
by wrapping them here. Then one sync of a snapshot folder (Ray's ``_upload_to_fs_path``, what
each snapshot runs), trial folders copied up to ``--sync-trials``, to a folder and to moto's S3
server, counting its requests.

Run: ``PYTHONPATH=bench python bench/driver_loop.py`` (about 8 minutes on 2 busy cores).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import timeit
import urllib.request
from pathlib import Path
from unittest import mock

import _page

from autoprune.rayenv import quiet_environment

quiet_environment()  # before ray: autoprune's settings (token auth, a snapshot every second)
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # two lines per run ended over http
from ray import tune  # noqa: E402

ARMS = ("tune", "sqlite", "http", "sqlite-nolog")
RECORD: dict[str, list] = collections.defaultdict(list)  # what the probes saw in the current run
LOCAL_RAY = dict(address="local", include_dashboard=False, log_to_driver=False, logging_level="ERROR")


def reporter(config: dict, reports: int, pause: float, groups: int) -> None:
    """A trial that does nothing but report, with the keys (and the final report) of an autoprune
    trial; each report carries how long the trial waited in the previous ``tune.report``."""
    node, waited = "bench-node", None
    cost = {"flops": 1e8, "params": 1e6, "flops_ratio": 0.5, "params_ratio": 0.5, "latency_predicted_ms": 1.0}
    for epoch in range(1, reports + 1):
        time.sleep(pause)
        row = {"epoch": epoch, "val_acc": epoch / reports, "val_loss": 1.0 / epoch, "loss": 1.0 / epoch}
        row.update(node_id=node, report_wait_s=waited, **cost)
        if epoch == reports:
            row.update(predicted_speedup=2.0, latency_measured_ms=1.0, engine_s=0.0, report_s=0.0, final=True)
            row["ratios"] = {f"g{i}": 0.5 for i in range(groups)}
        t = time.perf_counter()
        tune.report(row)
        waited = time.perf_counter() - t


class Probe(tune.Callback):
    """Notes when each report reached the loop (wall and the driver's CPU clock) and when trials end."""

    def on_trial_result(self, iteration, trials, trial, result, **info):
        RECORD["reports"].append((time.perf_counter(), time.process_time(), time.thread_time(), trial.trial_id))
        if result.get("report_wait_s") is not None:
            RECORD["waits"].append(result["report_wait_s"])

    def on_trial_complete(self, iteration, trials, trial, **info):
        RECORD["ends"].append(time.perf_counter())


@contextlib.contextmanager
def timers():
    """Times Tune's handling of each report, each snapshot and, at the end, the wait for the MLflow
    writer to drain (the TrialLogger's on_experiment_end), by wrapping them."""
    from ray.tune.execution.tune_controller import TuneController as Loop

    from autoprune.search.callback import TrialLogger

    targets = [(Loop, "_on_training_result", "handle"), (Loop, "save_to_dir", "save")]
    targets.append((TrialLogger, "on_experiment_end", "drain"))
    saved = [getattr(owner, name) for owner, name, _ in targets]

    def timed(key, fn):
        def call(*args, **kwargs):
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                RECORD[key].append(time.perf_counter() - t)

        return call

    for (owner, name, key), fn in zip(targets, saved):
        setattr(owner, name, timed(key, fn))
    try:
        yield
    finally:
        for (owner, name, _), fn in zip(targets, saved):
            setattr(owner, name, fn)


def searcher(args, seed: int):
    """The default searcher's class and sampler settings (``searchers._tpe``) over ``--groups`` floats."""
    import optuna

    from autoprune.contract import TrialConfig
    from autoprune.search.searchers import PolicyOptunaSearch

    def space(trial):
        ratios = {f"g{i}": trial.suggest_float(f"g{i}", 0.0, 0.9) for i in range(args.groups)}
        return TrialConfig({"ratios": ratios}).to_config()

    startup = min(10, max(2, args.trials // 3))  # as searchers._tpe
    sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup, constant_liar=True)
    return PolicyOptunaSearch(space=space, metric="val_acc", mode="max", sampler=sampler)


def run(arm: str, args, root: Path, uris: dict[str, str], seed: int) -> tuple[dict, Path]:
    """One search-shaped Tune run of ``arm``: its figures and Tune's experiment folder."""
    from autoprune.search.callback import TrialLogger, close_writers
    from autoprune.search.progress import ClusterWatch, ProgressLine
    from autoprune.tracking import store

    folder = Path(tempfile.mkdtemp(prefix=f"{arm}-", dir=root))
    callbacks = [ProgressLine(args.trials, False), ClusterWatch(1, 0, 60.0)]
    uri = uris.get(arm.removesuffix("-nolog"))
    if uri:
        experiment_id, run_id = store.open_search_run(uri, folder.name, {}, False)
        callbacks.insert(0, TrialLogger(uri, experiment_id, run_id, str(folder)))
    trial = tune.with_parameters(reporter, reports=args.reports, pause=args.pause, groups=args.groups)
    trainable = tune.with_resources(trial, {"cpu": 1})
    loggers = {"TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1" if arm.endswith("-nolog") else "0"}  # read by fit
    # as the runner's _tuner: no scheduler (the default searcher's), actors reused, one failure ends a trial
    slots = dict(num_samples=args.trials, max_concurrent_trials=args.concurrency, reuse_actors=True)
    config = tune.TuneConfig(search_alg=searcher(args, seed), metric="val_acc", mode="max", **slots)
    failure, keep = tune.FailureConfig(max_failures=0, fail_fast=False), tune.CheckpointConfig(num_to_keep=1)
    where = dict(name="tune", storage_path=str(folder), verbose=0, failure_config=failure, checkpoint_config=keep)
    where["callbacks"] = [*callbacks, Probe()]
    tuner = tune.Tuner(trainable, tune_config=config, run_config=tune.RunConfig(**where))
    RECORD.clear()
    t0 = time.perf_counter()
    try:
        with mock.patch.dict(os.environ, loggers):
            tuner.fit()
    finally:
        close_writers()
    state = sum(f.stat().st_size for f in (folder / "tune").iterdir() if f.is_file())  # the experiment's own files
    return figures(args, dict(RECORD), time.perf_counter() - t0, state), folder / "tune"


def figures(args, rec: dict, wall_s: float, state_bytes: int) -> dict:
    """A run's figures; rates over its steady window: every slot has reported, as many trials left as slots."""
    reports = sorted(rec["reports"])
    firsts = sorted({tid: t for t, *_, tid in reversed(reports)}.values())
    start = firsts[min(args.concurrency, len(firsts)) - 1]
    ends = sorted(rec["ends"])
    stop = ends[max(0, len(ends) - args.concurrency)]
    inside = [clocks for *clocks, _ in reports if start < clocks[0] <= stop]
    if len(inside) < 2:
        raise SystemExit("the steady window holds under 2 reports: raise --trials or --reports")
    n, (span, cpu, loop) = len(inside) - 1, (b - a for a, b in zip(inside[0], inside[-1]))
    handle, waits, saves = ([1000 * v for v in rec[k]] for k in ("handle", "waits", "save"))
    return {  # column: (value, format)
        "reports/s": (n / span, "{:.1f}"),
        "loop ms/report": (1000 * span / n, "{:.2f}"),
        "driver CPU ms/report": (1000 * cpu / n, "{:.2f}"),
        "loop CPU ms/report": (1000 * loop / n, "{:.2f}"),
        "handling ms": (statistics.median(handle), "{:.2f}"),
        "handling p90 ms": (statistics.quantiles(handle, n=10)[-1], "{:.2f}"),
        "round trip ms": (statistics.median(waits), "{:.1f}"),
        "snapshot ms": (statistics.median(saves), "{:.0f}"),
        "last snapshot ms": (saves[-1], "{:.0f}"),  # the final one, every trial in it
        "state KiB/trial": (state_bytes / 1024 / args.trials, "{:.1f}"),
        "snapshots/s": (len(saves) / wall_s, "{:.2f}"),
        "writer drain s": (sum(rec.get("drain", ())), "{:.2f}"),
    }


@contextlib.contextmanager
def mlflow_server(root: Path):
    """``mlflow server`` on 127.0.0.1 (one worker, SQLite, no job runners): its URI and a wait for it."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [str(Path(sys.executable).with_name("mlflow")), "server", "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--backend-store-uri", f"sqlite:///{root / 'server.db'}", "--workers", "1", "--artifacts-destination", root]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with open(root / "server.log", "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=root, env=env, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"

    def ready() -> None:  # called later: the server starts while Ray does
        for _ in range(240):
            with contextlib.suppress(OSError), urllib.request.urlopen(uri + "/health", timeout=2):
                return
            if proc.poll() is not None:
                raise SystemExit(f"mlflow server exited: {(root / 'server.log').read_text(errors='replace')[-2000:]}")
            time.sleep(0.5)
        raise SystemExit("mlflow server did not answer /health within 120 s")

    try:
        yield uri, ready
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


@contextlib.contextmanager
def counting_s3():
    """moto's S3 server on 127.0.0.1 with its credentials in the environment: yields a function
    from a path to its bucket URI, and the requests it answered (by method)."""
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
    from werkzeug.serving import make_server

    app, counts = DomainDispatcherApplication(create_backend_app), collections.Counter()

    def counted(environ, start_response):
        counts[environ["REQUEST_METHOD"]] += 1
        return app(environ, start_response)

    quiet = type("Quiet", (MotoRequestHandler,), {"log_request": lambda *args: None})  # no line per request
    server = make_server("127.0.0.1", 0, counted, threaded=True, request_handler=quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    endpoint = "http://{}:{}".format(*server.server_address[:2])
    keys = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}
    try:
        with mock.patch.dict(os.environ, keys):
            yield (lambda path: f"s3://bench/{path}?endpoint_override={endpoint}&allow_bucket_creation=true"), counts
    finally:
        server.shutdown()


def widened(experiment: Path, trials: int, into: Path) -> Path:
    """A copy of an experiment folder, its trial folders copied (new names) up to ``trials`` of them."""
    shutil.copytree(experiment, into)
    own = sorted(p for p in into.iterdir() if p.is_dir())
    for i in range(len(own), trials):
        shutil.copytree(own[i % len(own)], into / f"{own[i % len(own)].name}_copy{i}")
    return into


def sync_costs(experiment: Path, trials: int, root: Path, repeats: int) -> list[dict]:
    """One sync of the snapshot folder (Ray's ``_upload_to_fs_path``) to a folder and to S3:
    files, bytes, seconds (median of ``repeats``) and S3 requests per sync."""
    import pyarrow.fs
    from ray.train._internal.storage import _upload_to_fs_path, get_fs_and_path

    out = []
    for n in sorted({sum(p.is_dir() for p in experiment.iterdir()), trials}):  # as run, and widened
        src = widened(experiment, n, root / f"snapshot-{n}")
        files = [p for p in src.rglob("*") if p.is_file()]
        row = {"trials": n, "files": len(files), "kib": sum(p.stat().st_size for p in files) / 1024}
        local = pyarrow.fs.LocalFileSystem()
        sync = functools.partial(_upload_to_fs_path, str(src), local, str(root / f"copy-{n}"))
        row["folder_s"] = statistics.median(timeit.repeat(sync, number=1, repeat=repeats))
        with counting_s3() as (uri, counts):
            fs, path = get_fs_and_path(uri(f"search-{n}/tune"))
            sync = functools.partial(_upload_to_fs_path, str(src), fs, path)
            sync()  # the bucket and folders exist from here on, as in a search
            counts.clear()
            row["s3_s"] = statistics.median(timeit.repeat(sync, number=1, repeat=repeats))
            row["requests"] = {k: v // repeats for k, v in counts.items()}
            row["total"] = sum(row["requests"].values())
        out.append(row)
    return out


def _mid(values: list[float], fmt: str = "{:.1f}") -> str:  # median (min-max)
    return f"{fmt.format(statistics.median(values))} ({fmt.format(min(values))}-{fmt.format(max(values))})"


def loop_table(results: dict[str, list[dict]]) -> str:
    """Each arm's figures: median (min-max) over the rounds."""
    columns = list(next(iter(results.values()))[0])
    rows = [[arm] + [_mid([r[c][0] for r in runs], runs[0][c][1]) for c in columns] for arm, runs in results.items()]
    return _page.table(["arm", *columns], rows, "l" + "r" * len(columns))


def sync_rows(rows: list[dict], label: str) -> list[list[str]]:  # the table rows of sync_costs' results
    return [
        [label, r["trials"], r["files"], f"{r['kib']:.0f}", f"{1000 * r['folder_s']:.0f}", f"{1000 * r['s3_s']:.0f}"]
        + [r["total"], ", ".join(f"{k} {v}" for k, v in sorted(r["requests"].items()))]
        for r in rows
    ]


def measure(args, root: Path) -> tuple[dict[str, list[dict]], dict[str, Path]]:
    """The warm-up run, then ``--rounds`` rounds of every arm, the order turning each round: the
    figures of each arm's runs, and the experiment folder of its last run."""
    import ray

    from autoprune.rayenv import private_temp_dir
    from autoprune.search.ray_connection import no_usage_server, stop

    results: dict[str, list[dict]] = {arm: [] for arm in args.arms}
    folders: dict[str, Path] = {}
    with contextlib.ExitStack() as stack:
        uris = {"sqlite": f"sqlite:///{root / 'mlflow.db'}"}
        if "http" in args.arms:
            uris["http"], ready = stack.enter_context(mlflow_server(root))
        with no_usage_server():
            ray.init(**LOCAL_RAY, num_cpus=args.concurrency, _temp_dir=private_temp_dir())
        stack.callback(stop)
        if "http" in args.arms:
            ready()
        stack.enter_context(timers())
        run(args.arms[0], args, root, uris, seed=0)  # warm-up: worker start-up, imports, the store's schema
        for r in range(args.rounds):
            for i in range(len(args.arms)):
                arm = args.arms[(i + r) % len(args.arms)]
                got, folders[arm] = run(arm, args, root, uris, seed=r + 1)
                results[arm].append(got)
                print(f"  round {r + 1} {arm}: {got['reports/s'][0]:.1f} reports/s", flush=True)
    return results, folders


def _protocol(args) -> str:
    return (
        f"Local Ray, {args.concurrency} CPU slots. Each run: {args.trials} trials, {args.concurrency} at a time "
        f"(actors reused), each sleeping {args.pause:g} s before each of its {args.reports} reports, doing nothing "
        "else; the Tuner with `autoprune search`'s settings and callbacks, the default searcher's class and sampler "
        f"(PolicyOptunaSearch, TPE, constant liar) over {args.groups} floats, a Tune snapshot every "
        f"{os.environ['TUNE_GLOBAL_CHECKPOINT_S']} s. A warm-up run, then {args.rounds} round(s) of the arms "
        f"{_page.listing(args.arms)}, their order turning each round. Over the steady window (every slot has "
        "reported; as many trials left as slots): reports/s, its inverse (loop ms/report), the CPU time per report "
        "of the driver process (all threads) and of the loop's thread. Over the run: Tune's handling of a report "
        "(`_on_training_result`, callbacks included), the trials' round trip in `tune.report`, each snapshot "
        "(`save_to_dir`: trial states, searcher, callbacks), the wait for the MLflow writer to drain at the end. The "
        "experiment's own files (state, searcher) per trial. Sync: Ray's `_upload_to_fs_path` of the last `sqlite` "
        f"and `sqlite-nolog` runs' experiment folders, their trial folders copied up to {args.sync_trials}, to a "
        f"folder and to moto's S3 server (median of {args.sync_repeats})."
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concurrency", type=int, default=8, help="trials at a time (CPU slots of the local Ray)")
    ap.add_argument("--trials", type=int, default=32, help="trials per run")
    ap.add_argument("--reports", type=int, default=10, help="reports per trial (an autoprune trial: one per epoch)")
    ap.add_argument("--pause", type=float, default=0.001, help="seconds a trial sleeps before each report")
    ap.add_argument("--groups", type=int, default=10, help="floats in the searched space (channel groups)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS))
    ap.add_argument("--sync-trials", type=int, default=100, help="trial folders in the widened snapshot")
    ap.add_argument("--sync-repeats", type=int, default=3)
    _page.add_arguments(ap)
    args = ap.parse_args()
    page = _page.Page(__file__, "Driver loop: reports per second, snapshots and their sync", args)
    root = Path(tempfile.mkdtemp(prefix="autoprune-bench-loop-"))
    try:
        results, folders = measure(args, root)
        runs = [arm for arm in ("sqlite", "sqlite-nolog") if arm in folders]  # with and without Tune's trial files
        syncs = {arm: sync_costs(folders[arm], args.sync_trials, root / arm, args.sync_repeats) for arm in runs}
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"\nmachine: {_page.machine()}")
    page.show(f"\nMedian of {args.rounds} round(s), range in brackets:\n", loop_table(results))
    rows = [row for arm, got in syncs.items() for row in sync_rows(got, arm)]
    if rows:
        head = ["folder of", "trials", "files", "KiB", "folder ms", "S3 ms", "S3 requests", "by method"]
        page.show("\nOne sync of a snapshot's folder (median of the syncs):\n", _page.table(head, rows, "lrrrrrrl"))
    page.show("\n" + summary(results, syncs))
    page.write(_protocol(args))


def summary(results: dict[str, list[dict]], syncs: dict[str, list[dict]]) -> str:
    """The sentences: each arm's rate, and what its CPU time per report would let a driver with a
    core of its own handle; each sync's S3 requests per trial folder and besides."""
    med = {arm: {c: statistics.median(r[c][0] for r in runs) for c in runs[0]} for arm, runs in results.items()}
    cpu = "driver CPU ms/report"
    said = [f"{a} {m['reports/s']:.0f} here, ~{1000 / m[cpu]:.0f} on a core of its own" for a, m in med.items()]
    text = f"Reports per second (medians): {'; '.join(said)} (1000 / the driver's CPU ms per report)."
    for arm, (small, *large) in syncs.items():
        for big in large:
            per = (big["total"] - small["total"]) / (big["trials"] - small["trials"])
            text += (
                f" A sync of the {arm} run's folder: {per:.1f} S3 requests per trial folder and "
                f"{small['total'] - per * small['trials']:.0f} besides; at {big['trials']} trials {big['total']} "
                f"requests, {big['s3_s']:.1f} s to the local S3 server."
            )
    return text


if __name__ == "__main__":
    main()
