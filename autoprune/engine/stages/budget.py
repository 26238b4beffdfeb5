"""The budget solve-and-verify of one pruning step: what each group or layer loses so the
model meets its budget, the prune itself (channels removed, or weights masked) and the
checks that a budget can be met."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from ...config import BUDGET_KINDS, Budget, Policy
from ...errors import AutopruneError
from .. import criteria as crit
from ..costs import CostModel
from ..graph import PRUNABLE_TYPES, PrunableGraph, clone
from ..latency import LatencyTable, module_widths
from ..measure import Cost, flops_by_module, measure
from ..prune import fold_masks, mask_weights, prune_channels
from ..solver import LayerInfo, max_pruned, solve_channels, solve_masks
from ..tasks import Task
from .keep import kept_layers, leave_kept
from .scoring import below_zeros


@dataclass
class Pruned:
    """The result of the prune stage."""

    model: nn.Module
    structure: str
    history: list  # channel: replayable torch-pruning history; unstructured: []
    ratios: dict[str, float]  # group (channel) or layer (unstructured) -> pruned fraction
    estimate: float  # the solver's estimate of the kept cost fraction
    attempts: int = 1  # solver rounds until fvcore confirmed the budget
    epochs: list[dict[str, float]] = field(default_factory=list)  # fine-tuning, per epoch
    plan: dict[str, np.ndarray] = field(default_factory=dict)  # channel: removed indices per group
    counts: dict[str, int] = field(default_factory=dict)  # unstructured: masked weights per layer
    events: list[dict[str, Any]] = field(default_factory=list)  # each pruning step: when, target, reached
    sizes: dict[str, int] = field(default_factory=dict)  # dense channels per group / weights per layer


def solve_unstructured(
    model: nn.Module, task: Task, policy: Policy, budget: Budget, scores: crit.Scores, dense_cost: Cost
) -> tuple[dict[str, int], float]:
    """Masked weights per layer (the lowest-scored go) to meet the budget, and the estimate.
    Weights that are already exactly zero (masked earlier) are ranked below everything."""
    example = task.example_input().to(next(model.parameters()).device)
    total, by_module = flops_by_module(model, example)
    kept = kept_layers(model, policy, example)
    layers = [
        LayerInfo(n, m.weight.numel(), by_module.get(n, 0.0))
        for n, m in model.named_modules()
        if isinstance(m, PRUNABLE_TYPES) and n not in kept
    ]
    if not layers:
        raise AutopruneError(
            "every conv and linear layer is kept (--keep, --keep-types, --keep-classifier): nothing is left to prune"
        )
    below = below_zeros(model, scores)
    ranked = {layer.name: below[layer.name].double().numpy() for layer in layers}
    if policy.scope == "per_layer":
        _check_names(policy.ratios or {}, [layer.name for layer in layers], "layer")
    return solve_masks(layers, ranked, policy, budget, (dense_cost.flops, float(dense_cost.params)))


def prune_to_budget(
    model: nn.Module,
    task: Task,
    policy: Policy,
    budget: Budget,
    scores: crit.Scores,
    dense_cost: Cost,
    graph: PrunableGraph | None = None,
    floors: dict[str, int] | None = None,
    latency: LatencyTable | None = None,
    target: float | None = None,
    channel: dict[str, np.ndarray] | None = None,
) -> Pruned:
    """Solve the budget for ``scores`` and prune a copy of ``model`` to it (``channel``: one
    score per channel of each group, used as given instead of ``scores``: a method's own
    measure that compares across groups, such as learned gates). Channel plans are
    checked against fvcore (FLOPs, params) or the latency table (latency, which ``latency``
    must then be) on the really pruned model and re-solved if they miss. The budget is a
    fraction of ``dense_cost``, which may be larger than ``model``'s own cost (iterative
    methods prune an already pruned model further). ``target``: aim below the budget (the
    engine does when a measured latency missed it)."""
    check_budget(policy, budget)
    if budget.kind == "latency" and latency is None:
        raise AutopruneError("a latency budget needs the model's latency table (autoprune.engine.latency_table)")
    example = task.example_input().to(next(model.parameters()).device)
    if policy.structure == "unstructured":
        return _masked_to_budget(model, task, policy, budget, scores, dense_cost)
    names, sizes, channel, costs = channel_problem(model, example, policy, scores, graph, channel)
    step = width_step(policy, latency)
    if budget.kind == "latency":
        base = module_widths(model)  # the model may be pruned already (iterative, gradual)
        dense = (dense_cost.flops, float(dense_cost.params), latency.predict())

        def cost_fn(removed):
            return (math.nan, math.nan, latency.predict({**base, **costs.widths(removed)}))

        def real(pruned) -> float:
            return latency.predict_model(pruned) / dense[2]
    else:
        which = BUDGET_KINDS.index(budget.kind)
        dense = (dense_cost.flops, float(dense_cost.params))
        cost_fn = costs.cost

        def real(pruned) -> float:
            cost = measure(pruned, task.input_shape, None, latency=False)
            return (cost.flops, cost.params)[which] / dense[which]

    ceiling = budget.fraction
    if target is not None:  # a latency budget's corrected target may lie above it (the table was pessimistic)
        ceiling = target if budget.kind == "latency" else min(target, budget.fraction)
    target = ceiling
    best = None
    for attempt in range(1, 6):
        plan = solve_channels(names, sizes, channel, policy, budget, cost_fn, dense, target, floors, step)
        pruned, history = prune_channels(model, example, plan.indices())
        real_fraction = real(pruned)
        if real_fraction <= ceiling:
            best = Pruned(
                pruned,
                "channel",
                history,
                plan.ratios(),
                plan.fraction,
                attempt,
                plan=plan.indices(),
                sizes=dict(zip(names, sizes)),
            )
            if real_fraction >= ceiling - budget.tolerance or budget.kind == "latency" or policy.exact:
                break  # (the table predicts a pruned model exactly as the solver estimated it; exact: as given)
            target += (ceiling - budget.tolerance / 2) - real_fraction
        else:
            target -= real_fraction - ceiling + 1e-4
        target = min(target, ceiling)
    if best is None:
        raise AutopruneError(
            f"could not meet --budget-{budget.kind} {budget.fraction:g}: the pruned model "
            f"measured {real_fraction:.4f}; this model has layers whose cost the solver cannot "
            "estimate"
        )
    return best


def _masked_to_budget(
    model: nn.Module, task: Task, policy: Policy, budget: Budget, scores: crit.Scores, dense_cost: Cost
) -> Pruned:
    """A copy of ``model`` with the weights :func:`solve_unstructured` picks masked."""
    counts, estimate = solve_unstructured(model, task, policy, budget, scores, dense_cost)
    pruned = clone(model)
    fold_masks(pruned)
    mask_weights(pruned, counts, below_zeros(pruned, scores))
    sizes = {n: m.weight.numel() for n, m in pruned.named_modules() if n in counts}
    ratios = {n: k / sizes[n] for n, k in counts.items()}
    return Pruned(pruned, "unstructured", [], ratios, estimate, counts=counts, sizes=sizes)


def needs_latency_table(policy: Policy, budget: Budget) -> bool:
    """Whether pruning by ``policy`` to ``budget`` needs the model's latency table: a
    latency budget, or widths rounded to the multiple it finds fastest (``round_to`` auto)."""
    return budget.kind == "latency" or policy.round_to == "auto"


def width_step(policy: Policy, latency: LatencyTable | None) -> int:
    """The multiple every pruned group's kept width is rounded to: the policy's ``round_to``,
    or for ``auto`` the one the latency table found fastest (:meth:`LatencyTable.best_step`)."""
    if policy.round_to != "auto":
        return int(policy.round_to)
    if latency is None:
        raise AutopruneError("round_to 'auto' needs the model's latency table (autoprune.engine.latency_table)")
    return latency.best_step()


def check_budget(policy: Policy, budget: Budget) -> None:
    """A latency budget needs channel pruning."""
    if budget.kind != "latency":
        return
    if policy.structure != "channel":
        raise AutopruneError(
            f"--budget-latency needs --structure channel, not {policy.structure!r}: weight masks leave every "
            "tensor its dense shape, so dense kernels run them at the dense model's speed; use --budget-flops "
            "or --budget-params for masks"
        )


def smallest_fraction(table: LatencyTable, model: nn.Module, example: torch.Tensor, max_ratio: float) -> float:
    """The smallest latency fraction channel pruning can reach on ``model`` as the table
    predicts it: every group at ``max_ratio`` (keeping one channel). 1.0 without groups."""
    try:
        graph = PrunableGraph(model, example)
    except AutopruneError:
        return 1.0  # no channel group
    costs = CostModel(graph, {}, 0.0)
    removed = [np.arange(g.size) < max_pruned(g.size, max_ratio) for g in graph.groups]
    return table.predict({**module_widths(model), **costs.widths(removed)}) / table.predict()


def channel_problem(
    model: nn.Module,
    example: torch.Tensor,
    policy: Policy,
    scores: crit.Scores,
    graph: PrunableGraph | None = None,
    channel: dict[str, np.ndarray] | None = None,
) -> tuple[list[str], list[int], dict[str, np.ndarray], CostModel]:
    """The channel solver's inputs: group names and sizes, channel scores (the criterion's,
    normalised per group for global scope; ``channel`` as given) and the cost model."""
    graph = graph or PrunableGraph(clone(model), example, embedding=policy.embedding)
    graph = leave_kept(graph, model, policy, example)
    if policy.scope == "per_layer":
        graph.check_names(policy.ratios or {})
    if channel is not None:
        channel = {g: channel[g] for g in graph.group_names()}
    else:
        criterion = crit.make_criterion(policy.criterion, policy.criterion_options)
        reduced = crit.channel_scores(graph, scores, policy.reduction, out_only=criterion.out_only)
        channel = {g: criterion.channel_value(v) for g, v in reduced.items()}
        if policy.scope == "global":
            channel = crit.normalise(channel)
    total, by_module = flops_by_module(model, example)
    names, sizes = graph.group_names(), [g.size for g in graph.groups]
    return names, sizes, channel, CostModel(graph, by_module, total)


def _check_names(ratios: dict[str, float], allowed: list[str], what: str) -> None:
    unknown = sorted(set(ratios) - set(allowed))
    if unknown:
        raise AutopruneError(
            f"unknown {what} name(s) {', '.join(unknown)}; this model's {what}s are: {', '.join(allowed)}"
        )
