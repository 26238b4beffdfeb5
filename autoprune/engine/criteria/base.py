"""The criterion interface and registry, and how per-weight scores become channel scores.

A criterion scores every weight of the layers it is given; ``channel_scores`` reduces those
scores over each channel group (sum by default; mean or max) so that the lowest-scored
channels are pruned first. Formulas and references: ``docs/src/design/pruning.md``, "Criteria".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from ...errors import AutopruneError
from ...registry import Registry
from ...schema import Spec
from ..graph import PRUNABLE_TYPES, PrunableGraph

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
    loss: Any = None  # the task's own loss(outputs, target); None: cross-entropy of the prediction
    predict: Any = None  # the task's prediction of the model's outputs (Task.prediction); None: the first tensor


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
    options: ClassVar[dict[str, Spec]] = {}  # each option's type and bounds
    defaults: ClassVar[dict[str, Any]] = {}  # and its default

    def __init__(self, **options: Any) -> None:
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            allowed = ", ".join(self.options) or "none"
            raise AutopruneError(f"criterion {self.name!r} has no option(s) {', '.join(unknown)}; allowed: {allowed}")
        self.opts = {
            key: spec.check(options.get(key, self.defaults[key]), f"criterion {self.name!r} option {key}")
            for key, spec in self.options.items()
        }

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
