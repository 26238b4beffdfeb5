"""``autoprune search``: the Ray Tune runner.

The driver checks everything cheap first, connects to Ray (a local instance sized to this
machine, or ``--address``), gets the dense model once and puts it with the data and the
layer table into Ray's object store once. Ray Tune then runs trials proposed by a
:class:`ray.tune.search.Searcher` (Optuna samplers through ``OptunaSearch``; the AMC agent
plugs in at the same place); each trial turns its config into a :class:`Policy` and calls
the engine. A callback in the driver logs every trial to MLflow. At the end the best policy
is re-run from the dense model for ``final_epochs``, tested once and saved.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any

from .config import STRUCTURES, Budget, EngineConfig, Policy, SearchConfig
from .errors import AutopruneError
from .rayenv import quiet_environment
from .registry import Registry

DEFAULT_TRIALS = 20
STATE_FILE = "autoprune-search.json"  # the resolved config and MLflow ids, for --resume
COMPLETED = "completed-trials"  # final reports of completed trials, for --resume
# what a trial reports of its pruned model, and the summary keeps of the best
PRUNED_METRICS = ("val_acc", "flops", "params", "flops_ratio", "params_ratio", "latency_ms", "speedup")
# a trial's final report (run_trial), as kept for replay on --resume (tracking.save_final)
REPORTED = ("epoch", "loss", "node_id", *PRUNED_METRICS, "engine_s", "report_s", "ratios")


def objectives(kind: str) -> tuple[tuple[str, str], ...]:
    """nsga2's objectives: validation accuracy up, the budget's cost and latency down."""
    return (("val_acc", "max"), (f"{kind}_ratio", "min"), ("latency_ms", "min"))


# ------------------------------------------------------------------ searchers


@dataclass
class SearcherContext:
    """What a searcher factory gets: the define-by-run space (already bound to the layer
    table), the config, the trial count and, for ``grid``, the grid."""

    space: Callable[[Any], dict]
    config: SearchConfig
    trials: int
    grid: dict[str, list] | None = None


@dataclass(frozen=True)
class SearcherSpec:
    make: Callable[[SearcherContext], Any]  # -> a ray.tune.search.Searcher
    multi_objective: bool = False  # optimises objectives(budget kind) and returns a Pareto front
    scheduler: str = "asha"  # the default --scheduler
    needs_grid: bool = False


SEARCHERS: Registry[SearcherSpec] = Registry("searcher")


def _optuna(ctx: SearcherContext, sampler) -> Any:
    from .tune_plugins import PolicyOptunaSearch

    if SEARCHERS.get(ctx.config.searcher).multi_objective:
        goals = objectives(ctx.config.budget.kind)
        metric, mode = [m for m, _ in goals], [d for _, d in goals]
    else:
        metric, mode = "val_acc", "max"
    return PolicyOptunaSearch(space=ctx.space, metric=metric, mode=mode, sampler=sampler)


def _tpe(ctx: SearcherContext):
    import optuna

    startup = min(10, max(2, ctx.trials // 3))  # random trials before TPE models the results
    return _optuna(
        ctx, optuna.samplers.TPESampler(seed=ctx.config.engine.seed, n_startup_trials=startup, constant_liar=True)
    )


def _nsga2(ctx: SearcherContext):
    import optuna

    population = max(4, min(50, ctx.trials // 3))
    return _optuna(ctx, optuna.samplers.NSGAIISampler(seed=ctx.config.engine.seed, population_size=population))


def _random(ctx: SearcherContext):
    import optuna

    return _optuna(ctx, optuna.samplers.RandomSampler(seed=ctx.config.engine.seed))


def _grid(ctx: SearcherContext):
    import optuna

    return _optuna(ctx, optuna.samplers.GridSampler(ctx.grid, seed=ctx.config.engine.seed))


SEARCHERS.register("tpe")(SearcherSpec(_tpe))
SEARCHERS.register("nsga2")(SearcherSpec(_nsga2, multi_objective=True, scheduler="none"))
SEARCHERS.register("random")(SearcherSpec(_random))
SEARCHERS.register("grid")(SearcherSpec(_grid, scheduler="none", needs_grid=True))


def define_by_run(space_spec: str, table, budget: Budget | None, trial) -> dict:
    """The function OptunaSearch calls per trial: the space's policy fields (and, for the
    multi-objective searchers, a budget fraction up to the budget). A space that raises
    does not stop the search: the error travels to the trial, which fails with it."""
    from autoprune.search_spaces import get_space

    out: dict[str, Any] = {}
    try:
        if budget is not None:
            out["budget_fraction"] = trial.suggest_float("budget_fraction", budget.fraction / 4, budget.fraction)
        policy = get_space(space_spec)(trial, table)
        if not isinstance(policy, dict):
            raise AutopruneError(f"search space {space_spec!r} returned {type(policy).__name__}, not a dict")
        out["policy"] = policy
    except Exception as exc:  # noqa: BLE001 - recorded as the trial's error
        out["space_error"] = f"{type(exc).__name__}: {exc}"
    return out


# ------------------------------------------------------------------ the trial (on a worker)

_ACTOR_CACHE: dict[str, tuple] = {}  # one entry: the setup and dense model of the current search


@dataclass
class TrialSetup:
    """Everything a trial needs besides its config; put into the object store once."""

    task: Any
    dense_state: dict
    dense_metrics: dict[str, Any]
    budget: Budget
    epochs: int
    engine: EngineConfig
    cpus_per_trial: float
    gpus_per_trial: float
    replay: dict[str, dict] = field(default_factory=dict)  # resume: final reports of trials that ended
    # after Tune's last snapshot; they are reported again instead of re-run


def _setup(ref) -> tuple[TrialSetup, Any]:
    """The search's setup and dense model, fetched once per worker process (actors are reused)."""
    import ray

    key = ref.hex()
    if key not in _ACTOR_CACHE:
        _ACTOR_CACHE.clear()
        setup = ray.get(ref)
        dense = setup.task.model_factory()
        dense.load_state_dict(setup.dense_state)
        _ACTOR_CACHE[key] = (setup, dense.eval())
    return _ACTOR_CACHE[key]


def run_trial(config: dict, setup_ref: list) -> None:
    """One trial: config -> Policy -> engine, reporting validation accuracy every epoch and
    the final metrics with the last epoch."""
    import ray
    import torch
    from ray import tune

    from . import engine

    setup, dense = _setup(setup_ref[0])
    replay = setup.replay.get(tune.get_context().get_trial_id())
    if replay is not None:
        tune.report(replay)
        return
    if "space_error" in config:
        raise AutopruneError(f"the search space failed: {config['space_error']}")
    torch.set_num_threads(max(1, int(setup.cpus_per_trial)))
    device = "cuda" if setup.gpus_per_trial > 0 and torch.cuda.is_available() else "cpu"
    dense.to(device)
    fields = dict(config["policy"])
    fields["finetune"] = {**fields.get("finetune", {}), "epochs": setup.epochs}
    policy = Policy.from_dict(fields)
    budget = Budget(setup.budget.kind, config.get("budget_fraction", setup.budget.fraction), setup.budget.tolerance)
    cfg = dataclasses.replace(setup.engine, device=device, train_epochs=setup.epochs, progress=False)
    node = ray.get_runtime_context().get_node_id()
    last: dict[str, Any] = {}
    reporting = [0.0]  # seconds spent in tune.report, which waits for the driver: not engine time

    def on_epoch(epoch: int, metrics: dict[str, float]) -> None:
        row = {"epoch": epoch + 1, "val_acc": metrics["val_acc"], "loss": metrics["loss"], "node_id": node}
        if epoch + 1 < setup.epochs:
            t = time.perf_counter()
            tune.report(row)
            reporting[0] += time.perf_counter() - t
        else:
            last.update(row)  # reported below, with the final metrics

    t0 = time.perf_counter()
    result = engine.run(setup.task, dense, policy, budget, cfg, setup.dense_metrics, on_epoch=on_epoch)
    engine_s = time.perf_counter() - t0 - reporting[0]
    p = result.pruned
    tune.report(
        {
            **last,
            "epoch": setup.epochs,
            "node_id": node,
            **{k: p[k] for k in PRUNED_METRICS},
            "engine_s": engine_s,
            "report_s": reporting[0],
            "ratios": {k: float(v) for k, v in result.ratios.items()},
        }
    )


# ------------------------------------------------------------------ checks before anything starts


@dataclass
class Plan:
    """A checked, resolved search: what ``search`` runs."""

    config: SearchConfig
    name: str
    path: Path  # <storage>/<name>
    tracking_uri: str
    address: str | None
    trials: int
    scheduler: str
    out: Path
    structures: tuple[str, ...]  # what the space may sample (--structure, or the space's own)
    grid: dict[str, list] | None = None
    local_cpus: int = 0
    local_gpus: int = 0


RESUME_MAY_CHANGE = ("name", "storage", "resume", "out", "address", "progress", "engine.progress")


def saved_config(name: str, storage: str) -> SearchConfig | None:
    """The checked settings of the search ``<storage>/<name>``, or None if there is none."""
    from .schema import from_dict

    state = Path(storage).expanduser().resolve() / name / STATE_FILE
    if not state.is_file():
        return None
    try:
        data = json.loads(state.read_text())["config"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise AutopruneError(f"{str(state)!r} is not a readable search state ({exc}); it cannot be resumed") from None
    try:
        return from_dict(SearchConfig, data, f"saved search {str(state)!r}")
    except AutopruneError as exc:
        raise AutopruneError(
            f"{str(state)!r} holds settings that are no longer valid ({exc}); it cannot be resumed"
        ) from None


def resume_conflicts(config: SearchConfig, saved: SearchConfig) -> list[str]:
    """Settings of ``config`` that a resumed search could not honour: those set (not None)
    and different from the saved ones. A config that sets nothing beyond the defaults (the
    Python API's ``SearchConfig(name=..., resume=True)``) takes the saved settings."""
    from .schema import flat_fields
    from .tracking import resolve_tracking_uri

    mine, theirs, default = flat_fields(config), flat_fields(saved), flat_fields(SearchConfig())
    asked = [k for k in mine if k not in RESUME_MAY_CHANGE]
    if all(mine[k][0] == default[k][0] for k in asked):
        return []
    out = []
    for key in asked:
        value, flag = mine[key]
        if key == "tracking_uri" and value is not None:
            value = resolve_tracking_uri(value)
        if value is not None and value != theirs[key][0]:
            out.append(f"{flag or key} {value!r} (saved: {theirs[key][0]!r})")
    return out


def prepare(config: SearchConfig) -> Plan:
    """Every check that needs no Ray, data or training: names, budget, resources on this
    machine, the output locations, the tracking store and the cluster address. A resumed
    search takes its saved configuration: only ``out``, ``address`` and the progress display
    may change (Tune restores the rest from its own snapshot); other differences are refused."""
    from autoprune.search_spaces import get_space

    from . import engine, tracking
    from .paths import check_output_dir
    from .tasks import check_task_config

    if config.resume and not config.name:
        raise AutopruneError("--resume needs --name: the name of the search to continue")
    name = config.name or datetime.now().strftime("search-%Y%m%d-%H%M%S")
    check_output_dir(Path(config.storage), "--storage")
    path = Path(config.storage).expanduser().resolve() / name
    if config.resume:
        saved = saved_config(name, config.storage)
        if saved is None:
            raise AutopruneError(
                f"no search named {name!r} to resume under {str(path.parent)!r} ({STATE_FILE} missing)"
            )
        conflicts = resume_conflicts(config, saved)
        if conflicts:
            raise AutopruneError(
                f"--resume continues search {name!r} with its saved settings, but these differ: "
                f"{'; '.join(conflicts)}. Leave them out, or start a new search under another --name"
            )
        config = dataclasses.replace(
            saved, resume=True, out=config.out or saved.out, address=config.address, progress=config.progress
        )
    elif path.exists() and any(path.iterdir()):
        raise AutopruneError(
            f"a search named {name!r} already exists in {str(path.parent)!r}; pass --resume to continue it, "
            "or choose another --name"
        )
    spec = SEARCHERS.get(config.searcher)
    space = get_space(config.space)
    check_task_config(config.engine.task)
    engine.resolve_device(config.engine.device)
    if spec.needs_grid and not hasattr(space, "grid"):
        raise AutopruneError(
            f"searcher {config.searcher!r} needs a space with a grid (such as 'criteria'); {config.space!r} has none"
        )
    fixed = getattr(space, "structure", None)
    if config.structure and fixed and config.structure != fixed:
        raise AutopruneError(
            f"--structure {config.structure} does not fit space {config.space!r}, which prunes {fixed} only"
        )
    structure = config.structure or fixed
    scheduler = config.scheduler or spec.scheduler
    if scheduler == "asha" and spec.multi_objective:
        raise AutopruneError(
            f"--scheduler asha stops trials on one metric; searcher {config.searcher!r} optimises several: "
            "use --scheduler none"
        )
    out = check_output_dir(Path(config.out).resolve() if config.out else path / "best", "--out")
    if not config.engine.checkpoint:
        check_output_dir(
            engine.cache_dir(config.engine), "--cache-dir" if config.engine.cache_dir else "the dense-model cache"
        )
    tracking_uri = tracking.resolve_tracking_uri(config.tracking_uri)
    tracking.check_tracking_uri(tracking_uri)
    address = config.address or os.environ.get("RAY_ADDRESS") or None
    if address:
        _check_address(address)
    local_cpus = local_gpus = 0
    if not address:
        local_cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        local_gpus = _gpu_count()
        _check_fits(config, local_cpus, local_gpus, "this machine")
    trials = config.trials or DEFAULT_TRIALS
    return Plan(
        config,
        name,
        path,
        tracking_uri,
        address,
        trials,
        scheduler,
        out.resolve(),
        (structure,) if structure else STRUCTURES,
        None,
        local_cpus,
        local_gpus,
    )


def _gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _check_fits(config: SearchConfig, cpus: float, gpus: float, where: str) -> None:
    if config.cpus_per_trial > cpus:
        raise AutopruneError(f"--cpus-per-trial {config.cpus_per_trial:g} is more than {where} has ({cpus:g} CPUs)")
    if config.gpus_per_trial > gpus:
        raise AutopruneError(
            f"--gpus-per-trial {config.gpus_per_trial:g} is more than {where} has ({gpus:g} GPUs)"
            + ("; leave it at 0 to run on the CPU" if not gpus else "")
        )


def _check_address(address: str) -> None:
    """A Ray cluster's GCS must answer on host:port before Ray tries (it otherwise retries
    for minutes)."""
    if address in ("auto", "local"):
        return
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit():
        raise AutopruneError(f"--address {address!r} must be host:port (a Ray head's GCS address) or auto")
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=3).close()
    except OSError as exc:
        raise AutopruneError(
            f"no Ray cluster answers at --address {address!r} ({exc}); start one with "
            "`ray start --head`, or leave --address out for a local instance"
        ) from None


# ------------------------------------------------------------------ Ray


def connect(plan: Plan) -> None:
    """Start a local Ray instance sized to this machine, or join ``address``, and check
    that the cluster can run a trial."""
    quiet_environment()
    import ray

    common = dict(log_to_driver=False, logging_level="ERROR", configure_logging=True)
    if plan.address:
        try:
            ray.init(address=plan.address, **common)
        except (ConnectionError, RuntimeError) as exc:
            raise AutopruneError(f"cannot join the Ray cluster at {plan.address!r}: {exc}") from None
        nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
        _check_fits(
            plan.config,
            max((n.get("CPU", 0) for n in nodes), default=0),
            max((n.get("GPU", 0) for n in nodes), default=0),
            "any node of the cluster",
        )
        return
    ray.init(address="local", num_cpus=plan.local_cpus, num_gpus=plan.local_gpus, include_dashboard=False, **common)


def _concurrency(plan: Plan) -> int:
    if plan.config.concurrency:
        return plan.config.concurrency
    import ray

    res = ray.cluster_resources()
    n = int(res.get("CPU", 1) // plan.config.cpus_per_trial)
    if plan.config.gpus_per_trial:
        n = min(n, int(res.get("GPU", 0) // plan.config.gpus_per_trial))
    return max(1, min(n, plan.trials))


# ------------------------------------------------------------------ the dense model and the layer table


def layer_table(task, structures: tuple[str, ...] = STRUCTURES) -> Any:
    """Channel groups and weight layers of the task's model, with their FLOPs shares."""
    import numpy as np

    from autoprune.search_spaces import LayerTable

    from .criteria import scored_modules
    from .graph import CostModel, PrunableGraph
    from .measure import flops_by_module

    model = task.model_factory().eval()
    example = task.example_input()
    total, by_module = flops_by_module(model, example)
    groups, group_flops = {}, {}
    if "channel" in structures:  # only channel pruning needs the dependency graph
        graph = PrunableGraph(model, example)
        graph.dry_run()  # rejects layers the graph cannot handle, naming them
        costs = CostModel(graph, by_module, total)
        for i, g in enumerate(graph.groups):
            removed = [np.zeros(h.size, bool) for h in graph.groups]
            removed[i][:] = True
            groups[g.name] = g.size
            group_flops[g.name] = 1.0 - costs.cost(removed)[0] / total
    layers = {n: m.weight.numel() for n, m in scored_modules(model).items()}
    return LayerTable(
        groups=groups,
        layers=layers,
        group_flops=group_flops,
        layer_flops={n: by_module.get(n, 0.0) / total for n in layers},
        structures=structures,
    )


# ------------------------------------------------------------------ results


@dataclass
class SearchResult:
    """What a search produced; ``summary`` is what ``summary.json`` holds."""

    name: str
    summary: dict[str, Any]
    trials: list[dict[str, Any]]  # every trial: trial_id, status, policy, metrics, error, run_id
    pareto: list[dict[str, Any]]  # the non-dominated completed trials
    best_model_path: Path | None
    out: Path
    experiment_id: str
    run_id: str
    tracking_uri: str
    wall_time_s: float = 0.0


def pareto_front(records: list[dict], goals: tuple[tuple[str, str], ...]) -> list[dict]:
    """Completed trials that no other completed trial dominates (at least as good in every
    objective, strictly better in one)."""
    done = [r for r in records if r["status"] == "completed"]

    def vec(r):
        return [r["metrics"][k] if d == "min" else -r["metrics"][k] for k, d in goals]

    vecs = [vec(r) for r in done]
    front = []
    for i, v in enumerate(vecs):
        dominated = any(
            all(a <= b for a, b in zip(w, v)) and any(a < b for a, b in zip(w, v)) for j, w in enumerate(vecs) if j != i
        )
        if not dominated:
            front.append(done[i])
    return front


def _records(path: Path, runs: dict[str, Any]) -> list[dict]:
    from ray.tune import ExperimentAnalysis

    from .tracking import trial_error

    records = []
    trials = ExperimentAnalysis(str(path)).trials

    def started(t) -> tuple:  # trial ids are random: order by when their runs started
        run = runs.get(t.trial_id)
        return (run.info.start_time if run else float("inf"), t.trial_id)

    for number, trial in enumerate(sorted(trials, key=started)):
        last = trial.last_result or {}
        if trial.status == "ERROR":
            status = "failed"
        elif trial.status == "TERMINATED" and last.get("flops_ratio") is not None:
            status = "completed"
        elif trial.status == "TERMINATED":
            status = "stopped"  # by the scheduler, before its final report
        else:
            status = trial.status.lower()
        run = runs.get(trial.trial_id)
        records.append(
            {
                "number": number,
                "trial_id": trial.trial_id,
                "status": status,
                "policy": trial.config.get("policy", {}),
                "budget_fraction": trial.config.get("budget_fraction"),
                "metrics": {k: last[k] for k in (*PRUNED_METRICS, "engine_s", "epoch") if k in last},
                "ratios": last.get("ratios", {}),
                "node_id": last.get("node_id"),
                "error": trial_error(trial) if status == "failed" else None,
                "run_id": run.info.run_id if run else None,
            }
        )
    return records


# ------------------------------------------------------------------ the search


def search(config: SearchConfig) -> SearchResult:
    """Run (or ``resume``) a policy search; see the module docstring. The CLI wraps this."""
    t0 = time.time()
    quiet_environment()  # before anything imports ray
    plan = prepare(config)
    say = print
    import ray

    owned = not ray.is_initialized()  # a caller's own ray.init() is used as it is, and left running
    try:
        if owned:
            connect(plan)
        return _search(plan, say, t0, owned)
    finally:
        if owned and ray.is_initialized():
            ray.shutdown()  # stops the local instance; only disconnects from a cluster


def _search(plan: Plan, say, t0: float, owned: bool) -> SearchResult:
    import ray
    from ray import tune

    from autoprune.search_spaces import get_space

    from . import engine, tracking
    from .checkpoint import cpu_state
    from .tasks import get_task
    from .tune_plugins import ProgressLine

    config = plan.config
    task = get_task(config.engine.task)
    table = layer_table(task, plan.structures)
    if SEARCHERS.get(config.searcher).needs_grid:
        plan.grid = get_space(config.space).grid(table)
        size = math.prod(len(v) for v in plan.grid.values())
        plan.trials = min(config.trials or size, size)
    concurrency = _concurrency(plan)
    dense = engine.dense_model(task, config.engine, log=say)
    dense_metrics = engine.measure_model(dense, task, config.engine.measure, test=True)
    setup = TrialSetup(
        task,
        cpu_state(dense),
        {k: v for k, v in dense_metrics.items() if k != "test_acc"},
        config.budget,
        config.epochs,
        config.engine,
        config.cpus_per_trial,
        config.gpus_per_trial,
        tracking.load_finals(str(plan.path / COMPLETED)) if config.resume else {},
    )
    setup_ref = ray.put(setup)

    saved = dataclasses.asdict(config)
    saved.update(
        name=plan.name,
        trials=plan.trials,
        out=str(plan.out),
        scheduler=plan.scheduler,
        concurrency=concurrency,
        tracking_uri=plan.tracking_uri,
        storage=str(plan.path.parent),
    )
    experiment_id, run_id = tracking.open_search_run(
        plan.tracking_uri,
        plan.name,
        tracking.flat_params("", {**saved, "dense": _short(dense_metrics)}),
        config.resume,
    )
    mlflow = tracking.client(plan.tracking_uri)
    # From here on the search run is open: whatever ends the search also ends the run,
    # KILLED on an interruption and FAILED on an error, never left RUNNING.
    try:
        tracking.log(mlflow, run_id, {f"dense_{k}": v for k, v in _short(dense_metrics).items()})
        plan.path.mkdir(parents=True, exist_ok=True)
        (plan.path / STATE_FILE).write_text(
            json.dumps(
                {"config": saved, "tracking_uri": plan.tracking_uri, "experiment_id": experiment_id, "run_id": run_id},
                indent=2,
            )
            + "\n"
        )
        restore = config.resume and tune.Tuner.can_restore(str(plan.path))
        if config.resume:
            from ray.tune import ExperimentAnalysis

            known = {t.trial_id for t in ExperimentAnalysis(str(plan.path)).trials} if restore else set()
            tracking.drop_unfinished(plan.tracking_uri, experiment_id, run_id, known)

        trainable = tune.with_resources(
            tune.with_parameters(run_trial, setup_ref=[setup_ref]),
            {"cpu": config.cpus_per_trial, "gpu": config.gpus_per_trial},
        )
        spec = SEARCHERS.get(config.searcher)
        say(
            f"search {plan.name!r}: {plan.trials} trials ({config.searcher} on space {config.space!r}, "
            f"{config.epochs} epoch(s) each, {concurrency} at a time, scheduler {plan.scheduler}), "
            f"budget {config.budget.kind} {config.budget.fraction:g}"
        )
        try:
            if restore:
                tuner = tune.Tuner.restore(
                    str(plan.path), trainable=trainable, resume_unfinished=True, resume_errored=False
                )
            else:
                space = partial(define_by_run, config.space, table, config.budget if spec.multi_objective else None)
                ctx = SearcherContext(space, config, plan.trials, plan.grid)
                scheduler = None
                if plan.scheduler == "asha":
                    from ray.tune.schedulers import ASHAScheduler

                    scheduler = ASHAScheduler(
                        time_attr="training_iteration", max_t=config.epochs, grace_period=1, reduction_factor=2
                    )
                tuner = tune.Tuner(
                    trainable,
                    tune_config=tune.TuneConfig(
                        search_alg=spec.make(ctx),
                        scheduler=scheduler,
                        metric=None if spec.multi_objective else "val_acc",
                        mode=None if spec.multi_objective else "max",
                        num_samples=plan.trials,
                        max_concurrent_trials=concurrency,
                        reuse_actors=True,
                    ),
                    run_config=tune.RunConfig(
                        name=plan.name,
                        storage_path=str(plan.path.parent),
                        verbose=0,
                        failure_config=tune.FailureConfig(max_failures=0, fail_fast=False),
                        checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                        callbacks=[
                            tracking.TrialLogger(plan.tracking_uri, experiment_id, run_id, str(plan.path / COMPLETED)),
                            ProgressLine(plan.trials, config.progress),
                        ],
                    ),
                )
            tuner.fit()
            tracking.close_writers()
        except BaseException:
            print(
                f"search {plan.name!r} interrupted; continue it with: autoprune search --name {plan.name} "
                f"--storage {plan.path.parent} --resume",
                file=sys.stderr,
            )
            raise

        runs = tracking.trial_runs(plan.tracking_uri, experiment_id, run_id)
        records = _records(plan.path, runs)
        if owned:
            ray.shutdown()  # before the final run: its latency is measured on an otherwise idle machine
        return finish(plan, task, dense, dense_metrics, records, experiment_id, run_id, say, t0)
    except BaseException as exc:
        with contextlib.suppress(Exception):
            tracking.close_writers()  # what the trials reported before the interruption
        with contextlib.suppress(Exception):
            if mlflow.get_run(run_id).info.status == "RUNNING":
                mlflow.set_terminated(run_id, status="KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise


def _short(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: metrics[k] for k in ("val_acc", "test_acc", "flops", "params", "latency_ms") if k in metrics}


def finish(plan: Plan, task, dense, dense_metrics, records, experiment_id, run_id, say, t0) -> SearchResult:
    """Pick the best trial, re-run it for ``final_epochs``, test it once, save it and log the
    search run's plots, summary and model."""
    from . import engine, tracking
    from .checkpoint import architecture_key, reload_flags, save_model
    from .report import comparison, trials_table

    config = plan.config
    kind = config.budget.kind
    mlflow = tracking.client(plan.tracking_uri)
    done = [
        r
        for r in records
        if r["status"] == "completed" and r["metrics"].get(f"{kind}_ratio", math.inf) <= config.budget.fraction + 1e-9
    ]
    goals = objectives(kind)
    front = pareto_front(records, goals if SEARCHERS.get(config.searcher).multi_objective else goals[:2])
    counts = {
        "total": len(records),
        "completed": sum(r["status"] == "completed" for r in records),
        "stopped_early": sum(r["status"] == "stopped" for r in records),
        "failed": sum(r["status"] == "failed" for r in records),
    }
    summary: dict[str, Any] = {
        "name": plan.name,
        "budget": {"kind": kind, "fraction": config.budget.fraction},
        "searcher": config.searcher,
        "space": config.space,
        "scheduler": plan.scheduler,
        "task": task.name,
        "model": task.model_name,
        "trials": counts,
        "dense": _short(dense_metrics),
        "best": None,
        "pareto": [{"trial_id": r["trial_id"], **r["metrics"], "policy": r["policy"]} for r in front],
        "mlflow": {"tracking_uri": plan.tracking_uri, "experiment_id": experiment_id, "run_id": run_id},
    }
    plan.out.mkdir(parents=True, exist_ok=True)
    model_path = None
    if done:
        best = max(done, key=lambda r: (r["metrics"]["val_acc"], -r["metrics"][f"{kind}_ratio"], -r["number"]))
        fields = dict(best["policy"])
        fields["finetune"] = {**fields.get("finetune", {}), "epochs": config.final_epochs}
        policy = Policy.from_dict(fields)
        budget = Budget(kind, best["budget_fraction"] or config.budget.fraction, config.budget.tolerance)
        cfg = dataclasses.replace(config.engine, train_epochs=config.final_epochs)
        say(
            f"best trial {best['trial_id']} (val {100 * best['metrics']['val_acc']:.2f}%): re-running it for "
            f"{config.final_epochs} epoch(s) and testing it"
        )
        final = engine.run(task, dense, policy, budget, cfg, dense_metrics, test=True)
        p = final.pruned
        model_path = plan.out / "model.pt"
        save_model(
            model_path,
            final.model,
            config.engine.task,
            policy.structure,
            final.history,
            policy.to_dict(),
            {k: p.get(k) for k in ("val_acc", "test_acc", "flops", "params")},
            architecture_key(dense),
        )
        policy.to_json(plan.out / "policy.json")
        summary["best"] = {
            "trial_id": best["trial_id"],
            "policy": policy.to_dict(),
            "search_val_acc": best["metrics"]["val_acc"],
            **{k: p[k] for k in ("test_acc", *PRUNED_METRICS)},
            "ratios": final.ratios,
            "model_path": str(model_path),
        }
        tracking.log(mlflow, run_id, {f"best_{k}": p[k] for k in ("test_acc", *PRUNED_METRICS)})
        mlflow.set_tag(run_id, "autoprune.best_trial_id", best["trial_id"])
        mlflow.log_artifact(run_id, str(model_path), "best_model")
        mlflow.log_artifact(run_id, str(plan.out / "policy.json"), "best_model")
    summary["wall_time_s"] = time.time() - t0
    (plan.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    mlflow.log_artifact(run_id, str(plan.out / "summary.json"))
    tracking.ratio_charts(mlflow, records)
    mlflow.log_figure(
        run_id,
        tracking.scatter_chart(
            records, [r["trial_id"] for r in front], config.budget.fraction, kind, dense_metrics["val_acc"]
        ),
        "accuracy_vs_cost.png",
    )
    mlflow.log_figure(run_id, tracking.criteria_chart(records), "criteria.png")
    mlflow.set_terminated(run_id, status="FINISHED" if model_path else "FAILED")

    say("")
    say(trials_table(records, kind))
    if model_path is None:
        if counts["completed"]:
            raise AutopruneError(
                f"no completed trial is within --budget-{kind} {config.budget.fraction:g}; "
                f"see {plan.out / 'summary.json'}"
            )
        first = next((r["error"] for r in records if r["error"]), "none recorded")
        raise AutopruneError(
            f"no trial completed ({counts['failed']} failed; first error: {first}); see {plan.out / 'summary.json'}"
        )
    say(f"\ndense against the best policy, re-run for {config.final_epochs} epoch(s):")
    say(comparison(dense_metrics, final.pruned))
    say(f"\nbest model: {model_path}  (autoprune evaluate {model_path}{reload_flags(config.engine.task)})")
    say(f"summary:    {plan.out / 'summary.json'}")
    say(f"browse the trials: autoprune ui{_ui_flag(plan.tracking_uri)}")
    return SearchResult(
        plan.name,
        summary,
        records,
        front,
        model_path,
        plan.out,
        experiment_id,
        run_id,
        plan.tracking_uri,
        summary["wall_time_s"],
    )


def _ui_flag(uri: str) -> str:
    from .tracking import resolve_tracking_uri

    return "" if uri == resolve_tracking_uri(None) else f" --tracking-uri {uri}"


class _CallableModule(type(sys)):
    """``autoprune.search(config)`` works even once this module has been imported (which
    makes ``autoprune.search`` the module): calling the module runs :func:`search`."""

    def __call__(self, config: SearchConfig) -> SearchResult:
        return search(config)


sys.modules[__name__].__class__ = _CallableModule
