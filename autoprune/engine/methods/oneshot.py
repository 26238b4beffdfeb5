"""One-shot pruning: train -> prune once -> fine-tune (Han et al. 2015)."""

from __future__ import annotations

from ..stages import Pruned
from .base import Method, prune_then_train, register
from .context import MethodContext


@register
class OneShot(Method):
    """Prune the trained network once to the budget, then fine-tune it with the policy's
    ``finetune`` recipe."""

    name = "oneshot"
    summary = "Train -> prune once -> fine-tune (Han et al. 2015)."

    def run(self, ctx: MethodContext) -> Pruned:
        return prune_then_train(ctx, ctx.dense, ctx.policy.finetune, "before fine-tuning", "fine-tune")
