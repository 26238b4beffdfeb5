"""Sparse Evolutionary Training: masks at the budget from the start, drop-and-regrow while
fine-tuning (Mocanu et al. 2018). The schedule, the initial masks (ERK or the policy's
solver) and the mask update live here; :mod:`.rigl` regrows by the dense gradient instead."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from ...errors import AutopruneError
from ...schema import choice, integer, number
from ..graph import PRUNABLE_TYPES, clone
from ..hooks import TrainHook
from ..measure import flops_by_module
from ..prune import mask_weights
from ..solver import max_masked
from ..stages import Pruned, below_zeros
from ..stages.keep import kept_layers
from .base import Method, register
from .context import MethodContext
from .gradual import GRADUAL_END

SPARSE_OPTIONS = {
    "interval": integer(1, most=1_000_000, optional=True),  # training steps between mask updates
    "drop": number(0.0, 1.0, low_open=True, high_open=True, optional=True),  # share of active weights moved
    "distribution": choice(("erk", "global"), optional=True),  # how the budget is shared out over the layers
}
SPARSE_DEFAULTS = {"interval": 4, "drop": 0.3, "distribution": "erk"}
SPARSE_SPACE = {"drop": [0.1, 0.3, 0.5], "distribution": ["erk", "global"]}  # the methods search space


# ------------------------------------------------------------------ the schedule


def update_end(total: int) -> int:
    """The step at which mask updates stop: ``GRADUAL_END`` of the ``total`` training steps
    (the rest recovers with the masks fixed)."""
    return max(1, int(round(GRADUAL_END * total)))


def update_steps(end: int, interval: int) -> list[int]:
    """The steps that update the masks: every ``interval`` steps, before ``end``."""
    return list(range(interval, end, interval))


# ------------------------------------------------------------------ the initial masks


def erk_weights(shape: tuple[int, ...]) -> float:
    """Erdos-Renyi-Kernel: a layer's density is proportional to the sum of its weight's
    dimensions over their product, (n_in + n_out + k_h + k_w) / (n_in * n_out * k_h * k_w)."""
    return float(sum(shape)) / float(np.prod(shape))


def erk_pruned(
    shapes: list[tuple[int, ...]], costs: list[float], caps: list[int], total: float, target: float
) -> tuple[list[int], float]:
    """Masked weights per layer for ERK densities d = min(1, eps * erk_weights), the scale eps
    bisected so the kept cost fraction is at most ``target`` and as close as fits: layer i
    costs ``costs[i]`` (its FLOPs or its weights) when dense, ``total`` is the dense model's,
    and loses at most ``caps[i]`` weights. Left-over room goes back weight by weight."""
    numel = np.array([int(np.prod(s)) for s in shapes], dtype=np.int64)
    raw = np.array([erk_weights(s) for s in shapes])
    per_weight = np.array(costs, dtype=float) / numel
    cap = np.array(caps, dtype=np.int64)

    def pruned_at(eps: float) -> np.ndarray:
        kept = np.minimum(numel, np.floor(eps * raw * numel).astype(np.int64))
        return np.minimum(cap, numel - kept)

    def fraction(pruned: np.ndarray) -> float:
        return (total - float((per_weight * pruned).sum())) / total

    lo, hi = 0.0, float((1.0 / raw).max())
    if fraction(pruned_at(lo)) > target:
        raise AutopruneError(
            f"the budget {target:g} is unreachable with ERK densities: the smallest reachable fraction is "
            f"{fraction(pruned_at(lo)):.4f} (max_ratio, the kept layers); ask for more or use distribution=global"
        )
    if fraction(pruned_at(hi)) <= target:
        return [0] * len(shapes), fraction(pruned_at(hi))
    for _ in range(200):
        mid = (lo + hi) / 2
        if mid in (lo, hi):
            break
        if fraction(pruned_at(mid)) <= target:
            lo = mid
        else:
            hi = mid
    pruned = pruned_at(lo)
    for i in np.flatnonzero(per_weight > 0):  # whole weights still fit under the target
        back = min(int(pruned[i]), int(math.floor((target - fraction(pruned)) * total / per_weight[i])))
        while back > 0:
            pruned[i] -= back
            if fraction(pruned) <= target:
                break
            pruned[i] += back
            back -= 1
    return [int(k) for k in pruned], fraction(pruned)


def erk_masks(ctx: MethodContext, model: nn.Module) -> Pruned:
    """Mask ``model`` in place to the budget with ERK densities per layer (the policy's kept
    layers stay dense), the smallest-magnitude weights of each layer going."""
    example = ctx.task.example_input().to(ctx.device)
    _, by_module = flops_by_module(model, example)
    kept = kept_layers(model, ctx.policy, example)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, PRUNABLE_TYPES) and n not in kept}
    if not layers:
        raise AutopruneError(
            "every conv and linear layer is kept (--keep, --keep-types, --keep-classifier): nothing is left to prune"
        )
    if ctx.budget.kind == "flops":
        costs, total = [by_module.get(n, 0.0) for n in layers], ctx.dense_cost.flops
    else:
        costs, total = [float(m.weight.numel()) for m in layers.values()], float(ctx.dense_cost.params)
    shapes = [tuple(m.weight.shape) for m in layers.values()]
    caps = [max_masked(m.weight.numel(), ctx.policy.max_ratio) for m in layers.values()]
    pruned, estimate = erk_pruned(shapes, costs, caps, total, ctx.budget.fraction)
    counts = dict(zip(layers, pruned))
    magnitude = {n: m.weight.detach().abs().cpu() for n, m in layers.items()}
    mask_weights(model, counts, below_zeros(model, magnitude))
    sizes = {n: m.weight.numel() for n, m in layers.items()}
    ratios = {n: k / sizes[n] for n, k in counts.items()}
    return Pruned(model, "unstructured", [], ratios, estimate, counts=counts, sizes=sizes)


def initial_masks(ctx: MethodContext, model: nn.Module, distribution: str) -> Pruned:
    """The masks sparse training starts from: ERK densities, or the policy's criterion and
    scope through the budget solver (``global``). Masked weights are zeroed underneath too
    (``weight_orig``), so weight decay and momentum leave them at zero until regrown."""
    pruned = erk_masks(ctx, model) if distribution == "erk" else ctx.prune(model, ctx.budget)
    modules = dict(pruned.model.named_modules())
    with torch.no_grad():
        for name in pruned.counts:
            module = modules[name]
            module.weight_orig.mul_(module.weight_mask.to(module.weight_orig.dtype))
    return pruned


# ------------------------------------------------------------------ the mask update


def drop_and_grow(
    module: nn.Module, fraction: float, grow: torch.Tensor | None = None, generator: torch.Generator | None = None
) -> int:
    """One mask update of a masked layer, in place: the ``fraction`` of its active weights
    with the smallest magnitude are masked, and as many of the weights inactive before the
    update are unmasked, where ``|grow|`` is largest or, without ``grow``, at random. The
    regrown weights start at zero; the dropped ones are zeroed (their gradient too). Returns
    how many moved (the layer's active count is unchanged)."""
    mask = module.weight_mask
    flat = mask.detach().flatten()
    active = flat != 0
    inactive = torch.nonzero(~active).flatten()
    n = min(int(fraction * int(active.sum())), inactive.numel())
    if n <= 0:
        return 0
    weight = module.weight_orig.detach().flatten()
    magnitude = torch.where(active, weight.abs().double(), math.inf)
    dropped = torch.topk(magnitude, n, largest=False).indices
    if grow is None:
        grown = inactive[torch.randperm(inactive.numel(), generator=generator)[:n].to(inactive.device)]
    else:
        score = torch.where(active, -math.inf, grow.detach().flatten().abs().double().to(flat.device))
        grown = torch.topk(score, n).indices
    new = flat.clone()
    new[dropped] = 0
    new[grown] = 1
    with torch.no_grad():
        mask.copy_(new.view_as(mask))
        values = weight.clone()
        values[grown] = 0
        keep = new.view_as(mask).to(values.dtype)
        module.weight_orig.copy_(values.view_as(mask) * keep)
        if module.weight_orig.grad is not None:
            module.weight_orig.grad.mul_(keep)
    return n


class SparseUpdates(TrainHook):
    """The mask updates of sparse training: after the backward pass of each step in
    ``steps``, every layer in ``layers`` drops :meth:`drop_fraction` of its active weights
    and regrows as many (:meth:`regrow`: at random here). ``updates`` records each update's
    step, drop fraction and the weights dropped (as many regrown) over all layers."""

    def __init__(self, model: nn.Module, layers, steps: list[int], end: int, drop: float, seed: int) -> None:
        modules = dict(model.named_modules())
        self.modules = {name: modules[name] for name in layers}
        self.steps, self.end, self.drop = set(steps), end, drop
        self.generator = torch.Generator().manual_seed(seed)
        self.updates: list[dict] = []

    def drop_fraction(self, step: int) -> float:
        return self.drop

    def regrow(self, name: str, module: nn.Module, fraction: float) -> int:
        return drop_and_grow(module, fraction, None, self.generator)

    def after_backward(self, step: int, total: int) -> None:
        if step in self.steps:
            self.update(step)

    def update(self, step: int) -> None:
        fraction = self.drop_fraction(step)
        moved = sum(self.regrow(name, module, fraction) for name, module in self.modules.items())
        self.updates.append({"step": step, "drop_fraction": fraction, "dropped": moved, "regrown": moved})


def sparse_training(ctx: MethodContext, method: Method, updates: type[SparseUpdates]) -> Pruned:
    """Mask a copy of the dense model to the budget, then fine-tune it with the mask updates
    of ``updates`` until ``GRADUAL_END`` of the steps; each layer's active count (so the
    budget) is held throughout. Logs the initial masks and, after fine-tuning, the final
    masks with the updates' statistics; without fine-tuning it prunes at once."""
    policy, budget = ctx.policy, ctx.budget
    settings = method.settings(policy)
    work = clone(ctx.dense)
    ctx.warm_up(work)
    pruned = initial_masks(ctx, work, settings["distribution"])
    ctx.log(0, "initial masks", budget.fraction, pruned.model)
    ctx.pruned(pruned)
    if policy.finetune.epochs == 0:
        return ctx.finish(pruned)
    total = policy.finetune.epochs * ctx.steps_per_epoch()
    end = update_end(total)
    steps = update_steps(end, settings["interval"])
    hook = updates(pruned.model, list(pruned.counts), steps, end, settings["drop"], ctx.cfg.seed)
    pruned.epochs = ctx.train(pruned.model, policy.finetune, f"fine-tune ({method.name})", hooks=[hook])
    ctx.log(total, "final masks", budget.fraction, pruned.model)
    ctx.events[-1]["updates"] = hook.updates
    return ctx.finish(pruned)


@register
class SET(Method):
    """Prune to the budget at once (ERK densities or the policy's solver), then fine-tune
    while every ``interval`` steps each layer drops the ``drop`` share of its active weights
    with the smallest magnitude and regrows as many at random (from zero), until
    ``GRADUAL_END`` of the steps; each layer's density, so the budget, is held throughout."""

    name = "set"
    family = "sparse training"
    summary = "Sparse evolutionary training: drop the smallest weights, regrow at random (Mocanu et al. 2018)."
    structures = ("unstructured",)
    options = SPARSE_OPTIONS
    defaults = SPARSE_DEFAULTS
    space = SPARSE_SPACE
    updates: type[SparseUpdates] = SparseUpdates  # the mask update rule

    def run(self, ctx: MethodContext) -> Pruned:
        return sparse_training(ctx, self, self.updates)
