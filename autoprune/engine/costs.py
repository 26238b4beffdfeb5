"""What removing channels costs and saves, without removing them: FLOPs, parameters and
the widths each layer is left with, from a model's channel groups."""

from __future__ import annotations

import numpy as np
from torch import nn

from .attention import ATTENTION_TYPES
from .graph import NORM_TYPES, PRUNABLE_TYPES, PrunableGraph

WIDTH_KINDS = ("norm", "depthwise", "attention")  # one width: as many inputs as outputs are kept


class CostModel:
    """FLOPs and parameters of the model after removing channels, without pruning it.

    Dense per-module FLOPs come from fvcore once; a conv or linear layer's FLOPs and weights
    scale with its kept input and output channels (a depthwise conv's with its channels), a
    norm layer's with its channels. Other modules keep their cost. The engine checks the
    estimate against fvcore on the really pruned model.
    """

    def __init__(self, graph: PrunableGraph, module_flops: dict[str, float], total_flops: float):
        model = graph.model
        self.total_flops = float(total_flops)
        self.total_params = float(sum(p.numel() for p in model.parameters()))
        self.modules: dict[str, dict] = {}
        for name, m in model.named_modules():
            if isinstance(m, PRUNABLE_TYPES):
                cin = m.in_features if isinstance(m, nn.Linear) else m.in_channels
                cout = m.out_features if isinstance(m, nn.Linear) else m.out_channels
                groups = getattr(m, "groups", 1)
                depthwise = groups > 1 and groups == cin
                kernel = int(np.prod(m.weight.shape[2:])) if m.weight.dim() > 2 else 1
                bias = m.bias is not None
                self.modules[name] = dict(
                    kind="depthwise" if depthwise else ("grouped" if groups > 1 else "dense"),
                    cin=cin,
                    cout=cout,
                    groups=groups,
                    kernel=kernel,
                    bias=bias,
                    flops=float(module_flops.get(name, 0.0)),
                    params=float(sum(p.numel() for p in m.parameters(recurse=False))),
                )
            elif isinstance(m, ATTENTION_TYPES):  # the attention products, with as many heads as are kept
                inner = sum(module_flops.get(f"{name}.{part}", 0.0) for part in (m.qkv_name, m.proj_name))
                self.modules[name] = dict(
                    kind="attention",
                    cin=m.num_heads,
                    cout=m.num_heads,
                    flops=max(float(module_flops.get(name, 0.0)) - inner, 0.0),
                    params=float(sum(p.numel() for p in m.parameters(recurse=False))),
                )
            elif isinstance(m, NORM_TYPES):
                self.modules[name] = dict(
                    kind="norm",
                    cin=m.num_features,
                    cout=m.num_features,
                    flops=float(module_flops.get(name, 0.0)),
                    params=float(sum(p.numel() for p in m.parameters(recurse=False))),
                )
        self.sizes = [g.size for g in graph.groups]  # channels per group
        # per group: (module name, dim, root index of each idx) for the modules we model
        self.effects = [
            [(it.module, it.dim, it.root_idxs) for it in g.items if it.module in self.modules] for g in graph.groups
        ]

    def _cut(self, removed: list[np.ndarray]) -> dict[str, dict[str, int]]:
        """Per modelled module touched by ``removed``: channels cut from its "in" and "out"."""
        cut: dict[str, dict[str, int]] = {}
        for effects, mask in zip(self.effects, removed):
            if not mask.any():
                continue
            for module, dim, roots in effects:
                n = int(mask[roots].sum())
                if n:
                    c = cut.setdefault(module, {"in": 0, "out": 0})
                    c[dim] += n
        return cut

    def widths(self, removed: list[np.ndarray]) -> dict[str, tuple[int, int]]:
        """(input, output) channels left to each module whose channels ``removed`` cuts."""
        out = {}
        for module, c in self._cut(removed).items():
            info = self.modules[module]
            cin, cout = info["cin"] - c["in"], info["cout"] - c["out"]
            if info["kind"] in WIDTH_KINDS:
                cin = cout = min(cin, cout)
            out[module] = (cin, cout)
        return out

    def cost(self, removed: list[np.ndarray]) -> tuple[float, float]:
        """(flops, params) after removing the channels flagged True in ``removed[g]``."""
        cut = self._cut(removed)
        flops, params = self.total_flops, self.total_params
        for module, c in cut.items():
            info = self.modules[module]
            fo = (info["cout"] - c["out"]) / info["cout"]
            fi = (info["cin"] - c["in"]) / info["cin"]
            if info["kind"] in WIDTH_KINDS:
                scale = min(fo, fi) if info["kind"] == "depthwise" else fo
                flops -= info["flops"] * (1 - scale)
                params -= info["params"] * (1 - scale)
                continue
            flops -= info["flops"] * (1 - fo * fi)
            weight = info["cin"] * info["cout"] * info["kernel"] / info["groups"]
            kept_weight = weight * fo * fi
            kept_bias = info["cout"] * fo if info["bias"] else 0.0
            params -= (weight - kept_weight) + ((info["cout"] if info["bias"] else 0.0) - kept_bias)
        return flops, params
