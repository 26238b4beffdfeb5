"""The penalty family (docs/src/design/pruning.md, "Methods"): network slimming's L1 penalty on
batch-norm scales and group lasso on channels, each sparsifying before one prune to the budget
and recovering after it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import autoprune.engine.methods.group_lasso  # noqa: F401
import autoprune.engine.methods.slimming  # noqa: F401
from autoprune import engine
from autoprune.config import Budget, FinetuneConfig, Policy
from autoprune.engine.graph import PrunableGraph, clone
from autoprune.engine.methods.group_lasso import ChannelNorms
from autoprune.engine.methods.slimming import BELOW, BNScales, prune_step, spread
from autoprune.errors import AutopruneError

BUDGET = Budget("flops", 0.5)


def _run(task, dense, metrics, cfg, method, penalty, criterion="magnitude", sparsify=0.5, **finetune):
    policy = Policy(
        criterion=criterion,
        method=method,
        method_options={"penalty": penalty, "sparsify": sparsify},
        finetune=FinetuneConfig(**{"epochs": 1, **finetune}),
    )
    return engine.run(task, dense, policy, BUDGET, cfg, metrics)


def _prune_event(result) -> dict:
    (event,) = result.events
    for key in ("below", "below_before"):
        assert 0.0 <= event[key] <= 1.0, (key, event[key])
    return event


def test_spread_counts_magnitudes_under_a_share_of_their_own_largest():
    low = torch.tensor([1.0, BELOW * 0.5, 0.5])  # 0.025 is under 5% of 1.0
    high = torch.tensor([2.0, BELOW * 1.5])  # 0.075 is under 5% of 2.0, though not of 1.0
    below, mean = spread([low, high])
    assert below == pytest.approx(2 / 5)
    assert mean == pytest.approx(float(torch.cat([low, high]).mean()))


def test_the_prune_step_is_the_sparsify_share_of_the_steps():
    assert [prune_step(16, s) for s in (0.01, 0.25, 0.5, 0.75, 0.99)] == [1, 4, 8, 12, 16]
    assert prune_step(1, 0.5) == 1  # after the only step: nothing is left to recover in


def test_slimming_adds_the_l1_subgradient_to_every_grouped_batch_norm(digits_task, digits_dense):
    model = clone(digits_dense)
    groups = PrunableGraph(model, digits_task.example_input()).groups
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    BNScales(model, groups).add_gradient(0.3)
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(norms) == 10
    for m in norms:
        torch.testing.assert_close(m.weight.grad, 0.3 * torch.sign(m.weight), rtol=0, atol=0)
        assert not m.bias.grad.any()
    assert not any(m.weight.grad.any() for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear))


def test_slimming_refuses_a_model_without_batch_norm():
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 2),
    )
    graph = PrunableGraph(model, torch.zeros(1, 1, 8, 8))
    with pytest.raises(AutopruneError, match="use --method group_lasso"):
        BNScales(model, graph.groups)
    ChannelNorms(model, graph.groups)  # group lasso penalises the convs' filters and biases


@pytest.mark.parametrize(
    "group, producers",
    [
        ("layers.0.conv1", ["layers.0.conv1", "layers.0.bn1"]),
        # the residual stream: every layer writing to it, each channel one vector across them
        ("stem.0", ["stem.0", "stem.1", "layers.0.conv2", "layers.0.bn2", "layers.1.conv2", "layers.1.bn2"]),
    ],
)
def test_group_lasso_gradient_is_that_of_the_sum_of_channel_norms(digits_task, digits_dense, group, producers):
    """Known answer: lam * sum_c ||w_c||, w_c the channel's rows of every producing layer's
    weight and bias, differentiated by autograd."""
    lam = 0.7
    model = clone(digits_dense)
    graph = PrunableGraph(model, digits_task.example_input())
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    ChannelNorms(model, [graph.by_name[group]]).add_gradient(lam)
    reference = clone(digits_dense)
    params = [p for n in producers for p in reference.get_submodule(n).parameters(recurse=False)]
    squares = sum(p.reshape(p.shape[0], -1).pow(2).sum(1) for p in params)
    (lam * squares.sqrt().sum()).backward()
    for name, p in model.named_parameters():
        expected = reference.get_parameter(name).grad
        if name.rsplit(".", 1)[0] in producers:
            torch.testing.assert_close(p.grad, expected)
        else:
            assert expected is None and not p.grad.any(), name


def test_slimming_penalty_drives_bn_scales_toward_zero(digits_task, digits_dense, digits_dense_metrics, engine_cfg):
    """Same seed and recipe, penalty > 0 against penalty = 0: at the prune step more batch-norm
    scales are under BELOW of their layer's largest, and their mean |gamma| is smaller."""

    def run(penalty):
        return _run(
            digits_task,
            digits_dense,
            digits_dense_metrics,
            engine_cfg,
            "slimming",
            penalty,
            criterion="bn_scale",
            sparsify=0.9,
            epochs=2,
            lr=0.05,
        )

    plain, penalised = _prune_event(run(0.0)), _prune_event(run(1.0))
    assert plain["below_before"] == penalised["below_before"] and plain["mean_before"] == penalised["mean_before"]
    assert penalised["below"] > plain["below"] + 0.05
    assert penalised["mean"] < 0.5 * plain["mean"]


def test_group_lasso_shrinks_channel_norms_faster(digits_task, digits_dense, digits_dense_metrics, engine_cfg):
    def run(penalty):
        return _run(
            digits_task, digits_dense, digits_dense_metrics, engine_cfg, "group_lasso", penalty, sparsify=0.9, epochs=2
        )

    plain, penalised = _prune_event(run(0.0)), _prune_event(run(10.0))
    assert plain["mean_before"] == penalised["mean_before"]
    assert penalised["below"] > plain["below"] + 0.05
    assert penalised["mean"] < 0.5 * plain["mean"]


def test_without_a_penalty_both_methods_are_the_same_schedule(
    digits_task, digits_dense, digits_dense_metrics, engine_cfg
):
    """Known answer: at penalty 0 only the schedule is left, and it is shared: slimming and group
    lasso train, prune at the sparsify step and recover to the same weights."""
    slim, lasso = (
        _run(digits_task, digits_dense, digits_dense_metrics, engine_cfg, m, 0.0, sparsify=0.25)
        for m in ("slimming", "group_lasso")
    )
    per_epoch = len(digits_task.loader("train", shuffle=True, seed=engine_cfg.seed))
    for result in (slim, lasso):
        event = _prune_event(result)
        assert event["step"] == round(0.25 * per_epoch) and event["phase"] == "after sparsifying"
        assert event["target"] == BUDGET.fraction
        assert event["reached"] == pytest.approx(result.pruned["flops_ratio"], abs=1e-9)
        assert 0.49 <= result.pruned["flops_ratio"] <= 0.50
        # the batch norms' momentum is back after the statistics restarted at the prune step
        assert {m.momentum for m in result.model.modules() if isinstance(m, nn.BatchNorm2d)} == {0.1}
    a, b = slim.model.state_dict(), lasso.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("method", ["slimming", "group_lasso"])
def test_without_fine_tuning_they_prune_at_once(digits_task, digits_dense, digits_dense_metrics, engine_cfg, method):
    result = _run(digits_task, digits_dense, digits_dense_metrics, engine_cfg, method, 1.0, epochs=0)
    assert [(e["step"], e["phase"]) for e in result.events] == [(0, "no fine-tuning: pruned at once")]
    assert 0.49 <= result.pruned["flops_ratio"] <= 0.50 and result.epochs == []
