"""The budget solver on synthetic groups with a known cost, and the Policy data type."""

from __future__ import annotations

import json

import numpy as np
import pytest

from autoprune.config import Budget, Policy
from autoprune.engine.solver import LayerInfo, solve_channels, solve_masks
from autoprune.errors import AutopruneError

NAMES = ["a", "b", "c", "d"]
SIZES = [16, 32, 64, 8]
WEIGHT = [3.0, 1.0, 0.5, 10.0]  # cost of one kept channel in each group
OTHER = 50.0  # cost nothing removes
DENSE = OTHER + sum(w * n for w, n in zip(WEIGHT, SIZES))


def cost(removed):
    flops = OTHER + sum(w * (len(m) - m.sum()) for w, m in zip(WEIGHT, removed))
    return flops, flops  # params follow the same shape here


def scores(seed=0):
    rng = np.random.default_rng(seed)
    return {n: rng.random(s) for n, s in zip(NAMES, SIZES)}


@pytest.mark.parametrize("scope", ["local", "global", "per_layer"])
@pytest.mark.parametrize("fraction", [0.35, 0.5, 0.8])
def test_channel_solver_lands_within_one_percent_below_budget(scope, fraction):
    ratios = {"a": 0.2, "b": 0.5, "c": 0.7, "d": 0.1} if scope == "per_layer" else None
    policy = Policy(scope=scope, ratios=ratios)
    plan = solve_channels(NAMES, SIZES, scores(), policy, Budget("flops", fraction), cost, (DENSE, DENSE))
    real = cost([plan.removed[n] for n in NAMES])[0] / DENSE
    assert fraction - 0.01 <= real <= fraction
    assert plan.fraction == pytest.approx(real)


def test_local_scope_prunes_the_lowest_scores_at_one_ratio():
    s = scores(1)
    plan = solve_channels(NAMES, SIZES, s, Policy(scope="local"), Budget("flops", 0.6), cost, (DENSE, DENSE))
    for n in NAMES:
        removed = plan.removed[n]
        if removed.any() and (~removed).any():
            # every removed channel scores below every kept one in its group
            assert s[n][removed].max() <= s[n][~removed].min()
    # one ratio everywhere, up to rounding and the final give-back of a step's channels
    ratios = np.array([plan.removed[n].mean() for n in NAMES])
    assert ratios.max() - ratios.min() <= 1 / min(SIZES) + 1e-9


def test_global_scope_uses_one_threshold():
    s = scores(2)
    plan = solve_channels(NAMES, SIZES, s, Policy(scope="global"), Budget("flops", 0.5), cost, (DENSE, DENSE))
    removed = np.concatenate([s[n][plan.removed[n]] for n in NAMES])
    kept = np.concatenate([s[n][~plan.removed[n]] for n in NAMES])
    # apart from channels given back in the last step, removed scores lie below kept ones
    assert np.mean(removed[:, None] < kept[None, :]) > 0.95


def test_per_layer_keeps_the_allocation_order():
    ratios = {"a": 0.1, "b": 0.3, "c": 0.6, "d": 0.0}
    plan = solve_channels(
        NAMES, SIZES, scores(), Policy(scope="per_layer", ratios=ratios), Budget("flops", 0.6), cost, (DENSE, DENSE)
    )
    got = plan.ratios()
    assert got["d"] == 0.0
    assert got["a"] <= got["b"] <= got["c"]


def test_no_group_is_ever_emptied():
    policy = Policy(scope="global", max_ratio=1.0)
    s = scores()
    s["d"] = s["d"] - 100.0  # group d scores lowest everywhere
    plan = solve_channels(NAMES, SIZES, s, policy, Budget("flops", 0.3), cost, (DENSE, DENSE))
    for n in NAMES:
        assert (~plan.removed[n]).sum() >= 1


def test_unreachable_budget_names_the_smallest_reachable_fraction():
    with pytest.raises(AutopruneError) as err:
        solve_channels(NAMES, SIZES, scores(), Policy(max_ratio=0.5), Budget("flops", 0.2), cost, (DENSE, DENSE))
    smallest = cost([np.arange(n) < n // 2 for n in SIZES])[0] / DENSE
    assert f"{smallest:.4f}" in str(err.value)
    assert "unreachable" in str(err.value)


LAYERS = [LayerInfo("l1", 100, 1000.0), LayerInfo("l2", 400, 2000.0), LayerInfo("l3", 40, 40.0)]
FLOPS0 = 3040.0 + 60.0  # 60 FLOPs outside the maskable layers


@pytest.mark.parametrize("scope", ["local", "global", "per_layer"])
@pytest.mark.parametrize("kind", ["flops", "params"])
def test_mask_solver_meets_effective_budget(scope, kind):
    rng = np.random.default_rng(0)
    s = {layer.name: rng.random(layer.numel) for layer in LAYERS}
    ratios = {"l1": 0.2, "l2": 0.8, "l3": 0.5} if scope == "per_layer" else None
    policy = Policy(structure="unstructured", scope=scope, ratios=ratios)
    params0 = 540.0 + 20.0
    counts, frac = solve_masks(LAYERS, s, policy, Budget(kind, 0.3), (FLOPS0, params0))
    if kind == "flops":
        real = (FLOPS0 - sum(layer.flops * counts[layer.name] / layer.numel for layer in LAYERS)) / FLOPS0
    else:
        real = (params0 - sum(counts.values())) / params0
    assert 0.29 <= real <= 0.3
    assert frac == pytest.approx(real)
    assert all(counts[layer.name] <= int(0.9 * layer.numel) for layer in LAYERS)


def test_policy_json_round_trip(tmp_path):
    policy = Policy(
        structure="unstructured",
        criterion="random",
        scope="per_layer",
        ratios={"x": 0.5},
        finetune={"epochs": 3, "lr": 0.05},
    )
    path = tmp_path / "p.json"
    policy.to_json(path)
    again = Policy.from_json(path)
    assert again == policy
    assert json.loads(path.read_text())["finetune"]["epochs"] == 3


@pytest.mark.parametrize(
    "data, words",
    [
        ({"criterion": "nope"}, ["nope", "magnitude", "random"]),
        ({"structure": "blocks"}, ["blocks", "channel", "unstructured"]),
        ({"scope": "everywhere"}, ["everywhere", "global", "local", "per_layer"]),
        ({"method": "magic"}, ["magic", "oneshot"]),
        ({"scope": "per_layer"}, ["ratios"]),
        ({"colour": "red"}, ["colour", "structure"]),
        ({"max_ratio": 0}, ["max_ratio"]),
        ({"finetune": {"epochs": -1}}, ["epochs"]),
    ],
)
def test_bad_policies_name_the_bad_value_and_what_is_allowed(data, words):
    from autoprune.engine import check_policy

    with pytest.raises(AutopruneError) as err:
        check_policy(Policy.from_dict(data))  # field values: Policy itself; names: check_policy
    for w in words:
        assert w in str(err.value)


@pytest.mark.parametrize("fraction", [0, -0.5, 1.5, "x"])
def test_budget_outside_unit_interval(fraction):
    with pytest.raises(AutopruneError, match=r"\(0, 1\]"):
        Budget("flops", fraction)
