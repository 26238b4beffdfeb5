"""A model's input, made from its shape (random or zero images, or token ids), and batches
moved to a device.

A task gives one sample's shape (``Task.input_shape``). A float shape, e.g. ``(3, 32, 32)``,
means float inputs; :class:`Tokens` (a tuple too, so shapes read the same everywhere) means
integer token ids below ``vocab``, for models that start with an ``nn.Embedding``. FLOP
counts, latency timing and dependency-graph tracing all make their inputs here.
"""

from __future__ import annotations

import torch


class Tokens(tuple):
    """One sample's shape of integer token ids in ``[0, vocab)``: ``Tokens((64,), vocab=1000)``."""

    vocab: int

    def __new__(cls, shape, vocab: int) -> Tokens:
        self = super().__new__(cls, tuple(int(s) for s in shape))
        self.vocab = int(vocab)
        return self

    def __getnewargs__(self):  # pickling (Ray ships tasks to its workers) keeps the vocabulary
        return (tuple(self), self.vocab)

    def __repr__(self) -> str:
        return f"Tokens({tuple(self)!r}, vocab={self.vocab})"


def model_input(
    shape: tuple[int, ...], batch: int, device=None, zeros: bool = False, generator: torch.Generator | None = None
) -> torch.Tensor:
    """A batch of ``batch`` inputs of one sample's ``shape``: standard-normal floats (zeros
    with ``zeros``), or random token ids (token 0 with ``zeros``) for :class:`Tokens`."""
    size = (batch, *shape)
    if isinstance(shape, Tokens):
        if zeros:
            return torch.zeros(size, dtype=torch.long, device=device)
        return torch.randint(0, shape.vocab, size, generator=generator).to(device)
    if zeros:
        return torch.zeros(size, device=device)
    return (
        torch.randn(size, generator=generator).to(device) if generator is not None else torch.randn(size, device=device)
    )


def shape_key(shape: tuple[int, ...]) -> list:
    """``shape`` as a latency table's key records it: the sizes, and for token ids the vocabulary."""
    return [*shape, f"tokens<{shape.vocab}"] if isinstance(shape, Tokens) else list(shape)


def to_device(value, device: torch.device):
    """``value`` (a tensor, or a dict, tuple or list of them) on ``device``."""
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=True)
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(to_device(v, device) for v in value)
    return value


def batch_len(x, y) -> int:
    """How many samples a batch holds: its target's (or inputs') first dimension."""
    for value in (y, x):
        if isinstance(value, torch.Tensor) and value.ndim > 0:
            return len(value)
    return len(x)
