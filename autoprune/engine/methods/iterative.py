"""Iterative pruning: k rounds of prune-a-little -> fine-tune (Han et al. 2015)."""

from __future__ import annotations

import dataclasses

from ...config import Budget
from ...schema import MAX_STEPS, integer
from ..graph import clone
from ..stages import Pruned
from .base import Method, floors, register, split
from .context import MethodContext


@register
class Iterative(Method):
    """Round i of k keeps the cost fraction budget**(i/k), reaching the budget at round k;
    the fine-tuning epochs are shared out over the rounds (the last gets the remainder).
    Channel groups keep ``max_ratio`` against the dense widths, not round by round; masks
    only grow."""

    name = "iterative"
    summary = "k rounds of prune-a-little -> fine-tune, reaching the budget at round k (Han et al. 2015)."
    options = {"iterations": integer(1, most=MAX_STEPS, optional=True)}  # k, the rounds
    defaults = {"iterations": 3}
    space = {"iterations": [2, 3, 5]}
    in_steps = True

    def run(self, ctx: MethodContext) -> Pruned:
        task, policy, budget = ctx.task, ctx.policy, ctx.budget
        k = self.settings(policy)["iterations"]
        work = clone(ctx.dense)
        ctx.warm_up(work)
        caps = floors(ctx.dense, task, policy) if policy.structure == "channel" else None
        per_epoch = ctx.steps_per_epoch() if policy.finetune.epochs else 0
        sizes, kept, history, epochs = {}, {}, [], []
        for i, n_epochs in enumerate(split(policy.finetune.epochs, k), start=1):
            step_budget = budget if i == k else Budget(budget.kind, budget.fraction ** (i / k), budget.tolerance)
            pruned = ctx.prune(work, step_budget, caps)
            work = pruned.model
            history += pruned.history
            ctx.log(len(epochs) * per_epoch, f"round {i}/{k}", step_budget.fraction, work)
            if i == k:
                ctx.pruned(pruned)
            for g, r in pruned.ratios.items():
                kept[g] = kept.get(g, 1.0) * (1.0 - r)
            sizes = sizes or pruned.sizes
            recipe = dataclasses.replace(policy.finetune, epochs=n_epochs)
            epochs += ctx.train(work, recipe, f"fine-tune {i}/{k}", epoch_offset=len(epochs))
        ratios = pruned.ratios if policy.structure == "unstructured" else {g: 1.0 - v for g, v in kept.items()}
        out = Pruned(
            work,
            policy.structure,
            history,
            ratios,
            pruned.estimate,
            pruned.attempts,
            epochs,
            counts=pruned.counts,
            sizes=sizes,
        )
        return ctx.finish(out)
