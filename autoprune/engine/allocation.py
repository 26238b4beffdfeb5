"""Per-group channel allocations, the AMC agent's actions (He et al. 2018).

An :class:`AllocationSpace` is what an agent may know of a model: its channel groups in
network order, each with the features of its root layer, and the cost of any allocation
(channels removed per group) as a fraction of the dense model's FLOPs, parameters or
latency (predicted by the hardware's latency table), without pruning anything. It is plain
data, so a searcher can carry it and be pickled with it. :meth:`AllocationSpace.legal`
gives the range of channels a group may lose so that the budget stays reachable whatever
the later groups do, assuming they lose as many as ``max_ratio`` allows; an allocation
built step by step inside those ranges always meets the budget.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from torch import nn

from .costs import CostModel
from .graph import PrunableGraph
from .latency import LatencyTable
from .measure import flops_by_module
from .solver import max_pruned


@dataclass(frozen=True)
class GroupInfo:
    """One channel group, described by its root layer (the first conv or linear it cuts)."""

    name: str
    size: int  # channels
    kind: str  # "conv" or "linear"
    cin: int
    cout: int
    kernel: int  # the kernel's largest side (1 for linear)
    stride: int  # the largest stride (1 for linear)
    flops: float  # the share of the dense FLOPs its channels touch


def group_flops(costs: CostModel) -> list[float]:
    """Each group's share of the dense FLOPs: what removing all its channels would save."""
    out = []
    for i in range(len(costs.sizes)):
        removed = [np.zeros(s, bool) for s in costs.sizes]
        removed[i][:] = True
        out.append(1.0 - costs.cost(removed)[0] / costs.total_flops)
    return out


def _root_features(module: nn.Module) -> tuple[str, int, int, int, int]:
    if isinstance(module, nn.Linear):
        return "linear", module.in_features, module.out_features, 1, 1
    return "conv", module.in_channels, module.out_channels, max(module.kernel_size), max(module.stride)


@dataclass
class AllocationSpace:
    """Channel groups in network order and the cost of allocations over them (see module doc)."""

    groups: list[GroupInfo]
    costs: CostModel  # its groups in the order of ``order``
    order: list[int]  # costs' group index of each entry of ``groups``
    max_ratio: float  # no group loses more than this share of its channels (one is always kept)
    latency: LatencyTable | None = None  # for latency fractions

    @property
    def caps(self) -> list[int]:
        """The most channels each group may lose."""
        return [max_pruned(g.size, self.max_ratio) for g in self.groups]

    def _removed(self, counts: list[int]) -> list[np.ndarray]:
        removed = [np.zeros(s, bool) for s in self.costs.sizes]
        for k, j in zip(counts, self.order):
            removed[j][:k] = True
        return removed

    def fraction(self, kind: str, counts: list[int]) -> float:
        """The kept fraction of the dense ``kind`` ("flops", "params" or "latency") when group
        ``i`` loses ``counts[i]`` channels (missing trailing groups lose none)."""
        removed = self._removed(counts)
        if kind == "latency":
            if self.latency is None:
                raise ValueError("a latency fraction needs the space's latency table")
            return self.latency.predict(self.costs.widths(removed)) / self.latency.predict()
        flops, params = self.costs.cost(removed)
        return flops / self.costs.total_flops if kind == "flops" else params / self.costs.total_params

    def smallest(self, kind: str) -> float:
        """The smallest reachable fraction: every group at its cap."""
        return self.fraction(kind, self.caps)

    def legal(self, kind: str, target: float, before: list[int]) -> tuple[int, int]:
        """(fewest, most) channels group ``len(before)`` may lose, given that the groups
        before it lose ``before``: the fewest that still reaches ``target`` if every later
        group then loses its cap (at least 0), and the group's cap."""
        i, caps = len(before), self.caps
        rest = caps[i + 1 :]
        lo, hi = 0, caps[i]
        if self.fraction(kind, [*before, 0, *rest]) <= target:
            return 0, hi
        if self.fraction(kind, [*before, hi, *rest]) > target:
            return hi, hi  # out of reach (an earlier choice outside its range): prune all it may
        while hi - lo > 1:  # fractions fall as the group loses channels: the first count within target
            mid = (lo + hi) // 2
            if self.fraction(kind, [*before, mid, *rest]) <= target:
                hi = mid
            else:
                lo = mid
        return hi, caps[i]


def allocation_space(
    model: nn.Module, example, max_ratio: float, latency: LatencyTable | None = None
) -> AllocationSpace:
    """The allocation space of ``model`` (only its structure matters) for ``example`` inputs."""
    graph = PrunableGraph(model, example)
    total, by_module = flops_by_module(model, example)
    costs = CostModel(graph, by_module, total)
    modules = dict(model.named_modules())
    rank = {name: i for i, name in enumerate(modules)}
    order = sorted(range(len(graph.groups)), key=lambda j: rank.get(graph.groups[j].name, len(rank)))
    shares = group_flops(costs)
    groups = [
        GroupInfo(graph.groups[j].name, graph.groups[j].size, *_root_features(modules[graph.groups[j].name]), shares[j])
        for j in order
    ]
    return AllocationSpace(groups, costs, order, max_ratio, latency)
