"""The layers a policy keeps whole (``--keep``, ``--keep-types``, the classifier) and the
graph with their groups left out."""

from __future__ import annotations

import torch
from torch import nn

from ...config import Policy
from ...errors import AutopruneError
from .. import criteria as crit
from ..graph import PrunableGraph

_KEEP_TYPES = {
    "conv": (nn.Conv1d, nn.Conv2d, nn.Conv3d),
    "conv1d": (nn.Conv1d,),
    "conv2d": (nn.Conv2d,),
    "conv3d": (nn.Conv3d,),
    "linear": (nn.Linear,),
}


def kept_layers(model: nn.Module, policy: Policy, example: torch.Tensor) -> set[str]:
    """The conv / linear layers ``policy`` leaves untouched: by name glob (``keep``), by type
    (``keep_types``) and the output layer (``keep_classifier``). A glob that matches no layer
    is an error naming the layers there are."""
    from fnmatch import fnmatchcase

    from ..models import classifier_layer

    layers = crit.scored_modules(model)
    types = tuple(t for k in policy.keep_types for t in _KEEP_TYPES[k])
    kept = {n for n, m in layers.items() if types and isinstance(m, types)}
    for glob in policy.keep:
        hits = {n for n in layers if fnmatchcase(n, glob)}
        if not hits:
            raise AutopruneError(
                f"--keep {glob!r} matches no conv or linear layer; the layers are: {', '.join(layers)}"
            )
        kept |= hits
    if policy.keep_classifier:
        names = {m: n for n, m in model.named_modules()}
        kept.add(names[classifier_layer(model, example)])
    return kept


def leave_kept(graph: PrunableGraph, model: nn.Module, policy: Policy, example: torch.Tensor) -> PrunableGraph:
    """``graph`` without the groups that touch a layer ``policy`` keeps (their outputs or
    their inputs): those are never pruned, nor checked by a dry run."""
    kept = kept_layers(model, policy, example)
    if kept:
        graph.groups = [g for g in graph.groups if not any(it.module in kept for it in g.items)]
        graph.by_name = {g.name: g for g in graph.groups}
        if not graph.groups:
            raise AutopruneError(
                "every channel group touches a kept layer (--keep, --keep-types, "
                "--keep-classifier): nothing is left to prune"
            )
    return graph
