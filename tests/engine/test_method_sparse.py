"""Sparse training (docs/src/design/pruning.md, "Methods"): SET and RigL hold each layer's
density while their masks move, RigL regrows where the dense gradient is largest with a
cosine-decayed drop fraction, and ERK shares the budget out by its formula."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

import autoprune.engine.methods.rigl  # noqa: F401
import autoprune.engine.methods.set  # noqa: F401
from autoprune import engine
from autoprune.config import Budget, FinetuneConfig, Policy
from autoprune.engine.graph import clone
from autoprune.engine.hooks import TrainHook
from autoprune.engine.measure import Cost
from autoprune.engine.methods.context import MethodContext
from autoprune.engine.methods.rigl import RigLUpdates, cosine_drop
from autoprune.engine.methods.set import (
    SparseUpdates,
    drop_and_grow,
    erk_masks,
    erk_weights,
    initial_masks,
    update_end,
    update_steps,
)

BUDGET = Budget("flops", 0.5)


def _context(task, dense, metrics, cfg, **policy) -> MethodContext:
    cost = Cost(metrics["flops"], metrics["params"], {})
    return MethodContext(
        task, dense, Policy(structure="unstructured", **policy), BUDGET, cfg, cost, torch.device("cpu")
    )


def _masks(model, names) -> dict[str, torch.Tensor]:
    modules = dict(model.named_modules())
    return {n: modules[n].weight_mask.detach().flatten().bool().clone() for n in names}


class _Snapshot(TrainHook):
    """Masks and weights of the listed layers after each backward pass (before the hooks
    after it in the list run)."""

    def __init__(self, model, names) -> None:
        self.model, self.names, self.seen = model, names, {}

    def after_backward(self, step: int, total: int) -> None:
        modules = dict(self.model.named_modules())
        weights = {n: modules[n].weight_orig.detach().flatten().clone() for n in self.names}
        self.seen[step] = (_masks(self.model, self.names), weights)


@pytest.mark.parametrize("updates", [SparseUpdates, RigLUpdates])
def test_updates_hold_each_layer_count_while_the_masks_move(
    digits_task, digits_dense, digits_dense_metrics, engine_cfg, updates
):
    """In real training: at every update step each layer drops int(f * active) of its active
    weights, the smallest in magnitude, and regrows as many among those inactive before,
    at zero; its active count is unchanged. Between updates the masks stay put."""
    ctx = _context(digits_task, digits_dense, digits_dense_metrics, engine_cfg)
    pruned = initial_masks(ctx, clone(digits_dense), "erk")
    model, names = pruned.model, list(pruned.counts)
    per_epoch = len(digits_task.loader("train", shuffle=True, seed=0))
    end = update_end(per_epoch)
    steps = update_steps(end, 4)
    assert steps == [4, 8] and end == 12  # 16 steps: updates stop at 75%
    hook = updates(model, names, steps, end, 0.3, seed=0)
    before, after = _Snapshot(model, names), _Snapshot(model, names)
    ctx.train(model, FinetuneConfig(epochs=1), "sparse", hooks=[before, hook, after])
    for step in range(per_epoch):
        (old, weights), (new, regrown_weights) = before.seen[step], after.seen[step]
        fraction = hook.drop_fraction(step)
        for name in names:
            a, b = old[name], new[name]
            assert int(a.sum()) == int(b.sum()) == pruned.sizes[name] - pruned.counts[name]
            dropped, grown = a & ~b, b & ~a
            if step not in steps:
                assert not dropped.any() and not grown.any()
                continue
            n = min(int(fraction * int(a.sum())), int((~a).sum()))
            assert int(dropped.sum()) == int(grown.sum()) == n
            assert (n > 0) == bool((~a).any())  # every layer with inactive weights moves
            if not n:
                continue
            magnitude = weights[name].abs()
            assert magnitude[dropped].max() <= magnitude[a & b].min()  # the smallest active went
            assert torch.all(regrown_weights[name][grown] == 0)  # regrown from zero
    assert [u["step"] for u in hook.updates] == steps
    assert all(u["dropped"] == u["regrown"] > 0 for u in hook.updates)


def test_drop_and_grow_on_a_known_layer():
    """Known answer: the two smallest active weights go; the regrown are the two inactive
    positions with the largest |grow|, not the active one whose |grow| is larger still."""
    layer = nn.Linear(4, 4, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.arange(1.0, 17.0).view(4, 4) * torch.tensor([1.0, -1.0] * 8).view(4, 4))
    mask = torch.tensor([1.0, 0.0] * 8).view(4, 4)  # even positions active
    torch_prune.custom_from_mask(layer, "weight", mask)
    grow = torch.zeros(16)
    grow[[5, 11, 3]] = torch.tensor([10.0, -20.0, 5.0])
    grow[6] = 100.0  # active: not a candidate
    moved = drop_and_grow(layer, 0.25, grow.view(4, 4))
    new = layer.weight_mask.flatten()
    assert moved == 2 and int(new.sum()) == 8
    assert set(torch.nonzero(new == 0).flatten().tolist()) == {0, 2, 1, 3, 7, 9, 13, 15}
    assert set(torch.nonzero(new).flatten().tolist()) == {4, 6, 8, 10, 12, 14, 5, 11}
    orig = layer.weight_orig.detach().flatten()
    assert orig[5] == 0 and orig[11] == 0 and orig[0] == 0 and orig[2] == 0
    assert orig[4] == 5.0 and orig[6] == 7.0  # the kept weights keep their values


def test_rigl_regrows_where_the_dense_gradient_is_largest():
    """The gradient RigL captures is the dense one (a plain copy of the masked network gives
    it for every weight, masked ones included) and it regrows at its top-k inactive entries."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    plain = clone(model)
    for i in (0, 2):
        mask = (torch.rand_like(model[i].weight) < 0.5).float()
        torch_prune.custom_from_mask(model[i], "weight", mask)
        with torch.no_grad():
            plain[i].weight.mul_(mask)
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    nn.functional.cross_entropy(plain(x), y).backward()
    end, drop = 10, 0.6
    hook = RigLUpdates(model, ["0", "2"], [0], end, drop, seed=0)
    before = _masks(model, ["0", "2"])
    hook.on_step_start(0, end)
    nn.functional.cross_entropy(model(x), y).backward()
    hook.after_backward(0, end)
    after = _masks(model, ["0", "2"])
    assert not hook.handles and not hook.grads  # captured at the update step only
    for i, name in ((0, "0"), (2, "2")):
        a, b = before[name], after[name]
        n = int(cosine_drop(0, end, drop) * int(a.sum()))
        dense = plain[i].weight.grad.flatten().abs()
        assert dense[~a].count_nonzero() >= n  # a gradient worth ranking
        expected = torch.topk(torch.where(a, -1.0, dense), n).indices
        assert set(torch.nonzero(b & ~a).flatten().tolist()) == set(expected.tolist())
        assert int(b.sum()) == int(a.sum())


def test_cosine_drop_fraction_and_the_updates_a_run_makes(digits_task, digits_dense, digits_dense_metrics, engine_cfg):
    end, drop = 12, 0.3
    for t in range(end + 3):
        assert cosine_drop(t, end, drop) == pytest.approx(drop / 2 * (1 + math.cos(math.pi * min(t, end) / end)))
    assert cosine_drop(0, end, drop) == pytest.approx(drop)
    assert cosine_drop(6, end, drop) == pytest.approx(drop / 2)
    assert cosine_drop(end, end, drop) == pytest.approx(0.0)
    policy = Policy(structure="unstructured", method="rigl", finetune=FinetuneConfig(epochs=1))
    result = engine.run(digits_task, digits_dense, policy, BUDGET, engine_cfg, digits_dense_metrics)
    assert [e["phase"] for e in result.events] == ["initial masks", "final masks"]
    assert 0.49 <= result.pruned["flops_ratio"] <= 0.50
    assert result.events[-1]["reached"] == pytest.approx(result.pruned["flops_ratio"], abs=1e-9)
    sizes = {n: m.weight.numel() for n, m in result.model.named_modules() if n in result.ratios}
    masked = {n: round(r * sizes[n]) for n, r in result.ratios.items()}
    updates = result.events[-1]["updates"]
    assert [u["step"] for u in updates] == [4, 8]
    for u in updates:
        f = drop / 2 * (1 + math.cos(math.pi * u["step"] / end))
        assert u["drop_fraction"] == pytest.approx(f)
        expected = sum(min(int(f * (sizes[n] - k)), k) for n, k in masked.items())
        assert u["dropped"] == u["regrown"] == expected


def test_erk_densities_follow_the_formula_and_meet_the_budget(
    digits_task, digits_dense, digits_dense_metrics, engine_cfg
):
    ctx = _context(digits_task, digits_dense, digits_dense_metrics, engine_cfg, keep_classifier=True)
    model = clone(digits_dense)
    pruned = erk_masks(ctx, model)
    assert "fc" not in pruned.counts and not hasattr(model.fc, "weight_mask")  # the kept classifier
    modules = dict(model.named_modules())
    density = {n: 1 - k / pruned.sizes[n] for n, k in pruned.counts.items()}
    raw = {n: erk_weights(tuple(modules[n].weight.shape)) for n in pruned.counts}
    open_ = [n for n, d in density.items() if d < 1]
    scale = [density[n] / raw[n] for n in open_]
    assert len(open_) >= 3 and max(scale) / min(scale) < 1.01  # density proportional to the ERK weight
    assert any(d == 1 for d in density.values())  # small layers saturate ...
    for n, d in density.items():
        if d == 1:
            assert raw[n] * min(scale) >= 0.99  # ... exactly those the scale lifts to 1
    for n in open_:  # the mask took the smallest weights
        w = modules[n].weight_orig.detach().abs()
        on = modules[n].weight_mask.bool()
        assert w[~on].max() <= w[on].min()
    reached = ctx.reached(model)
    assert BUDGET.fraction - 1e-4 <= reached <= BUDGET.fraction
    assert reached == pytest.approx(pruned.estimate, abs=1e-9)


@pytest.mark.parametrize("method", ["set", "rigl"])
def test_global_without_fine_tuning_prunes_at_once_as_the_solver_does(
    digits_task, digits_dense, digits_dense_metrics, engine_cfg, method
):
    def run(name, **options):
        policy = Policy(
            structure="unstructured",
            criterion="magnitude",
            scope="global",
            method=name,
            method_options=options,
            finetune=FinetuneConfig(epochs=0),
        )
        return engine.run(digits_task, digits_dense, policy, BUDGET, engine_cfg, digits_dense_metrics)

    sparse, oneshot = run(method, distribution="global"), run("oneshot")
    assert [e["phase"] for e in sparse.events] == ["initial masks"]
    a, b = sparse.model.state_dict(), oneshot.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert sparse.ratios == oneshot.ratios
    assert 0.49 <= sparse.pruned["flops_ratio"] <= 0.50


def test_update_schedule_stops_at_three_quarters():
    assert update_end(16) == 12 and update_steps(12, 4) == [4, 8]
    assert update_steps(update_end(160), 10) == list(range(10, 120, 10))
    assert update_steps(update_end(2), 4) == []
    assert np.all(np.diff(update_steps(update_end(1000), 7)) == 7)
