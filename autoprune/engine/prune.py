"""Applying a plan: channel removal or weight masks (saving and loading: :mod:`.checkpoint`)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

from .graph import PRUNABLE_TYPES, PrunableGraph, clone


def prune_channels(model: nn.Module, example_input: torch.Tensor, plan: dict[str, np.ndarray]):
    """A copy of ``model`` with the planned channels physically removed, and its history."""
    pruned = clone(model)
    graph = PrunableGraph(pruned, example_input, embedding=True)  # the plan says which groups
    graph.prune(plan)
    return pruned, graph.history()


def mask_weights(model: nn.Module, counts: dict[str, int], scores: dict[str, torch.Tensor]) -> None:
    """Mask the ``counts[name]`` lowest-scored weights of each layer, in place. The masks stay
    applied through training (torch's pruning reparametrisation) until :func:`fold_masks`."""
    modules = dict(model.named_modules())
    for name, k in counts.items():
        module = modules[name]
        mask = lowest_out(scores[name].flatten().double(), k).to(module.weight.device)
        torch_prune.custom_from_mask(module, "weight", mask.view_as(module.weight))


def lowest_out(scores: torch.Tensor, k: int) -> torch.Tensor:
    """A 0/1 mask over the 1-d ``scores`` with the ``k`` lowest at 0, ties going by position
    (what a stable sort's first ``k`` are), found by selection rather than a full sort."""
    mask = torch.ones(scores.numel())
    if k >= scores.numel():
        return mask.zero_()
    if k <= 0:
        return mask
    kth = torch.kthvalue(scores.cpu(), k).values
    below = scores.cpu() < kth
    mask[below] = 0.0
    ties = torch.nonzero(scores.cpu() == kth).flatten()
    mask[ties[: k - int(below.sum())]] = 0.0
    return mask


def fold_masks(model: nn.Module) -> None:
    """Make masks permanent: the masked weights become plain zeros."""
    for module in model.modules():
        if isinstance(module, PRUNABLE_TYPES) and torch_prune.is_pruned(module):
            if hasattr(module, "weight_mask"):
                torch_prune.remove(module, "weight")


def current_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: m.weight_mask for n, m in model.named_modules() if hasattr(m, "weight_mask")}
