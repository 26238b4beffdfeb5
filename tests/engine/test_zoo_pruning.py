"""Model-zoo coverage: one small model of every timm family the coverage table lists, and
HuggingFace transformers' ViT, ResNet and ConvNeXt built from small configs, untrained, their
attention in prunable form (``prunable_form``). Channel pruning (global scope, magnitude) to
0.5 FLOPs meets the budget, keeps the output shape, removes whole heads of every transformer,
and the history replayed on a fresh model gives bit-identical outputs; or the model is
refused with its reason.

Kept fast (no training, one graph per model, inputs as small as the models take, one
thread): the graph, the solver and the removal are called directly, as ``prune_to_budget``'s
first round does.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from autoprune import engine
from autoprune.config import Budget, Policy
from autoprune.engine.attention import ATTENTION_TYPES, prunable_form
from autoprune.engine.graph import PrunableGraph, clone, replay_history
from autoprune.engine.measure import measure
from autoprune.engine.solver import solve_channels
from autoprune.errors import AutopruneError

timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")

SIZED = {"img_size": 32}  # models whose position embedding or token count is fixed at build time
# timm model -> (build keywords, None (prunes) or a part of its refusal)
TIMM = {
    "convnext_atto": ({}, None),
    "efficientnet_b0": ({}, None),
    "tf_efficientnetv2_b0": ({}, None),
    "mobilenetv3_large_100": ({}, None),
    "regnetx_002": ({}, None),
    "resnest14d": ({}, None),
    "resnet26d": ({}, None),
    "ghostnet_100": ({}, None),
    "deit_tiny_patch16_224": (SIZED, None),
    "vit_tiny_patch16_224": (SIZED, None),
    "mobilevit_xxs": ({}, None),
    "cspdarknet53": ({}, None),
    "cspresnet50": ({}, None),
    "edgenext_xx_small": ({}, None),
    "mixer_s16_224": (SIZED, None),
    "poolformer_s12": ({}, None),
    "levit_128s": (SIZED, "'stages.0.blocks.0.attn' (Attention): its heads interleave their queries, keys and values"),
    "coatnet_nano_rw_224": (SIZED, "'stages.2.blocks.0.attn' (Attention2d): its heads interleave their queries"),
}
TRANSFORMERS = {"deit_tiny_patch16_224", "vit_tiny_patch16_224", "mobilevit_xxs", "edgenext_xx_small", "hf_vit"}


def _hf(name: str) -> nn.Module:
    t = transformers
    if name == "hf_vit":
        config = t.ViTConfig(
            image_size=32,
            patch_size=8,
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=128,
            num_labels=3,
        )
        return t.ViTForImageClassification(config)
    if name == "hf_resnet":
        config = t.ResNetConfig(
            embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], layer_type="basic", num_labels=3
        )
        return t.ResNetForImageClassification(config)
    config = t.ConvNextConfig(num_stages=2, hidden_sizes=[16, 32], depths=[1, 1], num_labels=3)
    return t.ConvNextForImageClassification(config)


def build(name: str) -> nn.Module:
    """The untrained model, seeded, in prunable form, in eval mode."""
    torch.manual_seed(0)
    if name.startswith("hf_"):
        model = _hf(name)
    else:
        model = timm.create_model(name, pretrained=False, num_classes=3, **TIMM[name][0])
    return prunable_form(model).eval()


def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model.eval()(x)
    return out if isinstance(out, torch.Tensor) else out.logits  # HuggingFace: a ModelOutput


def heads(model: nn.Module) -> list[tuple[int, int]]:
    """(heads, head size) of every head-prunable attention module."""
    return [(m.num_heads, m.head_dim) for m in model.modules() if isinstance(m, ATTENTION_TYPES)]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: on these tiny inputs, more threads cost more than they save (the
    file ran about 2.5 times faster on 2 cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


CASES = [*TIMM, "hf_vit", "hf_resnet", "hf_convnext"]
EXAMPLE = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name", CASES)
def test_a_zoo_model_prunes_to_half_its_flops_by_channels_and_heads_or_is_refused_clearly(name):
    dense = build(name)
    refusal = TIMM.get(name, ({}, None))[1]
    model = clone(dense)
    if refusal is not None:
        with pytest.raises(AutopruneError) as refused:
            PrunableGraph(model, EXAMPLE)
        message = str(refused.value)
        assert refusal in message and "--keep" in message and "--structure unstructured" in message, message
        return
    policy = Policy(structure="channel", criterion="magnitude", scope="global")
    budget = Budget("flops", 0.5)
    graph = PrunableGraph(model, EXAMPLE)
    names, sizes, channel, costs = engine.channel_problem(
        model, EXAMPLE, policy, engine.score(dense, policy, None, seed=0), graph
    )
    plan = solve_channels(names, sizes, channel, policy, budget, costs.cost, (costs.total_flops, costs.total_params))
    graph.prune(plan.indices())

    # fvcore's count of the pruned model against the dense one's (the cost model's, counted alike)
    ratio = measure(model, (3, 32, 32), None, latency=False).flops / costs.total_flops
    assert 0.4 < ratio <= 0.5 + 1e-6, (ratio, plan.fraction)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    out = logits(model, x)
    assert out.shape == logits(dense, x).shape == (2, 3) and torch.isfinite(out).all()
    if name in TRANSFORMERS:  # whole heads went, and the attention left is in prunable form
        before, after = heads(dense), heads(model)
        assert len(after) == len(before) > 0 and sum(h for h, _ in after) < sum(h for h, _ in before)
        assert [d for _, d in after] == [d for _, d in before]
    else:
        assert heads(dense) == []
    fresh = replay_history(build(name), EXAMPLE, graph.history())
    fresh.load_state_dict(model.state_dict())  # strict: every key and shape fits
    torch.testing.assert_close(logits(fresh, x), out, rtol=0, atol=0)
