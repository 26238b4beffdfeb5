"""Per-group allocations (the AMC agent's actions): their estimated cost against fvcore on the
really pruned model, the legal range, exact per-layer policies and BN recalibration."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from autoprune import engine
from autoprune.config import Budget, EngineConfig, Policy
from autoprune.engine.allocation import allocation_space
from autoprune.engine.graph import PrunableGraph
from autoprune.engine.measure import measure
from autoprune.engine.prune import prune_channels
from autoprune.errors import AutopruneError


@pytest.fixture(scope="module")
def space(digits_task, digits_dense):
    return allocation_space(digits_dense, digits_task.example_input(), Policy().max_ratio)


def _pruned_flops(model, example, space, counts) -> float:
    graph = PrunableGraph(model, example)
    sizes = {g.name: g.size for g in graph.groups}
    plan = {g.name: np.arange(k) for g, k in zip(space.groups, counts)}
    assert all(sizes[n] == g.size for n, g in zip(plan, space.groups))
    pruned, _ = prune_channels(model, example, plan)
    return measure(pruned, example.shape[1:], None, latency=False).flops


def test_groups_come_in_network_order_with_their_root_layer(space, digits_dense):
    order = list(dict(digits_dense.named_modules()))
    names = [g.name for g in space.groups]
    assert names == sorted(names, key=order.index)
    for g in space.groups:
        m = dict(digits_dense.named_modules())[g.name]
        assert (g.cin, g.cout, g.kernel, g.stride) == (m.in_channels, m.out_channels, m.kernel_size[0], m.stride[0])
        assert g.size == m.out_channels and 0 < g.flops < 1


def test_the_estimate_is_what_fvcore_counts_after_pruning(space, digits_task, digits_dense):
    example = digits_task.example_input()
    dense = measure(digits_dense, digits_task.input_shape, None, latency=False).flops
    rng = np.random.default_rng(0)
    for _ in range(10):
        counts = [int(rng.integers(0, cap + 1)) for cap in space.caps]
        real = _pruned_flops(digits_dense, example, space, counts) / dense
        estimate = space.fraction("flops", counts)
        # the cost model leaves out what fvcore counts outside conv/linear/norm layers (pooling):
        # close, and never below the real count, so an allocation within budget is within it
        assert estimate == pytest.approx(real, abs=1e-3) and real <= estimate + 1e-12


@pytest.mark.parametrize("target", [0.5, 0.2, 0.05])
def test_choices_inside_the_legal_ranges_always_meet_the_budget(space, target):
    rng = np.random.default_rng(1)
    for _ in range(50):
        counts: list[int] = []
        for _ in space.groups:
            lo, hi = space.legal("flops", target, counts)
            assert 0 <= lo <= hi
            counts.append(int(rng.integers(lo, hi + 1)))
        assert space.fraction("flops", counts) <= target + 1e-12
    # the lower bound is tight: one channel fewer at the first constrained step misses the budget
    counts = []
    for _ in space.groups:
        lo, hi = space.legal("flops", target, counts)
        if lo > 0:
            rest = space.caps[len(counts) + 1 :]
            assert space.fraction("flops", [*counts, lo - 1, *rest]) > target
            break
        counts.append(0)


def test_an_exact_policy_prunes_the_ratios_as_given(digits_task, digits_dense, space):
    ratios = {g.name: 0.5 for g in space.groups}
    cfg = EngineConfig(progress=False)
    policy = Policy(scope="per_layer", ratios=ratios, exact=True, finetune={"epochs": 0})
    result = engine.run(digits_task, digits_dense, policy, Budget("flops", 0.5), cfg, measure_latency=False)
    assert result.ratios == pytest.approx(ratios)
    assert result.pruned["flops_ratio"] == pytest.approx(
        space.fraction("flops", [g.size // 2 for g in space.groups]), abs=1e-3
    )
    # the same ratios without exact are scaled up to the budget
    scaled = engine.run(
        digits_task,
        digits_dense,
        Policy(scope="per_layer", ratios=ratios, finetune={"epochs": 0}),
        Budget("flops", 0.5),
        cfg,
        measure_latency=False,
    )
    assert result.pruned["flops_ratio"] < scaled.pruned["flops_ratio"] <= 0.5
    with pytest.raises(AutopruneError, match="exact per-layer ratios keep 0.2.*above the budget 0.1"):
        engine.run(digits_task, digits_dense, policy, Budget("flops", 0.1), cfg, measure_latency=False)
    with pytest.raises(AutopruneError, match="'exact' needs scope 'per_layer' and structure 'channel'"):
        Policy(scope="global", exact=True)
    with pytest.raises(AutopruneError, match="method 'iterative' prunes in steps: use oneshot, rewind or init"):
        Policy(scope="per_layer", ratios=ratios, exact=True, method="iterative")


def test_bn_recalibration_recomputes_the_statistics_after_pruning(digits_task, digits_dense, space):
    ratios = {g.name: 0.6 for g in space.groups}
    cfg = EngineConfig(progress=False)
    seen = {}

    def keep(model, _ratios):
        seen["bn"] = [m.running_mean.clone() for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]

    for batches in (0, 4):
        policy = Policy(scope="per_layer", ratios=ratios, exact=True, finetune={"epochs": 0, "bn_recalibrate": batches})
        run = engine.run(
            digits_task, digits_dense, policy, Budget("flops", 0.5), cfg, on_pruned=keep, measure_latency=False
        )
        seen[batches] = (seen.pop("bn"), run.pruned["val_acc"])
    (before, acc0), (after, acc4) = seen[0], seen[4]
    assert any(not torch.allclose(a, b) for a, b in zip(before, after))
    assert acc4 > acc0  # EagleEye's point: stale statistics are what hurt the pruned model most
