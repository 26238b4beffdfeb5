"""The engine's stages on the default task and on hand-built tiny networks."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from autoprune import engine
from autoprune.config import Budget, FinetuneConfig, Policy
from autoprune.engine.criteria import ScoreContext, channel_scores, make_criterion, scored_modules
from autoprune.engine.graph import PrunableGraph
from autoprune.engine.measure import count_params


def fvcore_flops(model, shape):
    """An independent count: fvcore's total, scaled by weight density for masked layers."""
    from fvcore.nn import FlopCountAnalysis

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fca = FlopCountAnalysis(model.eval(), torch.zeros(1, *shape))
        fca.unsupported_ops_warnings(False)
        fca.uncalled_modules_warnings(False)
        total, per = fca.total(), fca.by_module()
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            density = float((m.weight != 0).float().mean())
            total -= per[name] * (1 - density)
    return total


def test_dense_digits_model_reaches_97_percent(digits_dense_metrics):
    assert digits_dense_metrics["test_acc"] >= 0.97


def test_dense_model_is_cached_and_reused(digits_task, digits_dense, engine_cfg):
    messages = []
    again = engine.dense_model(digits_task, engine_cfg, log=messages.append)
    assert messages and "cached" in messages[0]
    for a, b in zip(again.state_dict().values(), digits_dense.state_dict().values()):
        assert torch.equal(a, b)


def test_digits_split_is_fixed_and_disjoint(digits_task):
    sizes = [len(digits_task.train), len(digits_task.val), len(digits_task.test)]
    assert sum(sizes) == 1797


def tiny_net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 3, 3, padding=1),
        nn.BatchNorm2d(3),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(3, 2),
    )


def test_channel_score_sums_filters_and_consumer_slices():
    model = tiny_net()
    graph = PrunableGraph(model, torch.zeros(1, 1, 5, 5))
    scores = make_criterion("magnitude").score(ScoreContext(model, scored_modules(model)))
    got = channel_scores(graph, scores, "sum")
    w0, w3, fc = model[0].weight.detach(), model[3].weight.detach(), model[8].weight.detach()
    expected0 = w0.abs().sum((1, 2, 3)) + w3.abs().sum((0, 2, 3))
    expected3 = w3.abs().sum((1, 2, 3)) + fc.abs().sum(0)
    np.testing.assert_allclose(got["0"], expected0.numpy(), rtol=1e-6)
    np.testing.assert_allclose(got["3"], expected3.numpy(), rtol=1e-6)
    mx = channel_scores(graph, scores, "max")["0"]
    np.testing.assert_allclose(mx, torch.maximum(w0.abs().amax((1, 2, 3)), w3.abs().amax((0, 2, 3))).numpy())
    mean = channel_scores(graph, scores, "mean")["0"]
    np.testing.assert_allclose(mean, expected0.numpy() / (9 + 27), rtol=1e-6)


@pytest.mark.parametrize("scope", ["local", "global"])
@pytest.mark.parametrize("kind", ["flops", "params"])
def test_channel_pruning_meets_budget_on_digits(
    digits_task, digits_dense, digits_dense_metrics, engine_cfg, scope, kind
):
    policy = Policy(scope=scope, finetune=FinetuneConfig(epochs=0))
    result = engine.run(digits_task, digits_dense, policy, Budget(kind, 0.5), engine_cfg, digits_dense_metrics)
    assert 0.49 <= result.pruned[f"{kind}_ratio"] <= 0.5
    if kind == "flops":
        independent = fvcore_flops(result.model, digits_task.input_shape) / digits_dense_metrics["flops"]
        assert independent == pytest.approx(result.pruned["flops_ratio"], rel=1e-9)
    # physically smaller, same output shape
    x = next(iter(digits_task.loader("test")))[0]
    assert result.model(x).shape == digits_dense(x).shape
    assert sum(p.numel() for p in result.model.parameters()) < sum(p.numel() for p in digits_dense.parameters())


def test_unstructured_masks_meet_effective_budget_and_survive_finetuning(
    digits_task, digits_dense, digits_dense_metrics, engine_cfg
):
    policy = Policy(structure="unstructured", finetune=FinetuneConfig(epochs=1))
    result = engine.run(digits_task, digits_dense, policy, Budget("flops", 0.3), engine_cfg, digits_dense_metrics)
    assert 0.29 <= result.pruned["flops_ratio"] <= 0.3
    independent = fvcore_flops(result.model, digits_task.input_shape) / digits_dense_metrics["flops"]
    assert independent == pytest.approx(result.pruned["flops_ratio"], rel=1e-6)
    # every masked weight is still exactly zero after a fine-tuning epoch, and the layer's
    # pruned fraction is what the solver chose
    for name, m in result.model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            zeros = int((m.weight == 0).sum())
            assert zeros == round(result.ratios[name] * m.weight.numel())
            assert not hasattr(m, "weight_mask")  # folded on the way out
    # the dense architecture is kept
    shapes = {k: v.shape for k, v in result.model.state_dict().items()}
    assert shapes == {k: v.shape for k, v in digits_dense.state_dict().items()}


def test_per_layer_ratios_are_scaled_to_the_budget(digits_task, digits_dense, digits_dense_metrics, engine_cfg):
    names = PrunableGraph(copy.deepcopy(digits_dense), digits_task.example_input()).group_names()
    ratios = {n: (0.8 if i % 2 else 0.2) for i, n in enumerate(names)}
    policy = Policy(scope="per_layer", ratios=ratios, finetune=FinetuneConfig(epochs=0))
    result = engine.run(digits_task, digits_dense, policy, Budget("flops", 0.6), engine_cfg, digits_dense_metrics)
    assert 0.59 <= result.pruned["flops_ratio"] <= 0.6
    odd = np.mean([result.ratios[n] for i, n in enumerate(names) if i % 2])
    even = np.mean([result.ratios[n] for i, n in enumerate(names) if not i % 2])
    assert odd > even


def test_random_criterion_is_seeded(digits_dense):
    mods = scored_modules(digits_dense)
    a = make_criterion("random").score(ScoreContext(digits_dense, mods, seed=1))
    b = make_criterion("random").score(ScoreContext(digits_dense, mods, seed=1))
    c = make_criterion("random").score(ScoreContext(digits_dense, mods, seed=2))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    for k, m in mods.items():
        assert a[k].shape == m.weight.shape


def test_magnitude_l2_variant_squares(digits_dense):
    mods = scored_modules(digits_dense)
    s = make_criterion("magnitude", {"p": 2}).score(ScoreContext(digits_dense, mods))
    k = next(iter(mods))
    torch.testing.assert_close(s[k], mods[k].weight.detach() ** 2)


def test_diverging_finetune_is_reported(digits_task, digits_dense):
    model = copy.deepcopy(digits_dense)
    with pytest.raises(engine.TrainingDiverged, match="loss became"):
        engine.train(
            model, digits_task, FinetuneConfig(epochs=1, lr=1e6), 0, torch.device("cpu")
        )  # the most --lr allows


def test_saved_model_replays_exactly(tmp_path, digits_task, digits_dense, digits_dense_metrics, engine_cfg):
    from autoprune.engine.checkpoint import load_model, save_model

    policy = Policy(finetune=FinetuneConfig(epochs=1))
    result = engine.run(digits_task, digits_dense, policy, Budget("flops", 0.4), engine_cfg, digits_dense_metrics)
    save_model(tmp_path / "m.pt", result.model, engine_cfg.task, "channel", result.history, policy.to_dict(), {})
    blob = torch.load(tmp_path / "m.pt", weights_only=True)  # plain data only
    assert blob["history"] == result.history
    model, task, _ = load_model(tmp_path / "m.pt")
    x = next(iter(digits_task.loader("test")))[0]
    torch.testing.assert_close(model(x), result.model.eval()(x), rtol=0, atol=0)
    assert count_params(model) == result.pruned["params"]
