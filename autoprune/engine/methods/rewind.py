"""Learning-rate rewinding: prune once, retrain with the dense schedule (Renda et al. 2020)."""

from __future__ import annotations

import dataclasses

from ..stages import Pruned
from .base import Method, prune_then_train, register
from .context import MethodContext


@register
class Rewind(Method):
    """Prune once, then retrain with the dense model's original learning-rate schedule
    (peak ``task.train_lr``, cosine) replayed over the retraining epochs, instead of the
    small fine-tuning rate."""

    name = "rewind"
    family = "rewinding"
    summary = (
        "Prune once, then retrain with the dense model's learning-rate schedule "
        "(peak train lr, cosine): learning-rate rewinding (Renda et al. 2020)."
    )

    def run(self, ctx: MethodContext) -> Pruned:
        recipe = dataclasses.replace(ctx.policy.finetune, lr=ctx.task.train_lr, schedule="cosine")
        return prune_then_train(ctx, ctx.dense, recipe, "before retraining", "retrain (rewound lr)")
