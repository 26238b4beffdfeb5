"""The hard-concrete method (Louizos et al. 2018): the gate's keep probability, the
differentiable expected cost, gates that live outside the model, the Lagrangian steering the
expected cost to the budget, and the exact prune that follows."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import autoprune.engine.methods.hardconcrete as hc  # noqa: F401 - registers the method
from autoprune import engine
from autoprune.config import Budget, FinetuneConfig, Policy
from autoprune.engine.checkpoint import load_model, save_model
from autoprune.engine.graph import PrunableGraph, clone
from autoprune.engine.measure import flops_by_module
from autoprune.engine.prune import prune_channels
from autoprune.engine.train import train

BUDGET = Budget("flops", 0.5)
OPTIONS = {"lr": 0.5, "init_keep": 0.9, "dual_lr": 10.0}


def _small_model() -> nn.Module:
    """A conv, a grouped conv (its group folded by period), a 1x1 conv and a linear layer
    after a flatten (several inputs per channel)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=2),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 6, 1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(6 * 4 * 4, 10),
    ).eval()


def _gates(model, example, init_keep=0.9, dual_lr=1.0, warm=1):
    groups = PrunableGraph(model, example).groups
    cost = hc.ExpectedCost(model, example, groups, "flops")
    opts = {"lr": 0.5, "init_keep": init_keep, "dual_lr": dual_lr}
    return hc.HardConcreteGates(model, groups, cost, BUDGET.fraction, opts, 0, warm), groups


@pytest.mark.parametrize("log_alpha", [-3.0, -1.0, 0.0, 0.5, 2.0])
def test_keep_probability_is_the_monte_carlo_rate_of_nonzero_gates(log_alpha):
    n = 400_000
    gen = torch.Generator().manual_seed(0)
    u = torch.rand(n, generator=gen, dtype=torch.float64) * (1 - 2e-9) + 1e-9
    z = hc.sample_gate(torch.full((n,), log_alpha, dtype=torch.float64), u)
    p = float(hc.keep_probability(torch.tensor(log_alpha)))
    assert 0.0 <= float(z.min()) and float(z.max()) <= 1.0
    assert float((z != 0).double().mean()) == pytest.approx(p, abs=4 * (p * (1 - p) / n) ** 0.5)
    # the stretched tail above 1 clamps too: P(z = 1) = sigmoid(log_alpha - beta log((1 - gamma) / (zeta - 1)))
    one = float(torch.sigmoid(torch.tensor(log_alpha - hc.BETA * np.log((1 - hc.GAMMA) / (hc.ZETA - 1)))))
    assert float((z == 1).double().mean()) == pytest.approx(one, abs=4 * (one * (1 - one) / n) ** 0.5)
    assert float(hc.keep_probability(torch.tensor(hc.log_alpha_for(p)))) == pytest.approx(p, abs=1e-6)


def test_expected_cost_of_hard_gates_is_the_pruned_layers_cost():
    """Keep probabilities of 0 and 1 are a plan: the expected cost is the dense cost with
    every conv/linear layer's FLOPs replaced by its FLOPs in the physically pruned model."""
    model, x = _small_model(), torch.randn(1, 3, 4, 4)
    gates, groups = _gates(model, x)
    rng = np.random.default_rng(0)
    plan = {g.name: np.sort(rng.choice(g.size, g.size // 2, replace=False)) for g in groups}
    keep = {g.name: torch.ones(g.size).index_fill_(0, torch.as_tensor(plan[g.name]), 0.0) for g in groups}
    pruned, _ = prune_channels(model, x, plan)
    total, dense = flops_by_module(model, x)
    _, after = flops_by_module(pruned, x)
    layers = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    want = (total - sum(dense[n] for n in layers) + sum(after[n] for n in layers)) / total
    assert float(gates.cost(keep)) == pytest.approx(want, rel=1e-6)
    assert float(gates.cost({g: torch.ones_like(k) for g, k in keep.items()})) == pytest.approx(1.0)
    assert want < 0.6  # the plan cut something, or the test would mean little


def test_folded_gates_compute_what_the_gated_model_does():
    model, x = _small_model(), torch.randn(2, 3, 4, 4)
    gates, _ = _gates(model, x[:1])
    with torch.no_grad():
        for a in gates.log_alpha.values():
            a.copy_(torch.randn(a.shape) * 2)
    plain = model(x)
    gates.attach()
    gated = model(x)
    state = copy.deepcopy(model.state_dict())
    with torch.no_grad():  # training draws a fresh gate per forward pass
        assert not torch.equal(model.train()(x), model(x))
    model.eval().load_state_dict(state)  # the BN statistics those passes moved
    assert torch.equal(model(x), gated)
    gates.detach()
    assert torch.equal(model(x), plain)  # the hooks are gone
    gates.fold()
    assert not torch.allclose(gated, plain)
    torch.testing.assert_close(model(x), gated, rtol=1e-5, atol=1e-6)


def test_gates_live_outside_the_model_and_follow_the_lagrangian(digits_task, digits_dense):
    model = clone(digits_dense)
    keys = set(model.state_dict())
    n_params = sum(1 for _ in model.parameters())
    example = digits_task.example_input()
    gates, _ = _gates(model, example, dual_lr=10.0)
    before = {g: a.detach().clone() for g, a in gates.log_alpha.items()}
    gates.attach()
    train(model, digits_task, FinetuneConfig(epochs=1), 0, torch.device("cpu"), hooks=[gates])
    gates.detach()
    assert set(model.state_dict()) == keys and sum(1 for _ in model.parameters()) == n_params
    assert not any(a is p for a in gates.log_alpha.values() for p in model.parameters())
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())
    # the gates' own optimiser stepped them after each backward pass, toward the budget
    assert all(not torch.equal(before[g], a) for g, a in gates.log_alpha.items())
    assert gates.expected < gates.start - 0.1 and gates.lam != 0
    for a in gates.log_alpha.values():
        assert hc.LOG_ALPHA_MIN <= float(a.detach().min()) and float(a.detach().max()) <= hc.LOG_ALPHA_MAX


@pytest.fixture(scope="module")
def gated_run(digits_task, digits_dense, digits_dense_metrics, engine_cfg):
    policy = Policy(method="hardconcrete", method_options=OPTIONS, finetune=FinetuneConfig(epochs=6))
    return policy, engine.run(digits_task, digits_dense, policy, BUDGET, engine_cfg, digits_dense_metrics)


def test_the_gates_reach_the_budget_before_the_exact_prune(gated_run, digits_task, digits_dense):
    policy, result = gated_run
    example = digits_task.example_input()
    gates, _ = _gates(clone(digits_dense), example, init_keep=OPTIONS["init_keep"])
    assert gates.start > BUDGET.fraction + 0.25  # init_keep starts them well above the budget
    (event,) = result.events
    total = policy.finetune.epochs * len(digits_task.loader("train", shuffle=True, seed=0))
    assert event["step"] == round(hc.GATE_END * total) and event["phase"] == "gates trained"
    assert event["expected"] == pytest.approx(BUDGET.fraction, abs=0.05)
    assert 0.49 <= result.pruned["flops_ratio"] <= 0.50  # the exact prune
    assert event["reached"] == pytest.approx(result.pruned["flops_ratio"], abs=1e-9)
    assert result.pruned["val_acc"] > 0.9
    assert len(result.epochs) == policy.finetune.epochs


def test_nothing_of_the_gates_is_left_on_the_model(
    gated_run, tmp_path, digits_task, digits_dense, digits_dense_metrics, engine_cfg
):
    policy, result = gated_run
    oneshot = engine.run(
        digits_task, digits_dense, Policy(finetune=FinetuneConfig(epochs=0)), BUDGET, engine_cfg, digits_dense_metrics
    )
    assert set(result.model.state_dict()) == set(oneshot.model.state_dict())
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in result.model.modules())
    save_model(tmp_path / "m.pt", result.model, engine_cfg.task, "channel", result.history, policy.to_dict(), {})
    model, _, _ = load_model(tmp_path / "m.pt")
    x = next(iter(digits_task.loader("test")))[0]
    torch.testing.assert_close(model(x), result.model.eval()(x), rtol=0, atol=0)


def test_without_fine_tuning_it_prunes_at_once_by_the_criterion(
    digits_task, digits_dense, digits_dense_metrics, engine_cfg
):
    policy = Policy(method="hardconcrete", criterion="magnitude", finetune=FinetuneConfig(epochs=0))
    result = engine.run(digits_task, digits_dense, policy, BUDGET, engine_cfg, digits_dense_metrics)
    assert [e["phase"] for e in result.events] == ["no fine-tuning: pruned at once"]
    assert 0.49 <= result.pruned["flops_ratio"] <= 0.50
    oneshot = engine.run(
        digits_task,
        digits_dense,
        Policy(criterion="magnitude", finetune=FinetuneConfig(epochs=0)),
        BUDGET,
        engine_cfg,
        digits_dense_metrics,
    )
    assert result.history == oneshot.history  # the policy's criterion chose the same channels
