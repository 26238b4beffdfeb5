"""Training hooks: when train() calls them, and the channel mask that holds zeros."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from autoprune import engine
from autoprune.config import FinetuneConfig
from autoprune.engine.graph import PrunableGraph, clone
from autoprune.engine.hooks import ChannelMask, Hooks, TrainHook
from autoprune.errors import AutopruneError

RECIPE = FinetuneConfig(epochs=2, lr=0.01, weight_decay=0.0)


class Recorder(TrainHook):
    def __init__(self, model):
        self.model, self.calls = model, []

    def on_step_start(self, step, total):
        grads = [p.grad for p in self.model.parameters()]
        self.calls.append(("start", step, total, all(g is None for g in grads)))

    def after_backward(self, step, total):
        grads = [p.grad for p in self.model.parameters() if p.requires_grad]
        self.calls.append(("backward", step, total, all(g is not None for g in grads)))

    def on_epoch_end(self, epoch, metrics):
        self.calls.append(("epoch", epoch, sorted(metrics)))


def test_train_calls_every_hook_in_order(digits_task, digits_dense):
    model = clone(digits_dense)
    first, second = Recorder(model), Recorder(model)
    told = []
    history = engine.train(
        model, digits_task, RECIPE, 0, torch.device("cpu"), hooks=[first, second], on_epoch=lambda e, m: told.append(e)
    )
    per_epoch = len(digits_task.loader("train", shuffle=True, seed=0))
    total = RECIPE.epochs * per_epoch
    starts = [c for c in first.calls if c[0] == "start"]
    backs = [c for c in first.calls if c[0] == "backward"]
    assert [c[1] for c in starts] == [c[1] for c in backs] == list(range(total))
    assert all(c[2] == total for c in starts + backs)
    assert all(c[3] for c in backs)  # gradients exist when after_backward runs
    assert starts[0][3]  # and none before the first backward pass
    epochs = [c for c in first.calls if c[0] == "epoch"]
    assert epochs == [("epoch", e, ["loss", "val_acc", "val_loss"]) for e in range(RECIPE.epochs)]
    assert first.calls == second.calls and told == [0, 1] and len(history) == 2
    # each epoch's steps come before its end
    assert first.calls.index(("epoch", 0, ["loss", "val_acc", "val_loss"])) == 2 * per_epoch


def test_after_backward_changes_what_the_optimiser_does(digits_task, digits_dense):
    """A hook edits gradients before the step (a penalty would add to them): with every
    gradient zeroed and no weight decay, SGD leaves the weights as they were."""

    class ZeroGrads(TrainHook):
        def __init__(self, model):
            self.model = model

        def after_backward(self, step, total):
            for p in self.model.parameters():
                p.grad.zero_()

    model = clone(digits_dense)
    before = {k: v.clone() for k, v in model.named_parameters()}
    engine.train(
        model, digits_task, FinetuneConfig(epochs=1, weight_decay=0.0), 0, torch.device("cpu"), hooks=ZeroGrads(model)
    )
    assert all(torch.equal(before[k], v) for k, v in model.named_parameters())


def test_hooks_default_to_nothing_and_compose():
    assert Hooks.of(None).hooks == []
    hook = TrainHook()
    assert Hooks.of(hook).hooks == [hook] and Hooks.of([hook, hook]).hooks == [hook, hook]
    hook.on_step_start(0, 1), hook.after_backward(0, 1), hook.on_epoch_end(0, {})


def _out_rows(graph, group: str, model) -> torch.Tensor:
    item = next(i for i in graph.by_name[group].items if i.dim == "out")
    return model.get_submodule(item.module).weight[torch.as_tensor(item.idxs)]


def test_channel_mask_grows_sets_and_holds_zeros(digits_task, digits_dense):
    model = clone(digits_dense)
    example = digits_task.example_input()
    mask = ChannelMask(PrunableGraph(model, example))
    group = next(g for g in mask.graph.groups if g.size >= 8)
    rows = lambda: _out_rows(mask.graph, group.name, model)  # noqa: E731
    mask.grow({group.name: np.array([0, 1])})
    assert mask.plan[group.name].tolist() == [0, 1] and rows()[:2].abs().sum() == 0
    mask.grow({group.name: np.array([0])})  # indexes the kept channels: dense channel 2
    assert mask.plan[group.name].tolist() == [0, 1, 2]
    with torch.no_grad():
        model.get_submodule(group.items[0].module).weight.add_(1.0)  # an optimiser step revives them
    mask.on_step_start(0, 1)
    assert rows()[:3].abs().sum() == 0 and rows()[3:].abs().sum() > 0
    pruned, _ = mask.pruned_copy(example)
    assert PrunableGraph(pruned, example).by_name[group.name].size == group.size - 3
    mask.set({group.name: np.array([5])})  # regrowth: 0..2 leave the mask and may train again
    assert mask.plan[group.name].tolist() == [5] and all(len(v) == 0 for g, v in mask.plan.items() if g != group.name)
    assert mask.kept(group.name).tolist() == [i for i in range(group.size) if i != 5]
    with pytest.raises(AutopruneError, match="unknown group"):
        mask.set({"nowhere": np.array([0])})
    with pytest.raises(AutopruneError, match="channels, got index"):
        mask.set({group.name: np.array([group.size])})
