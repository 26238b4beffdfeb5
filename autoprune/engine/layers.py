"""The search's view of a model: its channel groups and weight layers, each with its size and
its share of the dense FLOPs. Search spaces and searchers (the AMC agent too) read this table;
they never touch the model itself."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import STRUCTURES
from .allocation import group_flops as group_shares
from .costs import CostModel
from .criteria import scored_modules
from .graph import PrunableGraph
from .measure import flops_by_module


@dataclass(frozen=True)
class LayerTable:
    """What a space may know about the model: channel groups and weight layers, each with
    its size and its share of the dense FLOPs."""

    groups: dict[str, int]  # channel group name -> channels
    layers: dict[str, int]  # conv/linear layer name -> weights
    group_flops: dict[str, float]  # group name -> fraction of the dense FLOPs it touches
    layer_flops: dict[str, float]  # layer name -> fraction of the dense FLOPs
    structures: tuple[str, ...] = STRUCTURES  # what the search allows (--structure)

    def units(self, structure: str) -> dict[str, int]:
        """The names a per_layer policy ratios: groups for channels, layers for masks."""
        return self.groups if structure == "channel" else self.layers


def layer_table(task, structures: tuple[str, ...] = STRUCTURES) -> LayerTable:
    """Channel groups and weight layers of the task's model, with their FLOPs shares."""
    model = task.model_factory().eval()
    example = task.example_input()
    total, by_module = flops_by_module(model, example)
    groups, group_flops = {}, {}
    if "channel" in structures:  # only channel pruning needs the dependency graph
        graph = PrunableGraph(model, example)
        graph.dry_run()  # rejects layers the graph cannot handle, naming them
        costs = CostModel(graph, by_module, total)
        for g, share in zip(graph.groups, group_shares(costs)):
            groups[g.name] = g.size
            group_flops[g.name] = share
    layers = {n: m.weight.numel() for n, m in scored_modules(model).items()}
    return LayerTable(
        groups=groups,
        layers=layers,
        group_flops=group_flops,
        layer_flops={n: by_module.get(n, 0.0) / total for n in layers},
        structures=structures,
    )
