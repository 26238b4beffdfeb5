"""Every torchvision classifier family, untrained, on small synthetic images: channel and
unstructured pruning to 0.5 FLOPs (global magnitude) meet the budget or are refused with
the clear message the README's coverage table lists.

A pruned model keeps its output shape, is saved and loaded again through the model file
(the pruning history replayed on a fresh dense model) to bit-identical outputs, and, for
channel pruning, computes what the dense model with the same channels zeroed computes.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from autoprune import engine
from autoprune.config import Budget, Policy, TaskConfig
from autoprune.engine.checkpoint import load_model, save_model
from autoprune.engine.graph import PrunableGraph
from autoprune.engine.measure import measure
from autoprune.engine.preflight import preflight
from autoprune.engine.tasks import get_task
from autoprune.errors import AutopruneError

# model -> (image size, {structure: None (prunes) or a part of its refusal message})
FAMILIES = {
    "resnet18": (32, {}),
    "vgg11_bn": (32, {}),
    "mobilenet_v2": (32, {}),
    "mobilenet_v3_small": (32, {}),
    "efficientnet_b0": (32, {}),
    "regnet_x_400mf": (32, {}),
    "resnext50_32x4d": (32, {}),
    "densenet121": (32, {}),
    "convnext_tiny": (32, {}),
    "shufflenet_v2_x0_5": (32, {"channel": "'stage2.0': it shuffles channels between groups"}),
    "squeezenet1_0": (64, {}),
    "googlenet": (64, {}),
    "mnasnet0_5": (32, {}),
    "vit_b_16": (64, {}),
    "vit_b_32": (64, {}),
    "swin_t": (64, {}),
    "maxvit_t": (
        64,
        {s: "cannot run on the task's input of shape (1, 3, 64, 64)" for s in ("channel", "unstructured")},
    ),
}
SLOW = {
    "vit_b_16",
    "swin_t",
    "maxvit_t",
    "vgg11_bn",
    "resnext50_32x4d",
    "densenet121",
    "convnext_tiny",
    "googlenet",
    "efficientnet_b0",
}
CHANNELS_ONLY = {"vit_b_32", "vgg11_bn"}  # masks: vit_b_16's; vgg's are 40 s of sorting its 130M weights
CASES = [
    pytest.param(m, s, marks=[pytest.mark.slow] if m in SLOW else [])
    for m in FAMILIES
    for s in ("channel", "unstructured")
    if s == "channel" or m not in CHANNELS_ONLY
]


def _outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


@pytest.fixture(scope="module")
def image_root(tmp_path_factory, write_image_folder):
    root = tmp_path_factory.mktemp("coverage") / "data"
    return write_image_folder(root, classes=3, per_class=8, size=(64, 64))


@pytest.mark.parametrize("name, structure", CASES)
def test_a_torchvision_family_prunes_to_half_its_flops_or_is_refused_clearly(image_root, tmp_path, name, structure):
    size, refusals = FAMILIES[name]
    config = TaskConfig(name="imagefolder", model=name, data_dir=str(image_root), image_size=size, batch_size=4)
    task = get_task(config)
    policy = Policy(structure=structure, criterion="magnitude", scope="global")
    budget = Budget("flops", 0.5)
    if refusals.get(structure):
        with pytest.raises(AutopruneError) as refused:
            preflight(task, policy, budget)  # what `autoprune prune` and `search` run first
        message = str(refused.value)
        assert refusals[structure] in message and len(message) < 300, message
        return
    preflight(task, policy, budget)
    torch.manual_seed(0)
    dense = task.model_factory().eval()
    dense_cost = measure(dense, task.input_shape, None, latency=False)
    scores = engine.score(dense, policy, None, seed=0)
    pruned = engine.prune_to_budget(dense, task, policy, budget, scores, dense_cost)
    x = torch.randn(2, *task.input_shape, generator=torch.Generator().manual_seed(1))
    out = _outputs(pruned.model, x)
    assert out.shape == (2, task.num_classes) and torch.isfinite(out).all()
    if structure == "channel":
        after = measure(pruned.model, task.input_shape, None, latency=False)
        assert after.flops / dense_cost.flops <= 0.5 + 1e-6
        masked = copy.deepcopy(dense)
        plan = {g: np.asarray(i) for g, i in pruned.plan.items() if len(i)}
        graph = PrunableGraph(masked, task.example_input())
        graph.mask(plan)
        layers = {it.module for g in plan for it in graph.by_name[g].items}
        if not any(isinstance(masked.get_submodule(n), nn.LayerNorm) for n in layers):
            # (a LayerNorm normalises over all channels, zeroed ones included: masks differ there)
            scale = max(float(_outputs(dense, x).abs().max()), 1.0)
            torch.testing.assert_close(out, _outputs(masked, x), rtol=1e-4, atol=1e-4 * scale)
    else:
        assert pruned.estimate <= 0.5 + 1e-6
    path = tmp_path / "model.pt"
    save_model(path, pruned.model, config, structure, pruned.history, {}, {})
    loaded, _, _ = load_model(path, config)
    torch.testing.assert_close(_outputs(loaded, x), out, rtol=0, atol=0)


@pytest.mark.slow
@pytest.mark.parametrize("name, size", [("vit_b_16", 64), ("swin_t", 64), ("regnet_x_400mf", 32)])
def test_transformers_and_grouped_convolutions_prune_fine_tune_and_reload(image_root, tmp_path, name, size):
    """The whole engine (prune by heads and MLP width or in-group positions, fine-tune one
    epoch, evaluate) at 0.5 FLOPs, and the saved model reloads to the same outputs."""
    from autoprune.config import EngineConfig, FinetuneConfig
    from autoprune.engine.attention import ATTENTION_TYPES

    config = TaskConfig(name="imagefolder", model=name, data_dir=str(image_root), image_size=size, batch_size=8)
    cfg = EngineConfig(task=config, train_epochs=0, progress=False)
    task = get_task(config)
    torch.manual_seed(0)
    dense = task.model_factory()
    policy = Policy(criterion="magnitude", scope="global", finetune=FinetuneConfig(epochs=1))
    result = engine.run(task, dense, policy, Budget("flops", 0.5), cfg, measure_latency=False)
    assert result.pruned["flops_ratio"] <= 0.5 + 1e-6 and len(result.epochs) == 1
    heads = [m.num_heads for m in result.model.modules() if isinstance(m, ATTENTION_TYPES)]
    dense_heads = [m.num_heads for m in dense.modules() if isinstance(m, ATTENTION_TYPES)]
    assert (sum(heads) < sum(dense_heads)) == name.startswith(("vit", "swin"))  # heads went
    path = tmp_path / "model.pt"
    save_model(path, result.model, config, "channel", result.history, {}, {})
    loaded, _, _ = load_model(path, config)
    x = torch.randn(2, *task.input_shape)
    torch.testing.assert_close(_outputs(loaded, x), _outputs(result.model, x), rtol=0, atol=0)


@pytest.mark.slow
def test_a_vision_transformers_embedding_width_is_one_group_when_the_policy_asks(image_root, tmp_path):
    config = TaskConfig(name="imagefolder", model="vit_b_16", data_dir=str(image_root), image_size=64, batch_size=4)
    task = get_task(config)
    torch.manual_seed(0)
    dense = task.model_factory().eval()
    off = PrunableGraph(copy.deepcopy(dense), task.example_input())
    assert {g.kind for g in off.groups} == {"channels", "heads"}  # by default the width is left alone
    policy = Policy(structure="channel", criterion="magnitude", scope="global", embedding=True)
    preflight(task, policy, Budget("flops", 0.5))
    dense_cost = measure(dense, task.input_shape, None, latency=False)
    pruned = engine.prune_to_budget(
        dense, task, policy, Budget("flops", 0.5), engine.score(dense, policy, None, 0), dense_cost
    )
    model = pruned.model
    width = model.conv_proj.out_channels
    assert width < 768 and model.hidden_dim == width and model.class_token.shape[-1] == width
    assert model.encoder.pos_embedding.shape[-1] == width and model.encoder.ln.normalized_shape == (width,)
    assert measure(model, task.input_shape, None, latency=False).flops / dense_cost.flops <= 0.5 + 1e-6
    path = tmp_path / "model.pt"
    save_model(path, model, config, "channel", pruned.history, {}, {})
    x = torch.randn(2, *task.input_shape)
    torch.testing.assert_close(_outputs(load_model(path, config)[0], x), _outputs(model, x), rtol=0, atol=0)
