"""Widths the hardware likes: the solver's round_to, the width steps the latency table learns,
and round_to auto."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import TensorDataset

from autoprune import engine
from autoprune.config import Budget, MeasureConfig, Policy
from autoprune.engine.graph import PrunableGraph
from autoprune.engine.latency import STEPS, LayerLatency
from autoprune.engine.latency_build import PROBES, learn_step
from autoprune.engine.measure import measure
from autoprune.engine.methods.context import next_target
from autoprune.engine.solver import snap
from autoprune.engine.tasks import Task
from autoprune.errors import AutopruneError


def _resnet18_task(size: int = 32) -> Task:
    def factory():
        torch.manual_seed(0)
        return torchvision.models.resnet18(weights=None, num_classes=10).eval()

    dummy = TensorDataset(torch.zeros(1, 3, size, size), torch.zeros(1, dtype=torch.long))
    return Task(
        name="bench",
        model_name="resnet18",
        model_factory=factory,
        train=dummy,
        val=dummy,
        test=dummy,
        input_shape=(3, size, size),
        num_classes=10,
    )


def _kept_widths(model, example) -> dict[str, int]:
    return {g.name: g.size for g in PrunableGraph(model, example).groups}


@pytest.fixture(scope="module")
def resnet18():
    task = _resnet18_task()
    dense = task.model_factory()
    return task, dense, measure(dense, task.input_shape, MeasureConfig(), latency=False)


@pytest.mark.parametrize("step", [4, 8, 16])
@pytest.mark.parametrize("scope", ["local", "global"])
@pytest.mark.parametrize("kind,fraction", [("flops", 0.5), ("flops", 0.25), ("params", 0.4)])
def test_rounding_keeps_every_pruned_width_a_multiple_and_the_budget_met(resnet18, step, scope, kind, fraction):
    task, dense, dense_cost = resnet18
    policy = Policy(criterion="magnitude", scope=scope, round_to=step)
    scores = engine.score(dense, policy, data=None, seed=0)
    pruned = engine.prune_to_budget(dense, task, policy, Budget(kind, fraction), scores, dense_cost)
    example = task.example_input()
    before, after = _kept_widths(dense, example), _kept_widths(pruned.model, example)
    changed = {g: w for g, w in after.items() if w != before[g]}
    assert changed, "nothing was pruned"
    assert all(w % step == 0 for w in changed.values()), changed
    cost = measure(pruned.model, task.input_shape, MeasureConfig(), latency=False)
    reached = (cost.flops / dense_cost.flops) if kind == "flops" else cost.params / dense_cost.params
    assert fraction - 0.05 <= reached <= fraction + 1e-9  # met, and not far below
    if step == 16:  # rounded widths differ from the unrounded solve's
        free = engine.prune_to_budget(
            dense, task, Policy(criterion="magnitude", scope=scope), Budget(kind, fraction), scores, dense_cost
        )
        assert any(w % 16 for w in _kept_widths(free.model, example).values())


def test_per_layer_ratios_and_the_default_model_round_too(digits_task, digits_dense, digits_dense_metrics):
    cost = measure(digits_dense, digits_task.input_shape, MeasureConfig(), latency=False)
    example = digits_task.example_input()
    groups = _kept_widths(digits_dense, example)
    ratios = {g: 0.2 + 0.6 * i / len(groups) for i, g in enumerate(groups)}
    for policy in (Policy(round_to=8), Policy(scope="per_layer", ratios=ratios, round_to=8)):
        scores = engine.score(digits_dense, policy, data=None, seed=0)
        pruned = engine.prune_to_budget(digits_dense, digits_task, policy, Budget("flops", 0.5), scores, cost)
        widths = _kept_widths(pruned.model, example)
        assert all(w % 8 == 0 or w == groups[g] for g, w in widths.items()), widths
        assert measure(pruned.model, digits_task.input_shape, MeasureConfig(), latency=False).flops <= 0.5 * cost.flops


def test_a_budget_that_rounding_puts_out_of_reach_is_refused_saying_so(resnet18):
    task, dense, dense_cost = resnet18
    # max_ratio 0.6 lets a 64-wide group keep 26 channels, rounding to 16 only 32: 0.21 is
    # reachable by any width (0.18 is), not in multiples of 16 (0.236)
    for round_to in (1, 16):
        policy = Policy(criterion="magnitude", round_to=round_to, max_ratio=0.6)
        scores = engine.score(dense, policy, data=None, seed=0)
        if round_to == 1:
            engine.prune_to_budget(dense, task, policy, Budget("flops", 0.21), scores, dense_cost)
            continue
        with pytest.raises(AutopruneError, match=r"smallest reachable flops fraction is 0\.2.*multiples of 16"):
            engine.prune_to_budget(dense, task, policy, Budget("flops", 0.21), scores, dense_cost)


@settings(max_examples=200, deadline=None)
@given(
    size=st.integers(1, 300),
    least=st.integers(1, 300),
    step=st.sampled_from(STEPS),
    down=st.booleans(),
)
def test_snap_is_monotone_and_lands_on_a_multiple_or_the_dense_width(size, least, step, down):
    least = min(least, size)
    widths = [snap(k, size, least, step, down) for k in range(least, size + 1)]
    assert all(a <= b for a, b in zip(widths, widths[1:])), "not monotone"
    for kept, w in zip(range(least, size + 1), widths):
        assert least <= w <= size
        assert w % step == 0 or w == size
        if down and w != size and kept >= max(step, -(-least // step) * step):
            assert w <= kept


def test_round_to_is_refused_for_masks_and_names_its_choices():
    with pytest.raises(AutopruneError, match="needs structure 'channel'"):
        Policy(structure="unstructured", round_to=8)
    with pytest.raises(AutopruneError, match="one of: 1, 4, 8, 16, auto"):
        Policy(round_to=12)
    with pytest.raises(AutopruneError, match="round_to 'auto' needs the model's latency table"):
        engine.stages.width_step(Policy(round_to="auto"), None)


def _stair(step: int, base: float = 1.0, rise: float = 0.5) -> list[float]:
    return [base + rise * min(16, -(-k // step) * step) / 16 for k in PROBES]


@pytest.mark.parametrize("step", STEPS)
def test_the_table_learns_the_step_of_a_staircase(step):
    rng = np.random.default_rng(step)
    noisy = [t * (1 + rng.uniform(-0.01, 0.01)) for t in _stair(step)]
    assert learn_step(noisy) == step


def test_a_flat_or_noisy_axis_learns_no_step():
    assert learn_step([1.0, 1.01, 0.99, 1.0, 1.01]) == 1
    assert learn_step([1.0, 1.02, 1.0, 1.01, 1.03]) == 1  # within 5% of the aligned width's time
    assert learn_step([1.0, 1.5, 1.5, 1.5, 0.9]) == 1  # the widest probe no slower: no staircase
    assert learn_step([0.0, 0.002, 0.002, 0.002, 0.002]) == 1  # nothing left after the runtime's own cost


def test_a_stepped_layer_costs_its_next_multiple_and_never_interpolates_across_a_step():
    layer = LayerLatency("conv", [64], [16, 48, 64, 80, 96], [[1.0, 2.0, 2.5, 3.5, 4.0]], steps=[1, 16])
    assert layer.at(64, 65) == layer.at(64, 80) == 3.5
    assert layer.at(64, 64) == 2.5 and layer.at(64, 49) == layer.at(64, 64)
    flat = LayerLatency("conv", [64], [16, 48, 64, 80, 96], [[1.0, 2.0, 2.5, 3.5, 4.0]])
    assert flat.at(64, 72) == pytest.approx(3.0)


def test_auto_rounds_to_the_step_the_table_found_fastest(digits_task, digits_dense, digits_dense_metrics, engine_cfg):
    table = engine.task_latency_table(digits_dense, digits_task, engine_cfg)
    probed = [layer for layer in table.layers.values() if layer.probes]
    assert probed and all(s in STEPS for layer in probed for s in layer.steps)
    assert table.best_step() in STEPS
    policy = Policy(round_to="auto", finetune={"epochs": 0})
    result = engine.run(
        digits_task,
        digits_dense,
        policy,
        Budget("flops", 0.5),
        engine_cfg,
        digits_dense_metrics,
        latency=table,
        measure_latency=False,
    )
    step = table.best_step()
    assert result.pruned["round_to"] == step
    example = digits_task.example_input()
    dense_widths = _kept_widths(digits_dense, example)
    widths = _kept_widths(result.model, example)
    assert all(w % step == 0 or w == dense_widths[g] for g, w in widths.items())


def test_the_latency_checks_bisect_a_jump_between_two_timings():
    # one model timed under the goal, a slightly bigger one far over: aim between them
    target = next_target([(0.60, 0.49), (0.74, 0.85)], 0.6)
    assert 0.60 < target < 0.74
    assert target == pytest.approx(0.60 + (0.11 / 0.36) * 0.14)
    # without a bracket: the secant, or proportional after one timing
    assert next_target([(0.6, 0.5)], 0.6) == pytest.approx(0.72)


def test_a_rounded_trial_says_so_in_its_name():
    from autoprune.contract import trial_label

    assert trial_label({"criterion": "snip", "scope": "global", "round_to": 16}, 7) == "#7 snip/global x16"
    assert trial_label({"criterion": "snip", "scope": "global", "round_to": "auto"}, 7) == "#7 snip/global x auto"
    assert trial_label({"criterion": "snip", "scope": "global", "round_to": 1}, 7) == "#7 snip/global"


def test_auto_takes_the_largest_step_that_a_quarter_of_the_time_asks_for():
    from autoprune.engine.latency import LatencyTable

    def layer(ms: float, step: int) -> LayerLatency:
        return LayerLatency("conv", [64], [64], [[ms]], steps=[1, step], probes=[[1, 32, ms]])

    def table(*layers: LayerLatency) -> LatencyTable:
        return LatencyTable({}, 1.0, [1.0, 1.0], [1.0, 0.0, 0.0, 0.0], {str(i): x for i, x in enumerate(layers)})

    assert table(layer(3.0, 1), layer(1.0, 16)).best_step() == 16  # a quarter of the time
    assert table(layer(4.0, 1), layer(1.0, 16)).best_step() == 1  # a fifth
    assert table(layer(2.0, 1), layer(1.0, 8), layer(0.5, 16)).best_step() == 8
    assert table(LayerLatency("conv", [64], [64], [[1.0]])).best_step() == 1  # nothing probed
