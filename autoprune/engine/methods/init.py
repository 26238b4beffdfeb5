"""Pruning at initialisation (SNIP, GraSP, SynFlow, Fisher, Hutchinson), then training from
scratch."""

from __future__ import annotations

import dataclasses

from ..stages import Pruned
from ..train import seed_everything
from .base import Method, prune_then_train, register
from .context import MethodContext


@register
class Init(Method):
    """Prune the untrained network (seeded), then train it from scratch with the dense
    model's recipe (``train_epochs`` epochs at ``task.train_lr``, cosine). Masks hold
    throughout training."""

    name = "init"
    family = "at initialisation"
    summary = "Pruning at initialisation (SNIP, GraSP, SynFlow, Fisher, Hutchinson), then training from scratch."

    def run(self, ctx: MethodContext) -> Pruned:
        task, policy, cfg = ctx.task, ctx.policy, ctx.cfg
        seed_everything(cfg.seed)
        fresh = task.model_factory().to(ctx.device).eval()
        epochs = task.train_epochs if cfg.train_epochs is None else cfg.train_epochs
        recipe = dataclasses.replace(policy.finetune, epochs=epochs, lr=task.train_lr, schedule="cosine")
        return prune_then_train(ctx, fresh, recipe, "at initialisation", "train from scratch")
