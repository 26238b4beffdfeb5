"""Data-dependent criteria, from gradients on the scoring subset: Taylor, SNIP, GraSP,
empirical Fisher, Hutchinson."""

from __future__ import annotations

import contextlib

import numpy as np
import torch
from torch import nn

from ...errors import AutopruneError
from ...schema import integer, number
from ..graph import NORM_TYPES
from ..inputs import batch_len, to_device
from ..models import first_tensor
from .base import Criterion, ScoreContext, Scores, register

TEMPERATURE = number(0.0, low_open=True, most=1e6)  # a softmax temperature over scores


def _loss_terms(model: nn.Module, data, temperature: float = 1.0, loss=None, predict=None):
    """The weighted loss of each scoring batch; the terms sum to the mean loss over all
    scoring samples. The default loss is cross-entropy of the logits divided by
    ``temperature``; a task's own ``loss(outputs, target)`` is taken as it is."""
    device = next(model.parameters()).device
    n = sum(batch_len(x, y) for x, y in data)
    for x, y in data:
        x, y = to_device(x, device), to_device(y, device)
        yield _loss(model(x), y, temperature, loss, predict) * (batch_len(x, y) / n)


def _loss(outputs, y, temperature: float, loss, predict) -> torch.Tensor:
    if loss is not None:
        return loss(outputs, y)
    return nn.functional.cross_entropy((predict or first_tensor)(outputs) / temperature, y)


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
            for loss in _loss_terms(ctx.model, ctx.data, temperature, ctx.loss, ctx.predict):
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
    options = {"temperature": TEMPERATURE}
    defaults = {"temperature": 200.0}

    def score(self, ctx: ScoreContext) -> Scores:
        names, params = _weights(ctx)
        temp = float(self.opts["temperature"])
        g = self.gradient(ctx, params, temp)
        hg = [torch.zeros_like(p) for p in params]
        with self._trainable(params):
            for loss in _loss_terms(ctx.model, ctx.data, temp, ctx.loss, ctx.predict):
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
    options = {"chunk_mb": number(0.0, low_open=True, most=65_536)}
    defaults = {"chunk_mb": 256}

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
            return _loss(out, y.unsqueeze(0), 1.0, ctx.loss, ctx.predict)

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
    options = {"probes": integer(1, most=10_000), "temperature": TEMPERATURE}
    defaults = {"probes": 10, "temperature": 200.0}

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
            for loss in _loss_terms(ctx.model, ctx.data, temp, ctx.loss, ctx.predict):
                first = torch.autograd.grad(loss, params, create_graph=True)
                for i in range(probes):
                    z = probe(i)
                    dot = sum((a * b).sum() for a, b in zip(first, z))
                    hz = torch.autograd.grad(dot, params, retain_graph=i < probes - 1)
                    for acc, zi, h in zip(diag, z, hz):
                        acc += zi * h / probes
        return {n: (0.5 * w.detach().pow(2) * d).float().cpu() for n, w, d in zip(names, params, diag)}
