"""The stages of one pruning step, shared by every method: scoring data, BN warm-up, the
layers a policy keeps, criterion scores, the budget solve and the prune itself."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from ..config import BUDGET_KINDS, Budget, Policy
from ..errors import AutopruneError
from . import criteria as crit
from .costs import CostModel
from .graph import PRUNABLE_TYPES, PrunableGraph, clone
from .latency import LatencyTable, module_widths
from .measure import Cost, flops_by_module, measure
from .prune import fold_masks, mask_weights, prune_channels
from .solver import LayerInfo, max_masked, max_pruned, solve_channels, solve_masks
from .tasks import Task, labels_of


def warmup_on(policy: Policy) -> bool:
    """Whether BN warm-up runs for ``policy``: as set, or by default for data-dependent criteria."""
    if policy.bn_warmup is not None:
        return bool(policy.bn_warmup)
    return crit.CRITERIA.get(policy.criterion).needs_data


def scoring_batches(task: Task, per_class: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A fixed, seeded subset of the training split: ``per_class`` samples of every class."""
    labels = labels_of(task.train)
    rng = np.random.default_rng(seed)
    picked = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        picked.extend(rng.choice(idx, size=min(per_class, len(idx)), replace=False).tolist())
    picked.sort()
    xs, ys = zip(*(task.train[i] for i in picked))
    x, y = torch.stack(list(xs)), torch.as_tensor(ys)
    b = task.batch_size
    return [(x[i : i + b], y[i : i + b]) for i in range(0, len(y), b)]


def bn_warmup(model: nn.Module, batches, device: torch.device) -> None:
    """Refresh BN running statistics on ``batches`` (train mode, no gradients): only the
    statistics change, computed as an exact average over the batches."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    was_training = model.training
    model.train()
    with torch.no_grad():
        for x, _ in batches:
            model(x.to(device))
    for m, mom in zip(norms, saved):
        m.momentum = mom
    model.train(was_training)


def bn_warmup_train(model: nn.Module, task: Task, max_batches: int | None, seed: int, device: torch.device) -> None:
    """The second-order pruning-at-initialisation study's warm-up: one pass over the training
    split (shuffled, seeded; at most ``max_batches`` batches) in train mode with each BN
    layer's own momentum, no gradients. Only the running statistics change."""
    was_training = model.training
    model.train()
    with torch.no_grad():
        for i, (x, _) in enumerate(task.loader("train", shuffle=True, seed=seed, device=device)):
            if max_batches is not None and i >= max_batches:
                break
            model(x.to(device))
    model.train(was_training)


_KEEP_TYPES = {
    "conv": (nn.Conv1d, nn.Conv2d, nn.Conv3d),
    "conv1d": (nn.Conv1d,),
    "conv2d": (nn.Conv2d,),
    "conv3d": (nn.Conv3d,),
    "linear": (nn.Linear,),
}


def kept_layers(model: nn.Module, policy: Policy, example: torch.Tensor) -> set[str]:
    """The conv / linear layers ``policy`` leaves untouched: by name glob (``keep``), by type
    (``keep_types``) and the output layer (``keep_classifier``). A glob that matches no layer
    is an error naming the layers there are."""
    from fnmatch import fnmatchcase

    from .models import classifier_layer

    layers = crit.scored_modules(model)
    types = tuple(t for k in policy.keep_types for t in _KEEP_TYPES[k])
    kept = {n for n, m in layers.items() if types and isinstance(m, types)}
    for glob in policy.keep:
        hits = {n for n in layers if fnmatchcase(n, glob)}
        if not hits:
            raise AutopruneError(
                f"--keep {glob!r} matches no conv or linear layer; the layers are: {', '.join(layers)}"
            )
        kept |= hits
    if policy.keep_classifier:
        names = {m: n for n, m in model.named_modules()}
        kept.add(names[classifier_layer(model, example)])
    return kept


def score(
    model: nn.Module,
    policy: Policy,
    data,
    seed: int,
    example: torch.Tensor | None = None,
    density: float | None = None,
) -> crit.Scores:
    """Per-weight scores of the conv/linear layers (and, for some criteria, norm layers) by
    the policy's criterion. A model carrying weight masks is scored as a folded copy."""
    criterion = crit.make_criterion(policy.criterion, policy.criterion_options)
    if criterion.needs_data and not data:
        raise AutopruneError(f"criterion {policy.criterion!r} needs scoring data")
    if any(hasattr(m, "weight_mask") for m in model.modules()):
        model = clone(model)
        fold_masks(model)
    was_training = model.training
    model.eval()
    ctx = crit.ScoreContext(
        model=model,
        modules=crit.scored_modules(model),
        data=data if criterion.needs_data else None,
        seed=seed,
        structure=policy.structure,
        example=example,
        density=density,
    )
    try:
        scores = criterion.score(ctx)
    finally:
        model.train(was_training)
    for name, s in scores.items():
        if not torch.isfinite(s).all():
            raise AutopruneError(
                f"criterion {policy.criterion!r} gave non-finite scores for {name}; the model may have "
                "diverged, or the criterion's options overflow"
            )
    return scores


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
) -> Pruned:
    """Solve the budget for ``scores`` and prune a copy of ``model`` to it. Channel plans are
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
        counts, estimate = solve_unstructured(model, task, policy, budget, scores, dense_cost)
        pruned = clone(model)
        fold_masks(pruned)
        mask_weights(pruned, counts, below_zeros(pruned, scores))
        sizes = {n: m.weight.numel() for n, m in pruned.named_modules() if n in counts}
        ratios = {n: k / sizes[n] for n, k in counts.items()}
        return Pruned(pruned, "unstructured", [], ratios, estimate, counts=counts, sizes=sizes)

    names, sizes, channel, costs = channel_problem(model, example, policy, scores, graph)
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
        plan = solve_channels(names, sizes, channel, policy, budget, cost_fn, dense, target, floors)
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


def below_zeros(model: nn.Module, scores: crit.Scores) -> crit.Scores:
    """Scores with already-zero weights set to -inf, so masks only ever grow."""
    out = dict(scores)
    for n, m in model.named_modules():
        if n in scores and isinstance(m, PRUNABLE_TYPES):
            out[n] = torch.where(m.weight.detach().cpu() == 0, -torch.inf, scores[n].double())
    return out


def leave_kept(graph: PrunableGraph, model: nn.Module, policy: Policy, example: torch.Tensor) -> PrunableGraph:
    """``graph`` without the groups that touch a layer ``policy`` keeps (their outputs or
    their inputs): those are never pruned, nor checked by a dry run."""
    kept = kept_layers(model, policy, example)
    if kept:
        graph.groups = [g for g in graph.groups if not any(it.module in kept for it in g.items)]
        graph.by_name = {g.name: g for g in graph.groups}
        if not graph.groups:
            raise AutopruneError(
                "every channel group touches a kept layer (--keep, --keep-types, "
                "--keep-classifier): nothing is left to prune"
            )
    return graph


def channel_problem(
    model: nn.Module,
    example: torch.Tensor,
    policy: Policy,
    scores: crit.Scores,
    graph: PrunableGraph | None = None,
) -> tuple[list[str], list[int], dict[str, np.ndarray], CostModel]:
    """The channel solver's inputs: group names and sizes, channel scores (normalised per
    group for global scope) and the cost model."""
    graph = graph or PrunableGraph(clone(model), example, embedding=policy.embedding)
    graph = leave_kept(graph, model, policy, example)
    if policy.scope == "per_layer":
        graph.check_names(policy.ratios or {})
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


def collapse_report(pruned: Pruned, policy: Policy) -> dict[str, Any]:
    """Per group (channel) or layer (unstructured): the kept fraction; and which were pruned
    to their floor (one channel, or ``max_ratio``) or emptied, so collapse is visible."""
    kept, at_floor, empty = {}, [], []
    for name, ratio in pruned.ratios.items():
        size = pruned.sizes.get(name)
        kept[name] = 1.0 - ratio
        if not size:
            continue
        removed = int(round(ratio * size))
        if removed >= size:
            empty.append(name)
        elif removed >= (max_pruned if pruned.structure == "channel" else max_masked)(size, policy.max_ratio):
            at_floor.append(name)
    return {"kept_fraction": kept, "at_floor": at_floor, "empty": empty}
