"""Weight masks: the lowest-scored weights go, masks hold through training, folding makes them
permanent."""

from __future__ import annotations

import torch
from torch import nn

from autoprune.engine.prune import current_masks, fold_masks, mask_weights


def test_the_lowest_scored_weights_are_masked_ties_broken_by_position():
    layer = nn.Linear(4, 2)
    model = nn.Sequential(layer)
    scores = {"0": torch.tensor([[5.0, 1.0, 3.0, 1.0], [0.5, 9.0, 2.0, 8.0]])}
    mask_weights(model, {"0": 3}, scores)
    expected = torch.tensor([[1.0, 0.0, 1.0, 0.0], [0.0, 1.0, 1.0, 1.0]])
    torch.testing.assert_close(current_masks(model)["0"], expected)
    assert torch.equal(layer.weight == 0, expected == 0)


def test_masks_hold_through_an_optimiser_step_and_fold_into_plain_zeros():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 3))
    mask_weights(model, {"0": 9}, {"0": torch.rand(3, 6)})
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model(torch.randn(8, 6)).pow(2).sum().backward()
    opt.step()
    assert int((model[0].weight == 0).sum()) == 9
    fold_masks(model)
    assert not current_masks(model) and not hasattr(model[0], "weight_orig")
    assert isinstance(model[0].weight, nn.Parameter) and int((model[0].weight == 0).sum()) == 9


def test_zero_count_keeps_every_weight():
    model = nn.Sequential(nn.Conv2d(1, 2, 3))
    before = model[0].weight.detach().clone()
    mask_weights(model, {"0": 0}, {"0": torch.rand(2, 1, 3, 3)})
    torch.testing.assert_close(model[0].weight, before)
