"""Training hooks: what a method adds to :func:`autoprune.engine.train` without editing it.

A hook overrides any of three calls, each a no-op by default: ``on_step_start`` (before the
forward pass of every step: a pruning schedule, masks held at zero), ``after_backward``
(gradients are computed, the optimiser has not stepped: a sparsity penalty on the
gradients, a regrowth rule that looks at them) and ``on_epoch_end`` (after the epoch's
validation). A hook keeps what it needs (the model, a graph) itself.

:class:`ChannelMask` is the reusable piece for channels that are zeroed rather than removed
while a network trains (gradual pruning; sparse training that regrows channels).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
from torch import nn

from ..errors import AutopruneError
from .graph import PrunableGraph
from .prune import prune_channels


class TrainHook:
    """Base class; ``step`` counts optimiser steps from 0 over the whole run of ``total``."""

    def on_step_start(self, step: int, total: int) -> None:
        """Before the forward pass of ``step`` (and before its learning rate is set)."""

    def after_backward(self, step: int, total: int) -> None:
        """After ``loss.backward()`` of ``step``, before the optimiser step."""

    def on_epoch_end(self, epoch: int, metrics: dict[str, float]) -> None:
        """After ``epoch`` (from 0) and its validation: ``loss``, ``val_acc``, ``val_loss``."""


class Hooks(TrainHook):
    """Several hooks run in order as one."""

    def __init__(self, hooks: Iterable[TrainHook] = ()) -> None:
        self.hooks = list(hooks)

    @classmethod
    def of(cls, hooks: TrainHook | Iterable[TrainHook] | None) -> Hooks:
        if hooks is None:
            return cls()
        if isinstance(hooks, TrainHook):
            return cls([hooks])
        return cls(hooks)

    def on_step_start(self, step: int, total: int) -> None:
        for hook in self.hooks:
            hook.on_step_start(step, total)

    def after_backward(self, step: int, total: int) -> None:
        for hook in self.hooks:
            hook.after_backward(step, total)

    def on_epoch_end(self, epoch: int, metrics: dict[str, float]) -> None:
        for hook in self.hooks:
            hook.on_epoch_end(epoch, metrics)


class ChannelMask(TrainHook):
    """Channels held at zero while the network trains, keyed by group, as indices of the
    dense (unpruned) group. Before every step the masked channels' filters, biases and norm
    scale/shift are zeroed again (optimiser updates, momentum and weight decay would revive
    them); the network then computes what the physically pruned one would.

    The masks may grow (:meth:`grow`: pruning only adds channels) or be set outright
    (:meth:`set`: a method that regrows channels drops them from the mask; they restart from
    zero). :meth:`pruned_copy` removes the masked channels physically."""

    def __init__(self, graph: PrunableGraph) -> None:
        self.graph = graph
        self.sizes = {g.name: g.size for g in graph.groups}
        self.plan: dict[str, np.ndarray] = {name: np.zeros(0, dtype=int) for name in self.sizes}

    def kept(self, group: str) -> np.ndarray:
        """The dense indices of the group's channels not masked, in order."""
        return np.setdiff1d(np.arange(self.sizes[group]), self.plan[group])

    def grow(self, plan: dict[str, np.ndarray]) -> None:
        """Mask more channels; ``plan`` indexes each group's channels still kept (the numbering
        of a copy with the masked channels removed, as :meth:`pruned_copy` makes it)."""
        self._known(plan)
        for group, idx in plan.items():
            self.plan[group] = np.union1d(self.plan[group], self.kept(group)[idx]).astype(int)
        self.apply()

    def set(self, plan: dict[str, np.ndarray]) -> None:
        """Mask exactly ``plan`` (dense indices); groups it leaves out are unmasked."""
        self._known(plan)
        for group, size in self.sizes.items():
            idx = np.unique(np.asarray(plan.get(group, ()), dtype=int))
            if len(idx) and (idx[0] < 0 or idx[-1] >= size):
                raise AutopruneError(f"channel mask: group {group!r} has {size} channels, got index {idx[-1]}")
            self.plan[group] = idx
        self.apply()

    def apply(self) -> None:
        self.graph.mask(self.plan)

    def on_step_start(self, step: int, total: int) -> None:
        self.apply()

    def pruned_copy(self, example: torch.Tensor) -> tuple[nn.Module, list]:
        """A copy of the model with the masked channels removed, and its history."""
        return prune_channels(self.graph.model, example, self.plan)

    def _known(self, plan: dict[str, np.ndarray]) -> None:
        unknown = sorted(set(plan) - set(self.sizes))
        if unknown:
            raise AutopruneError(f"channel mask: unknown group(s) {', '.join(unknown)}")
