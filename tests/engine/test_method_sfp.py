"""Soft filter pruning (He et al. 2018): zeroed filters keep training and grow back, every
soft prune chooses anew, and the final prune removes its channels physically at the budget."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import autoprune.engine.methods.sfp  # noqa: F401 - registers the method
from autoprune import engine
from autoprune.config import Budget, FinetuneConfig, Policy
from autoprune.engine.graph import PRUNABLE_TYPES, PrunableGraph, clone
from autoprune.engine.measure import Cost
from autoprune.engine.methods import MethodContext
from autoprune.engine.methods.sfp import SoftPrune
from autoprune.errors import AutopruneError

BUDGET = Budget("flops", 0.5)


def _filters(graph: PrunableGraph, plan: dict[str, np.ndarray]) -> list[torch.Tensor]:
    """The filters (output rows of the conv and linear layers) of the planned channels."""
    out = []
    for group in graph.groups:
        chosen = np.asarray(plan.get(group.name, ()), dtype=int)
        for item in group.items:
            module = graph.model.get_submodule(item.module)
            if item.dim == "out" and isinstance(module, PRUNABLE_TYPES):
                rows = item.idxs[np.isin(item.root_idxs, chosen)]
                out += [module.weight[int(r)].detach().clone() for r in rows]
    return out


def _context(task, dense, metrics, cfg, **policy) -> MethodContext:
    policy = Policy(method="sfp", **policy)
    cost = Cost(metrics["flops"], metrics["params"], {})
    return MethodContext(task, dense, policy, BUDGET, cfg, cost, next(dense.parameters()).device)


def test_zeroed_filters_grow_back_and_the_next_soft_prune_chooses_anew(
    digits_task, digits_dense, digits_dense_metrics, engine_cfg
):
    ctx = _context(digits_task, digits_dense, digits_dense_metrics, engine_cfg, criterion="snip")
    work = clone(digits_dense)
    soft = SoftPrune(ctx, work, epochs=2, interval=1)
    soft.soft(0)
    first = soft.plans[0]
    zeroed = _filters(soft.graph, first)
    assert zeroed and all(not f.any() for f in zeroed)  # the chosen filters are exactly zero
    sizes = {g.name: g.size for g in soft.graph.groups}
    kept = {g: np.setdiff1d(np.arange(size), first.get(g, ())) for g, size in sizes.items()}
    assert all(f.any() for f in _filters(soft.graph, kept))  # and only those
    blocks = [f"layers.{i}" for i in range(4)]
    shift = {b: work.get_submodule(f"{b}.bn1").bias.detach().clone() for b in blocks}
    ctx.train(work, FinetuneConfig(epochs=1), "fine-tune")  # nothing holds them at zero
    regrew = 0
    for b in blocks:  # conv1 -> bn1 -> relu: the norm layer is left alone, so a zeroed filter
        # gets a gradient (and grows back) exactly where the ReLU passes the norm's shift
        chosen = first[f"{b}.conv1"]
        grown = work.get_submodule(f"{b}.conv1").weight.detach()[chosen].flatten(1).abs().sum(1) > 0
        assert torch.equal(grown, shift[b][chosen] > 0), b
        regrew += int(grown.sum())
    assert regrew > 0
    soft.soft(16)
    second = soft.plans[1]
    assert all(not f.any() for f in _filters(soft.graph, second))
    # chosen from scratch, not a growing mask: channels zeroed before are free again, and
    # some that regrew are spared now, with the filters they regrew
    spared = {g: np.setdiff1d(first[g], second.get(g, ())) for g in first}
    assert any(f.any() for f in _filters(soft.graph, spared))
    # the final prune removes exactly the channels it chooses; the others keep their weights
    final = soft.final()
    stem = np.setdiff1d(np.arange(sizes["stem.0"]), final.plan["stem.0"])
    assert torch.equal(final.model.stem[0].weight, work.stem[0].weight[stem])
    assert final.model.stem[0].out_channels == sizes["stem.0"] - len(final.plan["stem.0"]) < sizes["stem.0"]
    assert [e["phase"] for e in ctx.events] == ["soft prune 1/3", "soft prune 2/3", "soft prune 3/3"]
    assert [e["step"] for e in ctx.events] == [0, 16, 32]
    assert ctx.events[-1]["reached"] <= BUDGET.fraction


def test_the_final_prune_removes_its_channels_at_the_budget(
    digits_task, digits_dense, digits_dense_metrics, engine_cfg
):
    policy = Policy(method="sfp", method_options={"interval": 2, "recover": 0}, finetune=FinetuneConfig(epochs=3))
    result = engine.run(digits_task, digits_dense, policy, BUDGET, engine_cfg, digits_dense_metrics)
    per_epoch = len(digits_task.loader("train", shuffle=True, seed=0))
    assert [e["phase"] for e in result.events] == ["soft prune 1/3", "soft prune 2/3", "soft prune 3/3"]
    assert [e["step"] for e in result.events] == [0, 2 * per_epoch, 3 * per_epoch]
    assert all(e["target"] == BUDGET.fraction for e in result.events)
    assert 0.49 <= result.pruned["flops_ratio"] <= 0.50
    assert result.events[-1]["reached"] == pytest.approx(result.pruned["flops_ratio"], abs=1e-9)
    assert len(result.epochs) == 3 and result.pruned["val_acc"] > 0.5
    # removed physically, not zeroed: each group's layer is narrower by what it lost
    dense = dict(digits_dense.named_modules())
    pruned = dict(result.model.named_modules())
    assert any(r > 0 for r in result.ratios.values())
    for group, ratio in result.ratios.items():
        width = dense[group].out_channels
        assert pruned[group].out_channels == width - round(ratio * width), group
    assert result.pruned["params"] < digits_dense_metrics["params"]


def test_without_fine_tuning_it_prunes_once(digits_task, digits_dense, digits_dense_metrics, engine_cfg):
    policy = Policy(method="sfp", finetune=FinetuneConfig(epochs=0))
    result = engine.run(digits_task, digits_dense, policy, BUDGET, engine_cfg, digits_dense_metrics)
    assert [(e["phase"], e["step"]) for e in result.events] == [("soft prune 1/1", 0)]
    assert 0.49 <= result.pruned["flops_ratio"] <= 0.50 and result.epochs == []


def test_sfp_prunes_channels_only():
    with pytest.raises(AutopruneError, match="method 'sfp' prunes structure"):
        engine.check_policy(Policy(method="sfp", structure="unstructured"))
    with pytest.raises(AutopruneError, match="interval"):
        engine.check_policy(Policy(method="sfp", method_options={"interval": 0}))


def test_the_final_choice_is_held_at_zero_while_the_last_epochs_recover(
    digits_task, digits_dense, digits_dense_metrics, engine_cfg
):
    """``recover`` 1 of 3 epochs, interval 1: soft prunes at 0 and after epoch 1; after epoch 2 the
    final choice is held at zero (filters and norm layers) through epoch 3, then removed."""
    ctx = _context(digits_task, digits_dense, digits_dense_metrics, engine_cfg, criterion="magnitude")
    work = clone(digits_dense)
    soft = SoftPrune(ctx, work, epochs=3, interval=1, recover=1)
    soft.soft(0)
    ctx.train(work, FinetuneConfig(epochs=3), "fine-tune", hooks=[soft])
    per_epoch = len(digits_task.loader("train", shuffle=True, seed=0))
    assert [e["step"] for e in ctx.events] == [0, per_epoch, 2 * per_epoch]
    assert [e["phase"] for e in ctx.events] == ["soft prune 1/3", "soft prune 2/3", "soft prune 3/3"]
    held = soft.plans[-1]
    final = soft.final()  # the mask applied once more: the last step's update is undone
    assert all(not f.any() for f in _filters(soft.graph, held))
    norm = work.get_submodule("layers.0.bn1")
    assert not norm.weight[torch.as_tensor(held["layers.0.conv1"])].any()
    assert final.plan is held and final.model.stem[0].out_channels == work.stem[0].out_channels - len(held["stem.0"])
    x = digits_task.example_input()
    torch.testing.assert_close(final.model.eval()(x), work.eval()(x), rtol=1e-4, atol=1e-5)  # removal changes nothing
