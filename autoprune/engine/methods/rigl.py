"""RigL: sparse training that regrows where the dense gradient is largest, with a cosine-decayed
drop fraction (Evci et al. 2020). Schedule, initial masks and the update: :mod:`.set`."""

from __future__ import annotations

import math

import torch
from torch import nn

from .base import register
from .set import SET, SparseUpdates, drop_and_grow


def cosine_drop(step: int, end: int, drop: float) -> float:
    """The drop fraction at ``step``: drop / 2 * (1 + cos(pi * step / end)), 0 from ``end`` on."""
    return drop / 2 * (1 + math.cos(math.pi * min(step, end) / end))


class RigLUpdates(SparseUpdates):
    """:class:`SparseUpdates` that regrow where the magnitude of the dense gradient (the
    gradient with respect to each layer's whole masked weight, masked entries included) is
    largest, dropping the cosine-decayed fraction. The gradient is captured only at the
    update steps: a forward hook on each layer registers a hook on the weight that the
    pruning reparametrisation computes for that pass (summed over the layer's calls)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.grads: dict[str, torch.Tensor] = {}
        self.handles: list = []

    def drop_fraction(self, step: int) -> float:
        return cosine_drop(step, self.end, self.drop)

    def on_step_start(self, step: int, total: int) -> None:
        if step in self.steps:
            self.capture()

    def capture(self) -> None:
        """Record the dense gradient of every layer on the next backward pass."""
        self.release()
        for name, module in self.modules.items():
            self.handles.append(module.register_forward_hook(self._on_forward(name)))

    def release(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
        self.grads = {}

    def _on_forward(self, name: str):
        def hook(module: nn.Module, inputs, output) -> None:
            if module.weight.requires_grad:
                module.weight.register_hook(lambda grad: self._add(name, grad))

        return hook

    def _add(self, name: str, grad: torch.Tensor) -> None:
        grad = grad.detach()
        self.grads[name] = self.grads[name] + grad if name in self.grads else grad.clone()

    def regrow(self, name: str, module: nn.Module, fraction: float) -> int:
        grad = self.grads.get(name)
        return 0 if grad is None else drop_and_grow(module, fraction, grad)

    def after_backward(self, step: int, total: int) -> None:
        try:
            super().after_backward(step, total)
        finally:
            if step in self.steps:
                self.release()


@register
class RigL(SET):
    """Prune to the budget at once (ERK densities or the policy's solver), then fine-tune
    while every ``interval`` steps each layer drops the smallest-magnitude share
    drop / 2 * (1 + cos(pi * t / T_end)) of its active weights and regrows as many where the
    dense gradient's magnitude is largest (from zero), until T_end = ``GRADUAL_END`` of the
    steps; each layer's density, so the budget, is held throughout."""

    name = "rigl"
    summary = "Sparse training that regrows where the dense gradient is largest: RigL (Evci et al. 2020)."
    updates = RigLUpdates
