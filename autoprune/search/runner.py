"""``autoprune search``: the Ray Tune runner.

The driver checks everything cheap first (:mod:`.plan`), connects to Ray (:mod:`.ray_connection`:
a local instance sized to this machine, or ``--address``), gets the dense model once and puts it
with the data into Ray's object store once. Ray Tune then runs trials (:mod:`.trial`) proposed
by a registered searcher (:mod:`.searchers`); a callback in the driver logs every trial to
MLflow (:mod:`autoprune.tracking`). At the end the best policy is re-run from the dense model
for ``final_epochs``, tested once and saved (:mod:`.final`).
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from dataclasses import dataclass
from typing import Any

from ..config import SearchConfig
from ..contract import metric_mode
from ..errors import AutopruneError, first_line
from ..paths import check_free_space, is_uri, join, names, remove_dir, write_text
from ..rayenv import quiet_environment, snapshot_period
from . import remote
from .final import Finish, finish, short_metrics
from .hardware import node_tables, reachable, trial_latency_table
from .head import fit_watched, resume_command
from .journal import TRIALS, TUNE
from .lease import Lease
from .plan import STATE_FILE, Plan, check_latency_batch, prepare, resolve_metric, saved_settings, search_params
from .ranking import split_warning
from .ray_connection import concurrency, connect, stop
from .results import SearchResult, read_records
from .searchers import SEARCHERS, SearcherContext
from .trial import TrialSetup, run_trial
from .verdict import epochs_after_trials

INTERRUPTED_WAIT_S = 10.0  # a search that stops on an error or Ctrl-C waits this long for a silent tracking server


def run_search(config: SearchConfig) -> SearchResult:
    """Run (or ``resume``) a policy search; see the module docstring. The CLI wraps this."""
    t0 = time.time()
    quiet_environment()  # before anything imports ray
    plan = prepare(config)
    say = print
    from ..engine.tasks import get_task

    task = get_task(config.engine.task)  # a user task that fails does so before anything is written
    resolve_metric(plan, task)
    SEARCHERS.get(config.searcher).hooks().check_task(config, task)
    check_latency_batch(task, config)
    import ray

    from ..engine.threads import driver_threads, using_threads

    threads, why = driver_threads(None, config.cpus_per_trial)  # before this process loads the machine
    lease = Lease(plan.name, plan.path).take(say)  # one writer per name, until this search ends
    owned = not ray.is_initialized()  # a caller's own ray.init() is used as it is, and left running
    try:
        if owned and len(plan.finished) < plan.trials:  # a resume with no trial left needs no Ray
            connect(plan)
        say(f"dense training and the final runs here: {why}")
        with using_threads(threads):
            return _search(plan, say, t0, owned, task)
    finally:
        lease.release()
        if owned and ray.is_initialized():
            stop()  # stops the local instance (its session folder removed); only disconnects from a cluster


@dataclass(frozen=True, kw_only=True)
class Prepared:
    """What the driver makes ready before the search run opens: the model and its figures."""

    task: Any
    table: Any  # the dense model's engine.layers.LayerTable
    dense: Any  # the dense model
    dense_metrics: dict[str, Any]
    latency: Any  # the latency table on the trials' hardware (None: no predictions)
    trial_device: Any  # where the trials run (the final run times the model there too)
    floor: float  # the smallest budget fraction the policies can reach (a latency budget's)
    tables: dict[str, dict]  # hardware -> its table and the node it was built on (None: this machine)
    workers: int  # trials at a time


def _search(plan: Plan, say, t0: float, owned: bool, task) -> SearchResult:
    import ray

    from ..tracking import store
    from .callback import close_writers

    config = plan.config
    remote.reset()
    prep = _prepare(plan, say, task)
    saved = saved_settings(plan, prep.workers)
    params, view = search_params(plan, saved, prep.task.model_name)
    experiment_id, run_id = store.open_search_run(plan.tracking_uri, plan.name, params, config.resume, view)
    system_metrics = store.SystemMetrics(plan.tracking_uri, run_id, resume=config.resume).start()
    # From here on the search run is open: whatever ends the search also ends the run,
    # KILLED on an interruption and FAILED on an error, never left RUNNING.
    try:
        mlflow = store.client(plan.tracking_uri)
        if not SEARCHERS.get(config.searcher).agent:  # a sampler's space as a person reads it
            from autoprune.search_spaces import describe, get_space

            mlflow.log_dict(run_id, describe(get_space(config.space), prep.table), "search_space.json")
        # the dense latency follows at the end, timed beside the best model (one figure, summary.json's)
        dense = {f"dense_{k}": v for k, v in short_metrics(prep.dense_metrics).items() if k != "latency_measured_ms"}
        store.log(mlflow, run_id, once=dense)
        state = {"config": saved, "tracking_uri": plan.tracking_uri, "experiment_id": experiment_id, "run_id": run_id}
        write_text(join(plan.path, STATE_FILE), json.dumps(state, indent=2) + "\n")
        try:
            tuner = _tuner(plan, prep, experiment_id, run_id, say)
            if tuner is not None:
                fit_watched(plan, tuner, experiment_id, run_id, INTERRUPTED_WAIT_S)
            close_writers()
        except BaseException:
            if config.resume or has_records(plan.path):
                print(f"search {plan.name!r} interrupted; continue it with: {resume_command(plan)}", file=sys.stderr)
            raise
        records = read_records(plan.path, store.trial_runs(plan.tracking_uri, experiment_id, run_id))
        if owned and ray.is_initialized() and not plan.address:
            stop()  # before the final run: its latency is measured on an otherwise idle machine
        return finish(
            Finish(
                plan=plan,
                task=prep.task,
                dense=prep.dense.to(prep.trial_device),  # the final run times the model where the trials ran
                dense_metrics=prep.dense_metrics,
                records=records,
                experiment_id=experiment_id,
                run_id=run_id,
                say=say,
                t0=t0,
                system_metrics=system_metrics,
                latency=prep.latency,
                tables=prep.tables,
            )
        )
    except BaseException as exc:
        with contextlib.suppress(Exception):
            close_writers(INTERRUPTED_WAIT_S)  # what the trials reported before the interruption (the rest: --resume)
        system_metrics.stop()
        interrupted = isinstance(exc, KeyboardInterrupt)
        with contextlib.suppress(Exception):
            store.end_search_run(
                plan.tracking_uri, run_id, "KILLED" if interrupted else "FAILED", None if interrupted else _cause(exc)
            )
        with contextlib.suppress(Exception):  # trials cut short: not RUNNING (a resume runs them again)
            store.end_trial_runs(plan.tracking_uri, experiment_id, run_id, "KILLED")
        if not (config.resume or has_records(plan.path)):
            error = _before_first_record(plan, exc)
            if error is not None:
                raise error from exc
        raise


def _prepare(plan: Plan, say, task) -> Prepared:
    """The task, its layer table (and a grid searcher's grid), the dense model trained or
    loaded once and measured, and the latency tables of the hardware the trials run on."""
    from autoprune.search_spaces import get_space

    from .. import engine
    from ..engine.checkpoint import room_to_save
    from ..engine.layers import layer_table
    from ..engine.measure import device_name
    from .baselines import BASELINES

    config = plan.config
    table = layer_table(task, plan.structures)
    spec = SEARCHERS.get(config.searcher)
    if spec.needs_grid:
        plan.grid = get_space(config.space).grid(table)
        size = math.prod(len(v) for v in plan.grid.values())
        plan.trials = min(config.trials or size, size) + len(BASELINES)  # every cell, after the baselines
    elif config.trials is None:
        plan.trials = spec.default_trials(plan.trials, len(table.groups))
    import ray

    workers = concurrency(plan) if ray.is_initialized() else plan.config.concurrency or 1
    if spec.in_flight is not None and not config.concurrency and workers > spec.in_flight(plan.trials):
        workers = spec.in_flight(plan.trials)
        say(f"note: {workers} trials at a time, so that {config.searcher} learns from finished trials (--concurrency)")
    if remote.on_cluster(plan):
        say(f"dense model: on a cluster node with a trial's resources, or from that node's cache ({remote.need(plan)})")
    dense = remote.call(plan, "dense", engine.dense_model, task, config.engine, log=say)
    check_free_space(plan.out, room_to_save(dense), "--out")  # before the trials: the best model fits
    dense_metrics = engine.measure_model(dense, task, config.engine.measure, test=True)
    warning = split_warning(dense_metrics["val_acc"], len(task.val)) if plan.metric == "val_acc" else None
    if warning:
        say(warning)
    latency, trial_device, floor = trial_latency_table(dense, task, config, say)
    tables = {}
    if latency is not None:
        tables[device_name(trial_device)] = {"table": latency, "node_id": None}
        if plan.address and ray.is_initialized():  # each kind of hardware the nodes have; the budget must fit all
            found = node_tables(dense, task, config, say)
            floor = max([floor, *(reachable(t["table"], dense, task, config, name) for name, t in found.items())])
            tables.update(found)
    return Prepared(
        task=task,
        table=table,
        dense=dense,
        dense_metrics=dense_metrics,
        latency=latency,
        trial_device=trial_device,
        floor=floor,
        tables=tables,
        workers=workers,
    )


def _trial_setup(plan: Plan, prep: Prepared, experiment_id: str, run_id: str, hooks) -> TrialSetup:
    """What every trial needs, put once in Ray's object store: the task, the dense weights
    and metrics, the budget and resources, the latency tables."""
    from ..engine.checkpoint import cpu_state

    config = plan.config
    return TrialSetup(
        task=prep.task,
        dense_state=cpu_state(prep.dense),
        dense_metrics={k: v for k, v in prep.dense_metrics.items() if not k.startswith("test_")},
        budget=config.budget,
        epochs=plan.epochs,
        engine=config.engine,
        cpus_per_trial=config.cpus_per_trial,
        gpus_per_trial=config.gpus_per_trial,
        latency=prep.latency,
        on_pruned=hooks.trial_hook(config, prep.latency),
        tables={name: t["table"] for name, t in prep.tables.items()},
    )


def _tuner(plan: Plan, prep: Prepared, experiment_id: str, run_id: str, say):
    """A new Ray Tune Tuner for the trials still to run (None: none are), with the searcher
    (told the finished trials again on a resume), the scheduler and the callbacks; the
    trials' setup in the object store. Tune writes under ``<search>/tune``, which is never
    read back (:mod:`.journal`)."""
    import ray
    from ray import tune

    from .progress import ClusterWatch, ProgressLine

    config = plan.config
    done = plan.finished
    logger = _logger(plan, experiment_id, run_id, say)
    left = plan.trials - len(done)
    spec = SEARCHERS.get(config.searcher)
    hooks = spec.hooks()
    described = hooks.describe(config)
    what = f", {described}" if described else f" on space {config.space!r}"
    kept = f"; {len(done)} finished before, {max(left, 0)} to run" if config.resume else ""
    say(
        f"search {plan.name!r}: {plan.trials} trials ({config.searcher}{what}, "
        f"{plan.epochs} epoch(s) each, {prep.workers} at a time, scheduler {plan.scheduler}), "
        f"budget {config.budget.kind} {config.budget.fraction:g}{kept}"
    )
    if left <= 0:
        return None
    setup = _trial_setup(plan, prep, experiment_id, run_id, hooks)
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, setup_ref=[ray.put(setup)]),
        {"cpu": config.cpus_per_trial, "gpu": config.gpus_per_trial},
    )
    searcher = _searcher(plan, prep, hooks, done)
    scheduler = None
    if plan.scheduler == "asha":
        from ray.tune.schedulers import ASHAScheduler

        scheduler = ASHAScheduler(
            time_attr="training_iteration", max_t=plan.epochs, grace_period=asha_grace(plan.epochs), reduction_factor=2
        )
    remove_dir(join(plan.path, TUNE))  # an earlier run's Tune files: never read
    snapshot_period(is_uri(plan.path))
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=searcher,
            scheduler=scheduler,
            metric=None if spec.multi_objective else plan.metric,
            mode=None if spec.multi_objective else metric_mode(plan.metric),
            num_samples=left,
            max_concurrent_trials=prep.workers,
            reuse_actors=True,
        ),
        run_config=tune.RunConfig(
            name=TUNE,
            storage_path=plan.path,
            verbose=0,
            failure_config=tune.FailureConfig(max_failures=config.max_failures, fail_fast=False),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
            callbacks=[
                logger,
                ProgressLine(left, config.progress, plan.score, after_epochs=epochs_after_trials(plan)),
                ClusterWatch(config.cpus_per_trial, config.gpus_per_trial, config.node_wait),
            ],
        ),
    )


def _logger(plan: Plan, experiment_id: str, run_id: str, say):
    """The trials' MLflow logger; on a resume, what the last driver left unwritten goes first,
    and runs of trials without a record (they run again) go."""
    from ..engine import cache_dir as engine_cache_dir
    from ..tracking import store
    from .callback import TrialLogger, apply_outbox
    from .outbox import Outbox, folder_for

    config, done = plan.config, plan.finished
    logger = TrialLogger(
        plan.tracking_uri,
        experiment_id,
        run_id,
        plan.path,
        outbox_dir=str(folder_for(plan.path, engine_cache_dir(config.engine))),
        first=max((r["number"] for r in done), default=0) + 1,
    )
    if config.resume:  # what a dead driver left unwritten first; runs of trials without a record run again
        caught_up = apply_outbox(logger)
        if caught_up:
            say(f"wrote {caught_up} trial event(s) the last driver left unwritten to MLflow")
        store.keep_recorded(plan.tracking_uri, experiment_id, run_id, {r["trial_id"]: r["status"] for r in done})
    else:
        Outbox(folder_for(plan.path, engine_cache_dir(config.engine))).clear()  # a bucket search's stale one
    return logger


def _searcher(plan: Plan, prep: Prepared, hooks, done: list[dict]):
    """The search's searcher: its first trials the baselines (where the searcher takes them),
    told a resumed search's finished trials."""
    from .baselines import WithBaselines, baseline_names

    config = plan.config
    spec = SEARCHERS.get(config.searcher)
    ctx = SearcherContext(
        table=prep.table,
        budget=config.budget,
        seed=config.engine.seed,
        trials=plan.trials,
        space=config.space,
        grid=plan.grid,
        metric=plan.metric,
        fraction_floor=min(prep.floor * 1.01, config.budget.fraction),
        extra=hooks.context(config, prep.dense, prep.task, prep.latency),
    )
    searcher = spec.make(ctx)
    if spec.baselines:  # the first trials: uniform and global magnitude pruning
        searcher = WithBaselines(searcher, plan.structures[0], baseline_names(plan.trials))
    if done:
        tell_finished(searcher, done, config.searcher)
    return searcher


def asha_grace(epochs: int) -> int:
    """ASHA's grace period: half a trial's epochs (at least one). A trial stopped after one
    epoch of several is judged on how fast it recovers, which ranks learning rates and luck
    more than policies."""
    return max(1, epochs // 2)


def tell_finished(searcher, records: list[dict], name: str) -> None:
    """Tell a resumed search's searcher its finished trials (their records), so that it goes on
    from them: every registered searcher has ``tell_finished`` (the conformance tests check)."""
    tell = getattr(searcher, "tell_finished", None)
    if tell is None:
        raise AutopruneError(
            f"searcher {name!r} cannot be told earlier trials (it has no tell_finished): not resumable"
        )
    tell(records)


def has_records(path: str) -> bool:
    """Whether any trial of the search at ``path`` has ended and been recorded (what ``--resume`` keeps)."""
    return bool(names(join(path, TRIALS)))


def _cause(exc: BaseException) -> str:
    """One line saying what failed: an autoprune error's message, else the exception's type and first line."""
    return first_line(exc) if isinstance(exc, AutopruneError) else f"{type(exc).__name__}: {first_line(exc)}"


def _before_first_record(plan: Plan, exc: BaseException) -> AutopruneError | None:
    """A new search that ended before any trial was recorded has nothing to resume: its folder
    (what it wrote: the saved settings, Tune's files) is removed, so its name is free again,
    and the error becomes one line. Its MLflow run stays, ended with the reason."""
    remove_dir(plan.path)
    if isinstance(exc, KeyboardInterrupt):
        print(f"search {plan.name!r} interrupted before its first trial; nothing to resume", file=sys.stderr)
        return None
    return AutopruneError(
        f"search {plan.name!r} failed before its first trial: {_cause(exc)}. Nothing was kept under "
        f"{plan.path!r} (the name is free again); the MLflow search run is FAILED with this reason"
    )
