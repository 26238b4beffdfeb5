"""Pruning criteria: small registered classes that return one score per weight.

A criterion scores every weight of the layers it is given; ``channel_scores`` reduces those
scores over each channel group (sum by default; mean or max) so that the lowest-scored
channels are pruned first. Formulas and references: ``shared/design/PRUNING.md`` section 2.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from .errors import AutopruneError
from .graph import PRUNABLE_TYPES, PrunableGraph
from .registry import Registry

Scores = dict[str, torch.Tensor]  # module name -> one score per element of its weight


@dataclass
class ScoreContext:
    """What a criterion may look at."""

    model: nn.Module  # the dense network, in eval mode; criteria must leave it as they found it
    modules: dict[str, nn.Module]  # the layers to score, by name
    data: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # scoring batches (data criteria)
    seed: int = 0
    options: dict[str, Any] = field(default_factory=dict)


class Criterion:
    """Base class. Subclasses set ``name`` and implement :meth:`score`."""

    name: ClassVar[str]
    structures: ClassVar[tuple[str, ...]] = ("channel", "unstructured")
    needs_data: ClassVar[bool] = False  # data-dependent criteria get ctx.data
    options: ClassVar[dict[str, Any]] = {}  # allowed options and their defaults

    def __init__(self, **options: Any) -> None:
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            allowed = ", ".join(self.options) or "none"
            raise AutopruneError(f"criterion {self.name!r} has no option(s) {', '.join(unknown)}; allowed: {allowed}")
        self.opts = {**self.options, **options}

    def score(self, ctx: ScoreContext) -> Scores:
        raise NotImplementedError


CRITERIA: Registry[type[Criterion]] = Registry("criterion")


def register(cls: type[Criterion]) -> type[Criterion]:
    return CRITERIA.register(cls.name)(cls)


def make_criterion(name: str, options: dict[str, Any] | None = None) -> Criterion:
    return CRITERIA.get(name)(**(options or {}))


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
            raise AutopruneError(f"magnitude option p must be 1 or 2, got {self.opts['p']!r}")

    def score(self, ctx: ScoreContext) -> Scores:
        p = self.opts["p"]
        return {n: m.weight.detach().abs().pow(p).cpu() for n, m in ctx.modules.items()}


def scored_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The conv and linear layers (the weights a criterion scores)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, PRUNABLE_TYPES)}


def channel_scores(graph: PrunableGraph, scores: Scores, reduction: str = "sum") -> dict[str, np.ndarray]:
    """One score per channel of every group: the scores of all weights the channel touches
    (its filters, and the input slices of its consumers) reduced by sum, mean or max."""
    modules = dict(graph.model.named_modules())
    out: dict[str, np.ndarray] = {}
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
        if reduction == "sum":
            value = total
        elif reduction == "mean":
            value = total / count.clamp(min=1)
        else:
            value = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
        out[group.name] = value.numpy()
    return out


def normalise(channel: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Divide each group's scores by their mean magnitude, so one global threshold compares
    groups of different sizes and scales."""
    out = {}
    for name, s in channel.items():
        scale = float(np.abs(s).mean())
        out[name] = s / scale if scale > 0 else s
    return out
