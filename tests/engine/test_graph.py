"""Channel groups from torch-pruning's dependency graph, their removal, its replay, and the
cost model the solver plans with."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from autoprune.engine.costs import CostModel
from autoprune.engine.graph import PrunableGraph, clone, replay_history
from autoprune.engine.measure import count_params, flops_by_module
from autoprune.engine.prune import prune_channels
from autoprune.errors import AutopruneError


class Residual(nn.Module):
    """conv -> bn -> (conv -> bn) + shortcut -> pool -> linear: the add couples two convs."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 6, 3, padding=1)
        self.bn0 = nn.BatchNorm2d(6)
        self.body = nn.Conv2d(6, 6, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(6)
        self.mid = nn.Conv2d(6, 5, 1)
        self.fc = nn.Linear(5, 3)

    def forward(self, x):
        h = torch.relu(self.bn0(self.stem(x)))
        h = torch.relu(self.bn1(self.body(h)) + h)
        h = self.mid(h).mean((2, 3))
        return self.fc(h)


def _example() -> torch.Tensor:
    return torch.randn(2, 1, 6, 6, generator=torch.Generator().manual_seed(0))


def test_an_add_couples_its_inputs_into_one_group_and_the_output_is_never_a_group():
    graph = PrunableGraph(Residual().eval(), _example())
    by_module = {it.module for g in graph.groups for it in g.items}
    coupled = [g for g in graph.groups if {"stem", "body"} <= {it.module for it in g.items}]
    assert len(coupled) == 1 and coupled[0].size == 6
    assert "mid" in by_module  # its own group (5 channels), feeding the classifier
    assert not any(g.name == "fc" for g in graph.groups)  # the class outputs stay


def test_removing_a_group_removes_the_same_channels_from_every_coupled_layer():
    model = Residual().eval()
    graph = PrunableGraph(model, _example())
    [group] = [g for g in graph.groups if g.size == 6]
    pruned, history = prune_channels(model, _example(), {group.name: np.array([1, 4])})
    assert pruned.stem.out_channels == pruned.body.out_channels == pruned.body.in_channels == 4
    assert pruned.bn0.num_features == pruned.bn1.num_features == pruned.mid.in_channels == 4
    keep = [0, 2, 3, 5]
    torch.testing.assert_close(pruned.stem.weight, model.stem.weight[keep])
    torch.testing.assert_close(pruned.mid.weight, model.mid.weight[:, keep])
    assert pruned(_example()).shape == (2, 3) and history
    assert model.stem.out_channels == 6  # the original is untouched


def test_replaying_the_history_rebuilds_the_pruned_architecture():
    model = Residual().eval()
    graph = PrunableGraph(model, _example())
    plan = {g.name: np.array([0]) for g in graph.groups}
    pruned, history = prune_channels(model, _example(), plan)
    rebuilt = replay_history(Residual().eval(), _example(), history)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in pruned.state_dict().items()}
    rebuilt.load_state_dict(pruned.state_dict())
    torch.testing.assert_close(rebuilt(_example()), pruned(_example()))


class Ghost(nn.Module):
    """GhostNet's module on a residual stream: a cheap depthwise conv reads the primary conv's
    4 channels and both are concatenated, so stream channels p and p + 4 share a channel."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.primary = nn.Conv2d(8, 4, 1)
        self.cheap = nn.Conv2d(4, 4, 3, padding=1, groups=4)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        h = self.stem(x)
        p = torch.relu(self.primary(h))
        h = h + torch.cat([p, self.cheap(p)], dim=1)
        return self.fc(h.mean((2, 3)))


def test_channels_a_layer_reads_twice_are_one_unit_and_no_removal_empties_a_layer():
    model = Ghost().eval()
    graph = PrunableGraph(model, _example())
    [group] = [g for g in graph.groups if g.name == "stem"]
    assert (group.size, group.period) == (4, 4) and group.channels([1]) == [1, 5]
    with pytest.raises(AutopruneError, match="refusing to empty group 'stem'"):
        graph.prune({"stem": np.arange(4)})
    pruned, history = prune_channels(model, _example(), {"stem": np.array([0, 1, 3])})  # 3 of 4 units
    assert pruned.stem.out_channels == 2 and pruned.primary.out_channels == pruned.cheap.out_channels == 1
    rebuilt = replay_history(Ghost().eval(), _example(), history)
    rebuilt.load_state_dict(pruned.state_dict())
    torch.testing.assert_close(rebuilt(_example()), pruned(_example()), rtol=0, atol=0)


def test_unknown_group_names_are_refused_with_the_names_there_are():
    graph = PrunableGraph(Residual().eval(), _example())
    with pytest.raises(AutopruneError, match="unknown group name.*nope") as info:
        graph.check_names({"nope": 0.5})
    assert graph.groups[0].name in str(info.value)


def test_clone_is_deep():
    model = Residual()
    copy_ = clone(model)
    with torch.no_grad():
        copy_.stem.weight.zero_()
    assert model.stem.weight.abs().sum() > 0


def test_cost_model_matches_fvcore_after_pruning(digits_task, digits_dense):
    model = copy.deepcopy(digits_dense)
    example = digits_task.example_input()
    graph = PrunableGraph(model, example)
    total, by_module = flops_by_module(model, example)
    costs = CostModel(graph, by_module, total)
    rng = np.random.default_rng(0)
    removed = [rng.random(g.size) < 0.4 for g in graph.groups]
    for m in removed:
        m[0] = False  # never empty
    est_flops, est_params = costs.cost(removed)
    graph.prune({g.name: np.flatnonzero(m) for g, m in zip(graph.groups, removed)})
    # exact up to parameter-free layers outside every group (here the average pool's
    # FLOPs, 0.02% of the total), which the engine's fvcore check on the pruned model covers
    assert est_flops == pytest.approx(flops_by_module(model, example)[0], rel=5e-4)
    assert est_params == pytest.approx(count_params(model), rel=1e-9)


class _AuxNeedsRoom(nn.Module):
    """A main path that runs at any size and an auxiliary head, run in training only, that
    pools by 8 (so it fails on small inputs), as inception_v3's AuxLogits does."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 3)
        self.aux = nn.Linear(8, 3)

    def forward(self, x):
        h = torch.relu(self.conv(x))
        out = self.fc(h.mean((2, 3)))
        if self.training:
            return out, self.aux(nn.functional.max_pool2d(h, 8).mean((2, 3)))
        return out


def test_a_training_pass_that_fails_at_this_size_is_named_with_a_hint():
    from autoprune.errors import AutopruneError

    with pytest.raises(AutopruneError, match=r"_AuxNeedsRoom's training pass fails on input \(3, 4, 4\).*--image-size"):
        PrunableGraph(_AuxNeedsRoom(), torch.randn(1, 3, 4, 4))
    graph = PrunableGraph(_AuxNeedsRoom(), torch.randn(1, 3, 16, 16))  # room enough: the aux head is an output
    assert graph.group_names() == ["conv"]
    assert all(it.module != "aux" or it.dim == "in" for it in graph.by_name["conv"].items)
