"""Pruning criteria: small registered classes that return one score per weight.

A criterion scores every weight of the layers it is given; ``channel_scores`` reduces those
scores over each channel group (sum by default; mean or max) so that the lowest-scored
channels are pruned first. Formulas and references: ``shared/design/PRUNING.md`` section 2.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from .errors import AutopruneError
from .graph import NORM_TYPES, PRUNABLE_TYPES, PrunableGraph
from .registry import Registry

Scores = dict[str, torch.Tensor]  # module name -> one score per element of its weight


@dataclass
class ScoreContext:
    """What a criterion may look at."""

    model: nn.Module  # the network to score, in eval mode; criteria must leave it as they found it
    modules: dict[str, nn.Module]  # the conv/linear layers to score, by name
    data: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # scoring batches (data criteria only)
    seed: int = 0
    structure: str = "channel"  # what the scores will prune: "channel" or "unstructured"
    example: torch.Tensor | None = None  # one input batch (data-free criteria use its shape)
    density: float | None = None  # fraction of weights expected to survive (synflow's schedule)


class Criterion:
    """Base class. Subclasses set ``name`` and implement :meth:`score`.

    ``score`` returns one value per weight, keyed by module name, with the weight's shape;
    the lowest values are pruned first. Besides conv/linear layers a criterion may score
    norm layers (``bn_scale``, ``taylor``). For channels the per-weight values of a group are
    reduced (:func:`channel_scores`), over every coupled slice or, with ``out_only``, over
    the group's own filters and norm entries only, then passed through :meth:`channel_value`.
    """

    name: ClassVar[str]
    structures: ClassVar[tuple[str, ...]] = ("channel", "unstructured")
    needs_data: ClassVar[bool] = False  # data-dependent criteria get ctx.data
    out_only: ClassVar[bool] = False  # channel reduction over output slices only
    options: ClassVar[dict[str, Any]] = {}  # allowed options and their defaults

    def __init__(self, **options: Any) -> None:
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            allowed = ", ".join(self.options) or "none"
            raise AutopruneError(f"criterion {self.name!r} has no option(s) {', '.join(unknown)}; allowed: {allowed}")
        self.opts = {**self.options, **options}
        for key, default in self.options.items():
            value = self.opts[key]
            if isinstance(default, (int, float)) and not isinstance(default, bool):
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                    raise AutopruneError(f"criterion {self.name!r} option {key} must be a number > 0, got {value!r}")

    def score(self, ctx: ScoreContext) -> Scores:
        raise NotImplementedError

    def channel_value(self, reduced: np.ndarray) -> np.ndarray:
        """A channel's score from its group's reduced per-weight scores."""
        return reduced


CRITERIA: Registry[type[Criterion]] = Registry("criterion")


def register(cls: type[Criterion]) -> type[Criterion]:
    return CRITERIA.register(cls.name)(cls)


def make_criterion(name: str, options: dict[str, Any] | None = None) -> Criterion:
    return CRITERIA.get(name)(**(options or {}))


# ------------------------------------------------------------------ data-free


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
    options = {"p": 1}

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        if self.opts["p"] not in (1, 2):
            raise AutopruneError(f"magnitude option p must be 1 (L1) or 2 (L2), got {self.opts['p']!r}")

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
    options = {"rounds": 100}

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


# ------------------------------------------------------------------ data-dependent


def _loss_terms(model: nn.Module, data, temperature: float = 1.0):
    """The weighted cross-entropy of each scoring batch; the terms sum to the mean loss over
    all scoring samples (logits divided by ``temperature``)."""
    device = next(model.parameters()).device
    n = sum(len(y) for _, y in data)
    for x, y in data:
        x, y = x.to(device), y.to(device)
        yield nn.functional.cross_entropy(model(x) / temperature, y) * (len(y) / n)


class _GradCriterion(Criterion):
    """Shared plumbing: gradients of the scoring loss with respect to the scored weights."""

    needs_data = True

    def _check(self, ctx: ScoreContext) -> None:
        if not ctx.data:
            raise AutopruneError(f"criterion {self.name!r} needs scoring data (a data-dependent criterion)")

    @staticmethod
    @contextlib.contextmanager
    def _trainable(params: list[torch.Tensor]):
        saved = [p.requires_grad for p in params]
        for p in params:
            p.requires_grad_(True)
        try:
            with torch.enable_grad():
                yield
        finally:
            for p, r in zip(params, saved):
                p.requires_grad_(r)

    def gradient(self, ctx: ScoreContext, params: list[torch.Tensor], temperature: float = 1.0) -> list[torch.Tensor]:
        """Gradient of the mean scoring loss, accumulated over the scoring batches."""
        self._check(ctx)
        total = [torch.zeros_like(p) for p in params]
        with self._trainable(params):
            for loss in _loss_terms(ctx.model, ctx.data, temperature):
                for acc, g in zip(total, torch.autograd.grad(loss, params)):
                    acc += g
        return total


def _weights(ctx: ScoreContext) -> tuple[list[str], list[torch.Tensor]]:
    return list(ctx.modules), [m.weight for m in ctx.modules.values()]


@register
class TaylorCriterion(_GradCriterion):
    """First-order Taylor estimate of the loss change (Molchanov et al. 2019). Unstructured:
    |w * g|. Channels: the signed w * g is summed over the whole group (filters, the input
    slices of consumers, and BN gamma * dgamma + beta * dbeta) and squared."""

    name = "taylor"

    def score(self, ctx: ScoreContext) -> Scores:
        names, params = _weights(ctx)
        norms = {}
        if ctx.structure == "channel":
            norms = {n: m for n, m in ctx.model.named_modules() if isinstance(m, NORM_TYPES) and m.affine}
        extra = [p for m in norms.values() for p in (m.weight, m.bias)]
        grads = self.gradient(ctx, params + extra)
        out = {}
        for n, w, g in zip(names, params, grads):
            wg = w.detach() * g
            out[n] = (wg if ctx.structure == "channel" else wg.abs()).float().cpu()
        for i, (n, m) in enumerate(norms.items()):
            gw, gb = grads[len(params) + 2 * i], grads[len(params) + 2 * i + 1]
            out[n] = (m.weight.detach() * gw + m.bias.detach() * gb).float().cpu()
        return out

    def channel_value(self, reduced: np.ndarray) -> np.ndarray:
        return reduced**2


@register
class SNIPCriterion(_GradCriterion):
    """Connection sensitivity (Lee et al. 2019): |w * g| divided by its sum over all scored
    weights, from one pass over the scoring data."""

    name = "snip"

    def score(self, ctx: ScoreContext) -> Scores:
        names, params = _weights(ctx)
        grads = self.gradient(ctx, params)
        raw = [(w.detach() * g).abs() for w, g in zip(params, grads)]
        total = sum(float(r.double().sum()) for r in raw) or 1.0
        return {n: (r.double() / total).float().cpu() for n, r in zip(names, raw)}


@register
class GraSPCriterion(_GradCriterion):
    """Gradient signal preservation (Wang et al. 2020): w * (H g), with g the (detached)
    gradient and H the Hessian of the loss on logits divided by ``temperature``; one
    Hessian-vector product. Signed; the lowest go first."""

    name = "grasp"
    options = {"temperature": 200.0}

    def score(self, ctx: ScoreContext) -> Scores:
        names, params = _weights(ctx)
        temp = float(self.opts["temperature"])
        g = self.gradient(ctx, params, temp)
        hg = [torch.zeros_like(p) for p in params]
        with self._trainable(params):
            for loss in _loss_terms(ctx.model, ctx.data, temp):
                first = torch.autograd.grad(loss, params, create_graph=True)
                dot = sum((a * b).sum() for a, b in zip(first, g))
                for acc, h in zip(hg, torch.autograd.grad(dot, params)):
                    acc += h
        return {n: (w.detach() * h).float().cpu() for n, w, h in zip(names, params, hg)}


@register
class FisherCriterion(_GradCriterion):
    """Optimal-brain-damage saliency with the empirical Fisher diagonal: 1/2 * w^2 * F with
    F = mean over scoring samples of the per-sample squared gradient. Per-sample gradients
    come from torch.func (vmap over grad), in chunks sized to ``chunk_mb`` of memory."""

    name = "fisher"
    options = {"chunk_mb": 256}

    def score(self, ctx: ScoreContext) -> Scores:
        from torch.func import functional_call, grad, vmap

        self._check(ctx)
        model = ctx.model
        names = list(ctx.modules)
        keys = [f"{n}.weight" if n else "weight" for n in names]
        state = {k: v.detach() for k, v in {**dict(model.named_parameters()), **dict(model.named_buffers())}.items()}
        weights = {k: state[k] for k in keys}
        rest = {k: v for k, v in state.items() if k not in weights}

        def loss_one(w, x, y):
            out = functional_call(model, {**rest, **w}, (x.unsqueeze(0),))
            return nn.functional.cross_entropy(out, y.unsqueeze(0))

        per_sample = vmap(grad(loss_one), in_dims=(None, 0, 0))
        nbytes = sum(w.numel() * w.element_size() for w in weights.values())  # one sample's gradients
        chunk = max(1, int(self.opts["chunk_mb"] * 2**20 // nbytes))
        device = next(model.parameters()).device
        sq = {k: torch.zeros_like(w) for k, w in weights.items()}
        count = 0
        for x, y in ctx.data:
            x, y = x.to(device), y.to(device)
            for i in range(0, len(y), chunk):
                g = per_sample(weights, x[i : i + chunk], y[i : i + chunk])
                for k in sq:
                    sq[k] += g[k].pow(2).sum(0)
            count += len(y)
        return {n: (0.5 * weights[k].pow(2) * sq[k] / count).float().cpu() for n, k in zip(names, keys)}


@register
class HutchinsonCriterion(_GradCriterion):
    """Optimal-brain-damage saliency with the Hessian diagonal: 1/2 * w^2 * diag(H), where
    diag(H) is Hutchinson's estimate, the mean over ``probes`` Rademacher vectors z of
    z * (H z), each H z a Hessian-vector product (double backward) of the loss on logits
    divided by ``temperature``. Signed: negative curvature is pruned first."""

    name = "hutchinson"
    options = {"probes": 10, "temperature": 200.0}

    def score(self, ctx: ScoreContext) -> Scores:
        self._check(ctx)
        names, params = _weights(ctx)
        probes = int(self.opts["probes"])
        temp = float(self.opts["temperature"])
        diag = [torch.zeros_like(p) for p in params]

        def probe(i: int) -> list[torch.Tensor]:
            gen = torch.Generator().manual_seed(ctx.seed * 100_003 + i)
            return [(torch.randint(0, 2, p.shape, generator=gen) * 2 - 1).to(p) for p in params]

        with self._trainable(params):
            for loss in _loss_terms(ctx.model, ctx.data, temp):
                first = torch.autograd.grad(loss, params, create_graph=True)
                for i in range(probes):
                    z = probe(i)
                    dot = sum((a * b).sum() for a, b in zip(first, z))
                    hz = torch.autograd.grad(dot, params, retain_graph=i < probes - 1)
                    for acc, zi, h in zip(diag, z, hz):
                        acc += zi * h / probes
        return {n: (0.5 * w.detach().pow(2) * d).float().cpu() for n, w, d in zip(names, params, diag)}


def scored_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The conv and linear layers (the weights a criterion scores)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, PRUNABLE_TYPES)}


def channel_scores(
    graph: PrunableGraph, scores: Scores, reduction: str = "sum", out_only: bool = False
) -> dict[str, np.ndarray]:
    """One score per channel of every group: the scores of all weights the channel touches
    (its filters and norm entries and, unless ``out_only``, the input slices of its
    consumers) reduced by sum, mean or max."""
    modules = dict(graph.model.named_modules())
    out: dict[str, np.ndarray] = {}
    unscored = []
    for group in graph.groups:
        total = torch.zeros(group.size, dtype=torch.float64)
        count = torch.zeros(group.size, dtype=torch.float64)
        peak = torch.full((group.size,), -torch.inf, dtype=torch.float64)
        for item in group.items:
            s = scores.get(item.module)
            if s is None:
                continue
            idxs = torch.as_tensor(item.idxs, dtype=torch.long)
            if item.dim == "out":
                sel = s.index_select(0, idxs)
            elif out_only:
                continue
            else:
                module = modules[item.module]
                if getattr(module, "groups", 1) != 1 or s.dim() < 2:
                    continue  # a grouped conv's input slices are tied to its own output group
                sel = s.index_select(1, idxs).transpose(0, 1)
            sel = sel.reshape(len(idxs), -1).double()
            roots = torch.as_tensor(item.root_idxs, dtype=torch.long)
            total.index_add_(0, roots, sel.sum(1))
            count.index_add_(0, roots, torch.full((len(idxs),), float(sel.shape[1]), dtype=torch.float64))
            peak.scatter_reduce_(0, roots, sel.amax(1), reduce="amax")
        if not count.any():
            unscored.append(group.name)
        if reduction == "sum":
            value = total
        elif reduction == "mean":
            value = total / count.clamp(min=1)
        else:
            value = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
        out[group.name] = value.numpy()
    if unscored:
        raise AutopruneError(
            f"the criterion scores no layer of group(s) {', '.join(unscored)} (for example bn_scale needs a "
            "batch norm in every group); choose another criterion"
        )
    return out


def normalise(channel: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Divide each group's scores by their mean magnitude, so one global threshold compares
    groups of different sizes and scales."""
    out = {}
    for name, s in channel.items():
        scale = float(np.abs(s).mean())
        out[name] = s / scale if scale > 0 else s
    return out
