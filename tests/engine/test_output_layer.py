"""The output layer is found from the autograd graph, not from registration order, and a
pruning that would change the model's output shape is refused."""

from __future__ import annotations

import inspect
import os

import numpy as np
import pytest
import torch
from torch import nn

from autoprune.engine.graph import PrunableGraph, _groups_of, replay_history
from autoprune.engine.models import classifier_layer, digits_resnet
from autoprune.errors import AutopruneError


class SEHeadNet(nn.Module):
    """Conv stem, a squeeze-and-excitation block of two Linear layers registered *after* the
    1x1-conv head that really produces the three class scores, global average pooling."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.head = nn.Conv2d(8, 3, 1)
        self.se_reduce = nn.Linear(8, 4)
        self.se_expand = nn.Linear(4, 8)
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn(self.stem(x)))
        scale = torch.sigmoid(self.se_expand(torch.relu(self.se_reduce(x.mean((2, 3))))))
        x = x * scale[:, :, None, None]
        return torch.flatten(self.pool(self.head(x)), 1)


EXAMPLE = torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(0))


def test_output_layer_is_the_head_conv_not_the_se_linear_registered_after_it():
    model = SEHeadNet().train()
    assert classifier_layer(model, EXAMPLE) is model.head
    assert model.training  # the training flag is restored
    assert not any(m._forward_hooks for m in model.modules())  # the hooks are removed


def test_output_layer_of_a_tuple_or_dict_output_is_that_of_its_first_tensor():
    class TwoHeads(nn.Module):
        def __init__(self, as_dict: bool) -> None:
            super().__init__()
            self.body = nn.Linear(4, 6)
            self.logits = nn.Linear(6, 3)
            self.aux = nn.Linear(6, 2)  # registered last
            self.as_dict = as_dict

        def forward(self, x):
            h = torch.relu(self.body(x))
            return {"logits": self.logits(h), "aux": self.aux(h)} if self.as_dict else (self.logits(h), self.aux(h))

    for as_dict in (False, True):
        model = TwoHeads(as_dict)
        assert classifier_layer(model, torch.randn(1, 4)) is model.logits


def test_output_layer_falls_back_to_the_last_linear_without_autograd_history():
    class Argmax(nn.Module):  # an integer output has no grad_fn
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3)
            self.fc = nn.Linear(4, 3)
            self.extra = nn.Linear(3, 3)

        def forward(self, x):
            return self.fc(self.conv(x).mean((2, 3))).argmax(1)

    model = Argmax()
    assert classifier_layer(model, EXAMPLE) is model.extra


def test_a_model_without_linear_or_conv_layers_is_refused():
    with pytest.raises(AutopruneError, match="no Linear or Conv layer"):
        classifier_layer(nn.Sequential(nn.Flatten(), nn.ReLU()), EXAMPLE)


def test_head_conv_is_never_pruned_and_the_output_keeps_its_shape():
    model = SEHeadNet().eval()
    graph = PrunableGraph(model, EXAMPLE)
    assert graph.output_layer == "head"
    assert graph.output_shape == (1, 3)
    assert "head" not in graph.group_names()
    for group in graph.groups:  # no group removes the head's output channels
        assert ("head", "out") not in {(it.module, it.dim) for it in group.items}
    graph.dry_run()
    graph.prune({g.name: np.arange(g.size // 2) for g in graph.groups})
    assert model.head.out_channels == 3
    assert model.stem.out_channels == 4  # channels really went
    with torch.no_grad():
        assert model(torch.randn(5, 1, 8, 8)).shape == (5, 3)


def test_digits_and_torchvision_models_keep_their_last_linear():
    import torchvision

    digits = digits_resnet()
    assert classifier_layer(digits, torch.randn(1, 1, 8, 8)) is digits.fc
    mobilenet = torchvision.models.mobilenet_v3_small(num_classes=5)
    assert classifier_layer(mobilenet, torch.randn(1, 3, 64, 64)) is mobilenet.classifier[3]
    resnet = torchvision.models.resnet18(num_classes=5)
    assert classifier_layer(resnet, torch.randn(1, 3, 32, 32)) is resnet.fc


def _with_head_prunable(model: nn.Module) -> PrunableGraph:
    """A graph whose groups were chosen with the wrong output layer (the SE block's last
    Linear, as registration order used to pick it): the head conv becomes a group."""
    graph = PrunableGraph(model, EXAMPLE)
    names = {m: n for n, m in model.named_modules()}
    graph.groups = _groups_of(graph.dg, names, [model.se_expand])
    assert "head" in [g.name for g in graph.groups]
    return graph


def test_dry_run_refuses_a_group_that_changes_the_output_shape():
    graph = _with_head_prunable(SEHeadNet().eval())
    with pytest.raises(AutopruneError, match="output shape") as err:
        graph.dry_run()
    message = str(err.value)
    assert "pruning group 'head' changes the model's output shape from (1, 3) to (1, 2)" in message
    assert "\n" not in message


def test_prune_refuses_a_plan_that_changes_the_output_shape():
    model = SEHeadNet().train()
    graph = _with_head_prunable(model)
    with pytest.raises(AutopruneError, match="output shape") as err:
        graph.prune({"head": np.array([0, 1]), "se_reduce": np.array([0])})
    assert "group(s) 'head' changes the model's output shape from (1, 3) to (1, 1)" in str(err.value)
    assert model.training  # the check's forward pass restores the training flag


def test_prune_checks_the_output_shape_even_for_channels_removed_outside_the_plan():
    model = SEHeadNet().eval()
    graph = PrunableGraph(model, EXAMPLE)
    graph.dg.get_pruning_group(model.head, graph.dg.get_pruner_of_module(model.head).prune_out_channels, [0]).prune()
    with pytest.raises(AutopruneError, match=r"output shape from \(1, 3\) to \(1, 2\)"):
        graph.prune({})


TASK_MODULE = f"""
import torch
from torch import nn
from torch.utils.data import TensorDataset

from autoprune.engine.tasks import Task

{inspect.getsource(SEHeadNet)}

def task():
    g = torch.Generator().manual_seed(0)

    def data(n):
        return TensorDataset(torch.randn(n, 1, 8, 8, generator=g), torch.arange(n) % 3)

    return Task(name="sehead", model_name="sehead", model_factory=SEHeadNet, train=data(48), val=data(24),
                test=data(24), input_shape=(1, 8, 8), num_classes=3, batch_size=16)
"""


def test_cli_prune_keeps_a_conv_heads_three_outputs(cli, tmp_path):
    (tmp_path / "sehead_task.py").write_text(TASK_MODULE)
    env = {
        "AUTOPRUNE_CACHE": str(tmp_path / "cache"),
        "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    }
    out = tmp_path / "o"
    proc = cli(
        "prune",
        "--task",
        "sehead_task:task",
        "--budget-flops",
        "0.5",
        "--finetune-epochs",
        "1",
        "--device",
        "cpu",
        "--out",
        str(out),
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    assert (out / "summary.json").is_file()
    blob = torch.load(out / "model.pt", map_location="cpu", weights_only=True)
    model = SEHeadNet()
    replay_history(model, EXAMPLE, blob["history"])
    model.load_state_dict(blob["state_dict"])
    assert model.head.out_channels == 3 and model.stem.out_channels < 8
    with torch.no_grad():
        assert model.eval()(torch.randn(4, 1, 8, 8)).shape == (4, 3)
