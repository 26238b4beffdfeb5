"""One engine run: copy the dense model, let the policy's method prune and fine-tune it,
then measure it against the dense model. ``autoprune prune``, the search trials and the
tests all call :func:`run`; nothing here knows of Ray or MLflow."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ..config import Budget, EngineConfig, MeasureConfig, Policy
from .measure import Cost, measure
from .methods import METHODS, MethodContext, PrunedCallback, check_policy
from .prune import fold_masks
from .stages import collapse_report
from .tasks import Task
from .train import EpochCallback, evaluate, seed_everything


@dataclass
class RunResult:
    """What one engine run produced."""

    model: nn.Module  # the pruned, fine-tuned model (masks folded)
    policy: Policy
    budget: Budget
    history: list  # replayable channel-pruning history ([] for unstructured)
    ratios: dict[str, float]
    dense: dict[str, Any]  # flops, params, latency_ms, val_acc (test_acc when asked)
    pruned: dict[str, Any]  # the same, plus flops_ratio, params_ratio, speedup
    epochs: list[dict[str, float]] = field(default_factory=list)  # fine-tuning, per epoch
    collapse: dict[str, Any] = field(default_factory=dict)  # see collapse_report
    events: list[dict[str, Any]] = field(default_factory=list)  # the method's pruning steps


def measure_model(model: nn.Module, task: Task, config: MeasureConfig, test: bool = False) -> dict[str, Any]:
    """Cost (FLOPs, params, latency) and validation accuracy of a model; test accuracy only
    when ``test`` (the final report)."""
    cost = measure(model, task.input_shape, config)
    out = {**cost.to_dict(), "val_acc": evaluate(model, task.loader("val"))}
    if test:
        out["test_acc"] = evaluate(model, task.loader("test"))
    return out


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
) -> RunResult:
    """Prune a copy of ``dense`` by ``policy`` to ``budget``, fine-tune and measure it.
    ``on_epoch`` and ``on_pruned`` are the method's callbacks (see :class:`MethodContext`)."""
    check_policy(policy)
    device = next(dense.parameters()).device
    seed_everything(cfg.seed)
    dense_metrics = dense_metrics or measure_model(dense, task, cfg.measure, test=test)
    dense_cost = Cost(dense_metrics["flops"], dense_metrics["params"], {})
    method = METHODS.get(policy.method)
    pruned = method(MethodContext(task, dense, policy, budget, cfg, dense_cost, device, on_epoch, on_pruned))
    model = pruned.model
    fold_masks(model)
    out = measure_model(model, task, cfg.measure, test=test)
    out["flops_ratio"] = out["flops"] / dense_metrics["flops"]
    out["params_ratio"] = out["params"] / dense_metrics["params"]
    out["ideal_speedup"] = 1.0 / out["flops_ratio"]
    by_batch = dense_metrics.get("latency_ms_by_batch", {})
    out["speedup_by_batch"] = {b: by_batch[b] / t for b, t in out["latency_ms_by_batch"].items() if b in by_batch}
    out["speedup"] = out["speedup_by_batch"].get("1", next(iter(out["speedup_by_batch"].values()), None))
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
    )
