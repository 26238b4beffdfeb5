"""Data-free criteria: random, magnitude, FPGM, BN scale, SynFlow."""

from __future__ import annotations

import copy

import torch

from ...errors import AutopruneError
from ...schema import MAX_STEPS, integer
from ..graph import NORM_TYPES
from .base import Criterion, ScoreContext, Scores, register


@register
class RandomCriterion(Criterion):
    """U(0, 1) per weight, seeded: the baseline every comparison must include."""

    name = "random"

    def score(self, ctx: ScoreContext) -> Scores:
        gen = torch.Generator().manual_seed(ctx.seed)
        return {n: torch.rand(m.weight.shape, generator=gen) for n, m in ctx.modules.items()}


@register
class MagnitudeCriterion(Criterion):
    """|w|^p per weight; summed over a filter it is the L1 filter norm of Li et al. 2016
    (p=1), or the squared L2 norm (p=2, the ``l2`` variant: same ranking as the L2 norm)."""

    name = "magnitude"
    options = {"p": integer(1, 2)}  # 1: L1, 2: squared L2
    defaults = {"p": 1}

    def score(self, ctx: ScoreContext) -> Scores:
        p = self.opts["p"]
        return {n: m.weight.detach().abs().pow(p).float().cpu() for n, m in ctx.modules.items()}


def _filters(weight: torch.Tensor) -> torch.Tensor:
    return weight.detach().reshape(weight.shape[0], -1).double()


@register
class FPGMCriterion(Criterion):
    """Filter pruning via the geometric median (He et al. 2019): a filter's summed Euclidean
    distance to the other filters of its layer, on the raw (signed) weights. The filter
    nearest the geometric median is the most replaceable and goes first. Every weight of a
    filter carries its filter's distance; the reduction covers output slices only."""

    name = "fpgm"
    structures = ("channel",)
    out_only = True

    def score(self, ctx: ScoreContext) -> Scores:
        out = {}
        for n, m in ctx.modules.items():
            f = _filters(m.weight)
            dist = torch.cdist(f, f).sum(1)
            out[n] = dist.float().cpu().view(-1, *([1] * (m.weight.dim() - 1))).expand(m.weight.shape).clone()
        return out


@register
class BNScaleCriterion(Criterion):
    """|gamma| of the batch norm on each channel (network slimming, Liu et al. 2017). Scores
    the norm layers only; a group without a norm layer cannot be ranked by it."""

    name = "bn_scale"
    structures = ("channel",)
    out_only = True

    def score(self, ctx: ScoreContext) -> Scores:
        out = {
            n: m.weight.detach().abs().float().cpu()
            for n, m in ctx.model.named_modules()
            if isinstance(m, NORM_TYPES) and getattr(m, "weight", None) is not None
        }
        if not out:
            raise AutopruneError("criterion 'bn_scale' needs batch-norm layers with a scale; this model has none")
        return out


@register
class SynFlowCriterion(Criterion):
    """Iterative synaptic flow (Tanaka et al. 2020), data-free. On a float64 copy of the
    network with every parameter and BN statistic replaced by its absolute value, R is the
    sum of the output for an all-ones input and a weight scores |w * dR/dw|. Over ``rounds``
    rounds the lowest-scored weights are masked globally down to the density
    d**(k/rounds) (the exponential schedule), d being ``ctx.density``.

    The returned score ranks weights by when they were masked: k + s/max(s) for a weight
    masked in round k (s its score in that round), rounds + s/max(s) for a survivor, so the
    budget solver removes them in the order the iteration did. The model is not touched."""

    name = "synflow"
    options = {"rounds": integer(1, most=MAX_STEPS)}
    defaults = {"rounds": 100}

    def score(self, ctx: ScoreContext) -> Scores:
        if ctx.example is None:
            raise AutopruneError("criterion 'synflow' needs an example input for the input shape")
        rounds = int(self.opts["rounds"])
        density = 1.0 if ctx.density is None else min(max(float(ctx.density), 0.0), 1.0)
        if density >= 1.0:
            rounds = 1
        net = copy.deepcopy(ctx.model).double().eval()
        with torch.no_grad():
            for t in list(net.parameters()) + list(net.buffers()):
                if t.is_floating_point():
                    t.abs_()
        layers = {n: net.get_submodule(n) for n in ctx.modules}
        weights = {n: m.weight for n, m in layers.items()}
        original = {n: w.detach().clone() for n, w in weights.items()}
        alive = {n: torch.ones_like(w, dtype=torch.bool) for n, w in weights.items()}
        rank = {n: torch.zeros_like(w) for n, w in weights.items()}
        for p in net.parameters():
            p.requires_grad_(False)
        for w in weights.values():
            w.requires_grad_(True)
        x = torch.ones_like(ctx.example[:1], dtype=torch.float64, device=next(net.parameters()).device)
        total = sum(w.numel() for w in weights.values())
        for k in range(1, rounds + 1):
            with torch.no_grad():
                for n, w in weights.items():
                    w.copy_(original[n] * alive[n])
            grads = torch.autograd.grad(net(x).sum(), list(weights.values()))
            s = {n: (w.detach() * g).abs() for (n, w), g in zip(weights.items(), grads)}
            top = max(float(v.max()) for v in s.values()) or 1.0
            keep = int(round(total * density ** (k / rounds)))
            if k == rounds:
                for n in s:
                    rank[n] = torch.where(alive[n], rounds + s[n] / top, rank[n])
                break
            # mask globally down to this round's density; already masked weights rank lowest
            flat = torch.cat([torch.where(alive[n], s[n], -1.0).flatten() for n in s])
            drop = _lowest(flat, total - keep)
            offset = 0
            for n in s:
                gone = drop[offset : offset + s[n].numel()].view_as(s[n])
                rank[n] = torch.where(gone & alive[n], k + s[n] / top, rank[n])
                alive[n] = alive[n] & ~gone
                offset += s[n].numel()
        return {n: r.float().cpu() for n, r in rank.items()}


def _lowest(values: torch.Tensor, k: int) -> torch.Tensor:
    """A mask of the ``k`` smallest values, ties at the threshold broken by index: linear
    time (a selection, not a sort), and deterministic."""
    drop = torch.zeros_like(values, dtype=torch.bool)
    if k <= 0:
        return drop
    threshold = torch.kthvalue(values.cpu(), k).values.to(values.device)
    drop = values < threshold
    ties = torch.nonzero(values == threshold).flatten()[: k - int(drop.sum())]
    drop[ties] = True
    return drop
