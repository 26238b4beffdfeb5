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
        mask = torch.ones(module.weight.numel(), device=module.weight.device)
        if k > 0:
            order = torch.argsort(scores[name].flatten().double(), stable=True)
            mask[order[:k].to(mask.device)] = 0.0
        torch_prune.custom_from_mask(module, "weight", mask.view_as(module.weight))


def fold_masks(model: nn.Module) -> None:
    """Make masks permanent: the masked weights become plain zeros."""
    for module in model.modules():
        if isinstance(module, PRUNABLE_TYPES) and torch_prune.is_pruned(module):
            if hasattr(module, "weight_mask"):
                torch_prune.remove(module, "weight")


def current_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: m.weight_mask for n, m in model.named_modules() if hasattr(m, "weight_mask")}
