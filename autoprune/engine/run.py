"""One engine run: copy the dense model, let the policy's method prune and fine-tune it,
then measure it against the dense model. ``autoprune prune``, the search trials and the
tests all call :func:`run`; nothing here knows of Ray or MLflow."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ..config import Budget, EngineConfig, MeasureConfig, Policy
from .latency import LatencyTable
from .latency_build import latency_table
from .measure import Cost, measure, model_device, speedup
from .methods import MethodContext, PrunedCallback, check_policy, make_method
from .prune import fold_masks
from .runtime import check_runtime, describe_runtime
from .stages import check_budget, collapse_report, needs_latency_table, width_step
from .tasks import Task, get_task
from .train import EpochCallback, cache_dir, dense_model, evaluate, seed_everything


@dataclass
class RunResult:
    """What one engine run produced."""

    model: nn.Module  # the pruned, fine-tuned model (masks folded)
    policy: Policy
    budget: Budget
    history: list  # replayable channel-pruning history ([] for unstructured)
    ratios: dict[str, float]
    dense: dict[str, Any]  # flops, params, latency_measured_ms, val_<metric> (test_<metric> when asked)
    pruned: dict[str, Any]  # the same, plus flops_ratio, params_ratio, speedup
    epochs: list[dict[str, float]] = field(default_factory=list)  # fine-tuning, per epoch
    collapse: dict[str, Any] = field(default_factory=dict)  # see collapse_report
    events: list[dict[str, Any]] = field(default_factory=list)  # the method's pruning steps
    latency_checks: list[dict[str, Any]] = field(default_factory=list)  # a latency budget's timing checks


def task_latency_table(model: nn.Module, task: Task, cfg: EngineConfig, log=None) -> LatencyTable:
    """The latency table of ``model`` (dense) on its device, for ``task``'s input at the
    measurement's latency batch and threads, cached beside the dense model (``cache_dir``)."""
    m = cfg.measure
    return latency_table(model, task.input_shape, m.latency_batch, m.threads, cache_dir(cfg), log, m.runtime)


def measure_model(
    model: nn.Module, task: Task, config: MeasureConfig, test: bool = False, latency: bool = True
) -> dict[str, Any]:
    """Cost (FLOPs, params and, with ``latency``, latency at each of ``config.batch_sizes``)
    and the task's validation metric (``val_<name>``, e.g. ``val_acc``) of a model; its test
    metric only when ``test`` (the final report)."""
    cost = measure(model, task.input_shape, _with_latency_batch(config), latency=latency)
    device = model_device(model)
    out = {**cost.to_dict(), task.metric_key(): evaluate(model, task.loader("val", device=device), task=task)}
    if latency:
        out["latency_measured_ms"] = cost.latency_ms[config.latency_batch]
    if test:
        out[task.metric_key("test")] = evaluate(model, task.loader("test", device=device), task=task)
    return out


def _with_latency_batch(config: MeasureConfig) -> MeasureConfig:
    if config.latency_batch in config.batch_sizes:
        return config
    return dataclasses.replace(config, batch_sizes=(*config.batch_sizes, config.latency_batch))


def compare_latency(dense: nn.Module, pruned: nn.Module, input_shape, config: MeasureConfig) -> dict[str, Any]:
    """Dense against pruned, timed side by side at every batch size (see
    :func:`autoprune.engine.measure.speedup`): the keys ``latency_measured_ms`` (at the latency batch),
    ``latency_ms_by_batch``, ``dense_latency_ms_by_batch``, ``speedup`` (at the latency
    batch) and ``speedup_by_batch``: dense median / pruned median, so that a speed-up agrees
    with the two latencies shown beside it; ``speedup_per_round_by_batch``: the median of the
    per-round ratios, ``speedup_spread`` (at the latency batch) and ``speedup_spread_by_batch``:
    their quartiles (how noisy the timing was)."""
    config = _with_latency_batch(config)
    timed = {str(b): speedup(dense, pruned, input_shape, b, config) for b in config.batch_sizes}
    main = timed[str(config.latency_batch)]
    return {
        "latency_measured_ms": main["pruned_ms"],
        "latency_batch": config.latency_batch,
        "latency_ms_by_batch": {b: t["pruned_ms"] for b, t in timed.items()},
        "dense_latency_ms_by_batch": {b: t["dense_ms"] for b, t in timed.items()},
        "speedup": main["dense_ms"] / main["pruned_ms"],
        "speedup_spread": main["spread"],
        "speedup_by_batch": {b: t["dense_ms"] / t["pruned_ms"] for b, t in timed.items()},
        "speedup_per_round_by_batch": {b: t["speedup"] for b, t in timed.items()},
        "speedup_spread_by_batch": {b: t["spread"] for b, t in timed.items()},
    }


def run(
    task: Task,
    dense: nn.Module,
    policy: Policy,
    budget: Budget,
    cfg: EngineConfig,
    dense_metrics: dict[str, Any] | None = None,
    test: bool = False,
    on_epoch: EpochCallback | None = None,
    on_pruned: PrunedCallback | None = None,
    latency: LatencyTable | None = None,
    measure_latency: bool = True,
    log: Callable[[str], None] | None = None,
) -> RunResult:
    """Prune a copy of ``dense`` by ``policy`` to ``budget``, fine-tune and measure it.
    ``on_epoch`` and ``on_pruned`` are the method's callbacks (see :class:`MethodContext`).
    ``latency``: the hardware's latency table, needed by a latency budget; with it the pruned
    model's predicted latency is reported (``latency_predicted_ms``, ``predicted_speedup``).
    ``measure_latency``: time the pruned model against the dense one, side by side (a search's
    trials do not: they share the machine, and decide on the prediction); a latency budget is
    then also checked against that timing, which ``log`` announces (it takes a while)."""
    check_policy(policy)
    check_budget(policy, budget)
    device = next(dense.parameters()).device
    seed_everything(cfg.seed)
    check_runtime(cfg.measure.runtime, device)
    if needs_latency_table(policy, budget) and latency is None:
        m = cfg.measure
        latency = latency_table(dense, task.input_shape, m.latency_batch, m.threads, runtime=m.runtime)
    # the dense latency is timed beside the pruned model below when measure_latency is on
    dense_metrics = dict(dense_metrics or measure_model(dense, task, cfg.measure, test, latency=not measure_latency))
    dense_cost = Cost(dense_metrics["flops"], dense_metrics["params"], {})
    method = make_method(policy.method)
    ctx = MethodContext(
        task, dense, policy, budget, cfg, dense_cost, device, on_epoch, on_pruned, latency, measure_latency
    )
    pruned = method.run(ctx)
    model = pruned.model
    fold_masks(model)
    out = measure_model(model, task, cfg.measure, test=test, latency=False)
    out["flops_ratio"] = out["flops"] / dense_metrics["flops"]
    out["params_ratio"] = out["params"] / dense_metrics["params"]
    out["ideal_speedup"] = 1.0 / out["flops_ratio"]
    if policy.structure == "channel":
        out["round_to"] = width_step(policy, latency)
    if latency is not None:
        out["latency_predicted_ms"] = latency.predict_model(model)
        out["latency_ratio"] = out["latency_predicted_ms"] / latency.predict()
        out["predicted_speedup"] = 1.0 / out["latency_ratio"]
    if measure_latency:
        if log is not None:
            sizes = ", ".join(str(b) for b in _with_latency_batch(cfg.measure).batch_sizes)
            log(f"timing the pruned model beside the dense one ({cfg.measure.repeats} rounds at batch {sizes}) ...")
        out.update(compare_latency(dense, model, task.input_shape, cfg.measure))
        out["latency_runtime"] = describe_runtime(cfg.measure.runtime, device, cfg.measure.threads)
        dense_metrics["latency_ms_by_batch"] = out.pop("dense_latency_ms_by_batch")
        dense_metrics["latency_measured_ms"] = dense_metrics["latency_ms_by_batch"][str(cfg.measure.latency_batch)]
        # as a latency budget is judged (MethodContext's checks): the median of the per-round
        # ratios, steadier than the ratio of two medians taken apart when the machine is busy
        out["latency_measured_ratio"] = 1.0 / out["speedup_per_round_by_batch"][str(cfg.measure.latency_batch)]
    out["solver_attempts"] = pruned.attempts
    return RunResult(
        model,
        policy,
        budget,
        pruned.history,
        pruned.ratios,
        dense_metrics,
        out,
        pruned.epochs,
        collapse_report(pruned, policy),
        pruned.events,
        ctx.latency_checks,
    )


def prune(policy: Policy, budget: Budget, cfg: EngineConfig | None = None, test: bool = False) -> RunResult:
    """Prune the dense model of ``cfg``'s task (default: :class:`EngineConfig`'s, digits) by
    ``policy`` to ``budget``, fine-tune and measure it: :func:`get_task`, :func:`dense_model`
    (trained once and cached, or ``cfg.checkpoint``) and :func:`run` in one call. ``test``:
    also report test accuracy (the final report only). Writes nothing but the dense-model
    cache; ``autoprune prune`` also saves the model (:func:`autoprune.engine.checkpoint.save_model`)."""
    cfg = cfg or EngineConfig()
    task = get_task(cfg.task)
    return run(task, dense_model(task, cfg), policy, budget, cfg, test=test)
