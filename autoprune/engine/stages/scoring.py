"""Criterion scores for one pruning step, and scores that keep already-zeroed weights lowest."""

from __future__ import annotations

import torch
from torch import nn

from ...config import Policy
from ...errors import AutopruneError
from .. import criteria as crit
from ..graph import PRUNABLE_TYPES, clone
from ..prune import fold_masks


def score(
    model: nn.Module,
    policy: Policy,
    data,
    seed: int,
    example: torch.Tensor | None = None,
    density: float | None = None,
    loss=None,
    predict=None,
) -> crit.Scores:
    """Per-weight scores of the conv/linear layers (and, for some criteria, norm layers) by
    the policy's criterion. A model carrying weight masks is scored as a folded copy."""
    criterion = crit.make_criterion(policy.criterion, policy.criterion_options)
    if criterion.needs_data and not data:
        raise AutopruneError(f"criterion {policy.criterion!r} needs scoring data")
    if any(hasattr(m, "weight_mask") for m in model.modules()):
        model = clone(model)
        fold_masks(model)
    was_training = model.training
    model.eval()
    ctx = crit.ScoreContext(
        model=model,
        modules=crit.scored_modules(model),
        data=data if criterion.needs_data else None,
        seed=seed,
        structure=policy.structure,
        example=example,
        density=density,
        loss=loss,
        predict=predict,
    )
    try:
        scores = criterion.score(ctx)
    finally:
        model.train(was_training)
    for name, s in scores.items():
        if not torch.isfinite(s).all():
            raise AutopruneError(
                f"criterion {policy.criterion!r} gave non-finite scores for {name}; the model may have "
                "diverged, or the criterion's options overflow"
            )
    return scores


def below_zeros(model: nn.Module, scores: crit.Scores) -> crit.Scores:
    """Scores with already-zero weights set to -inf, so masks only ever grow."""
    out = dict(scores)
    for n, m in model.named_modules():
        if n in scores and isinstance(m, PRUNABLE_TYPES):
            out[n] = torch.where(m.weight.detach().cpu() == 0, -torch.inf, scores[n].double())
    return out
