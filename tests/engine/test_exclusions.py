"""Layers a policy keeps stay untouched (masks and channels) while the budget is met on the
rest, and both BN warm-up modes change nothing but BN running statistics."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from autoprune import engine
from autoprune.config import Budget, FinetuneConfig, Policy
from autoprune.engine.methods import MethodContext

NO_FT = FinetuneConfig(epochs=0)


def _run(task, dense, metrics, cfg, policy, budget):
    return engine.run(task, dense, policy, budget, cfg, metrics)


@pytest.mark.parametrize("budget", [Budget("flops", 0.5), Budget("params", 0.4)])
def test_kept_layers_keep_every_weight_under_masks(digits_task, digits_dense, digits_dense_metrics, engine_cfg, budget):
    policy = Policy(
        structure="unstructured",
        criterion="magnitude",
        scope="global",
        keep=["layers.0.*"],
        keep_types=["linear"],
        finetune=NO_FT,
    )
    result = _run(digits_task, digits_dense, digits_dense_metrics, engine_cfg, policy, budget)
    dense, pruned = dict(digits_dense.named_modules()), dict(result.model.named_modules())
    kept = {"layers.0.conv1", "layers.0.conv2", "fc"}
    for name in kept:
        assert torch.equal(pruned[name].weight, dense[name].weight), name
    assert kept.isdisjoint(result.ratios)  # never in the solver's problem
    reached = result.pruned[f"{budget.kind}_ratio"]
    assert budget.fraction - budget.tolerance <= reached <= budget.fraction
    others = [m for n, m in pruned.items() if n in result.ratios]
    assert all(int((m.weight == 0).sum()) > 0 for m in others)


def test_kept_layers_are_untouched_by_channel_pruning(digits_task, digits_dense, digits_dense_metrics, engine_cfg):
    policy = Policy(criterion="magnitude", keep=["layers.0.conv1"], keep_classifier=True, finetune=NO_FT)
    result = _run(digits_task, digits_dense, digits_dense_metrics, engine_cfg, policy, Budget("flops", 0.6))
    dense, pruned = dict(digits_dense.named_modules()), dict(result.model.named_modules())
    for name in ("layers.0.conv1", "fc"):  # same shape and values: no output or input channel removed
        assert torch.equal(pruned[name].weight, dense[name].weight), name
    assert "layers.0.conv1" not in result.ratios
    assert 0.59 <= result.pruned["flops_ratio"] <= 0.6
    assert any(r > 0 for r in result.ratios.values())


def test_an_exclusion_that_leaves_the_budget_unreachable_says_so(digits_task, digits_dense, engine_cfg):
    from autoprune.engine.preflight import preflight
    from autoprune.errors import AutopruneError

    with pytest.raises(AutopruneError, match="unreachable.*kept layers"):
        preflight(digits_task, Policy(structure="unstructured", keep_types=["conv"]), Budget("flops", 0.5))
    with pytest.raises(AutopruneError, match="matches no conv or linear layer"):
        preflight(digits_task, Policy(keep=["head*"]), Budget("flops", 0.5))


def _bn_stats(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if "running_" in k or "num_batches" in k}


@pytest.mark.parametrize("mode, batches", [("scoring", None), ("train", None), ("train", 3)])
def test_both_warm_up_modes_change_only_bn_running_statistics(digits_task, digits_dense, engine_cfg, mode, batches):
    from autoprune.engine.graph import clone

    model = clone(digits_dense)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    policy = Policy(criterion="magnitude", bn_warmup=True, bn_warmup_mode=mode, bn_warmup_batches=batches)
    run = MethodContext(digits_task, model, policy, Budget(), engine_cfg, None, torch.device("cpu"))
    assert (run.data is not None) == (mode == "scoring")  # the train pass needs no scoring subset
    run.warm_up(model)
    after = model.state_dict()
    stats = set(_bn_stats(model))
    for key, value in after.items():
        if key not in stats:
            assert torch.equal(value, before[key]), f"{key} changed"
    changed = [k for k in stats if "running_mean" in k and not torch.equal(after[k], before[k])]
    assert changed, "the warm-up refreshed no statistics"
    assert model.training == digits_dense.training
    if mode == "train":
        n_batches = len(digits_task.loader("train")) if batches is None else batches
        tracked = [k for k in stats if k.endswith("num_batches_tracked")]
        assert all(int(after[k] - before[k]) == n_batches for k in tracked)


def test_warm_up_flags_and_exclusions_reach_the_policy():
    from autoprune.cli import build_parser, policy_from_args

    args = build_parser().parse_args(
        [
            "prune",
            "--keep",
            "fc*",
            "--keep",
            "stem.*",
            "--keep-types",
            "linear,conv1d",
            "--keep-classifier",
            "--bn-warmup-mode",
            "train",
            "--bn-warmup-batches",
            "5",
        ]
    )
    policy = policy_from_args(args)
    assert policy.keep == ["fc*", "stem.*"] and policy.keep_types == ["linear", "conv1d"]
    assert policy.keep_classifier and policy.bn_warmup_mode == "train" and policy.bn_warmup_batches == 5
    assert Policy.from_dict(policy.to_dict()) == policy  # the JSON round trip
