"""Soft filter pruning: zero filters while fine-tuning, let them grow back, re-choose (He et al. 2018)."""

from __future__ import annotations

import numpy as np
import torch

from ...schema import MAX_EPOCHS, integer, number
from ..graph import PRUNABLE_TYPES, PrunableGraph, clone
from ..hooks import ChannelMask, TrainHook
from ..stages import Pruned
from .base import Method, floors, register
from .context import MethodContext

RECALIBRATE = 50  # training batches the BN statistics are recomputed on after the final removal


def zero_filters(graph: PrunableGraph, plan: dict[str, np.ndarray]) -> None:
    """Zero the filters (weights and biases of the conv and linear layers) that produce the
    channels ``plan`` names (dense indices per group). Normalisation layers are left as
    they are, as He et al. do: a zero norm scale would hold the channel's gradient at zero
    (its normalised input is then zero for every sample), so the filter could never grow
    back. The filters stay trainable: nothing holds them at zero afterwards."""
    with torch.no_grad():
        for group in graph.groups:
            idxs = plan.get(group.name)
            if idxs is None or len(idxs) == 0:
                continue
            for item in group.items:
                module = graph.model.get_submodule(item.module)
                if item.dim != "out" or not isinstance(module, PRUNABLE_TYPES):
                    continue
                sel = torch.as_tensor(item.idxs[np.isin(item.root_idxs, idxs)], dtype=torch.long)
                for p in (module.weight, module.bias):
                    if p is not None:
                        p[sel.to(p.device)] = 0.0


class SoftPrune(TrainHook):
    """Soft-prunes the live full-width network ``work`` at step 0 and after every
    ``interval`` epochs, before its last ``recover`` epochs: scores it, solves the budget and
    zeroes the chosen filters (:func:`zero_filters`). Each prune chooses from scratch;
    ``plans`` keeps every plan chosen (dense indices). Before the last ``recover`` epochs the
    final prune at the budget chooses the channels to remove and a :class:`ChannelMask` holds
    them at zero (filters and norm layers) while those epochs recover; :meth:`final` removes
    them (without recovery epochs, :meth:`final` chooses them after the last epoch)."""

    def __init__(self, ctx: MethodContext, work, epochs: int, interval: int, recover: int = 0) -> None:
        self.ctx, self.work, self.interval, self.epochs = ctx, work, interval, epochs
        self.recover = min(recover, max(epochs - 1, 0))
        self.soft_until = epochs - self.recover  # soft prunes come before this many epochs are done
        self.example = ctx.task.example_input().to(ctx.device)
        self.graph = PrunableGraph(work, self.example, embedding=ctx.policy.embedding)
        self.floors = floors(ctx.dense, ctx.task, ctx.policy)
        self.per_epoch = ctx.steps_per_epoch() if epochs else 0
        self.total = 1 + len(range(interval, self.soft_until, interval)) + (1 if epochs else 0)
        self.plans: list[dict[str, np.ndarray]] = []
        self.mask: ChannelMask | None = None
        self.held: Pruned | None = None

    def choose(self, step: int) -> Pruned:
        """Score the live network, solve the budget on a full-width copy (its plan indexes
        dense channels) and log it."""
        pruned = self.ctx.prune(clone(self.work), self.ctx.budget, self.floors)
        self.plans.append(pruned.plan)
        self.ctx.log(step, f"soft prune {len(self.plans)}/{self.total}", self.ctx.budget.fraction, pruned.model)
        return pruned

    def soft(self, step: int) -> None:
        ctx = self.ctx
        verify, ctx.verify_latency = ctx.verify_latency, False  # a latency budget is timed at the final prune only
        try:
            pruned = self.choose(step)
        finally:
            ctx.verify_latency = verify
        zero_filters(self.graph, pruned.plan)

    def on_step_start(self, step: int, total: int) -> None:
        if self.mask is not None:
            self.mask.apply()

    def on_epoch_end(self, epoch: int, metrics: dict[str, float]) -> None:
        done = epoch + 1
        if self.recover and done == self.soft_until:
            self.held = self.choose(done * self.per_epoch)
            self.mask = ChannelMask(self.graph)
            self.mask.set(self.held.plan)
        elif done % self.interval == 0 and done < self.soft_until:
            self.soft(done * self.per_epoch)

    def final(self) -> Pruned:
        """The channels of the last prune, at the budget, removed physically."""
        if self.mask is None:
            return self.choose(self.epochs * self.per_epoch)
        self.mask.apply()
        self.held.model, self.held.history = self.mask.pruned_copy(self.example)
        return self.held


@register
class Sfp(Method):
    """Soft filter pruning: a full-width copy of the dense model is fine-tuned with its
    lowest-scored filters zeroed at the start and after every ``interval`` epochs, each
    time chosen anew at the budget; zeroed filters keep training and may grow back.
    Before the last ``recover`` share of the epochs (default half, rounded, at most all but
    the first) a final prune at the budget chooses the channels to remove, which are held at
    zero (filters and norm layers) while those epochs recover, then removed physically. He
    et al. remove after the last epoch with no recovery (``recover`` 0): in a short
    fine-tuning run the regrown channels carry what the rest of the network has come to use,
    and removing them costs accuracy (on digits at 30% of the FLOPs and 6 epochs, test
    accuracy 0.83 with one recovery epoch, 0.95-0.96 with three). With ``recover`` 0 the BN statistics are recomputed after the removal on
    ``RECALIBRATE`` training batches (forward passes only; the policy's
    ``finetune.bn_recalibrate`` instead when set). Without fine-tuning it prunes once."""

    name = "sfp"
    family = "soft pruning"
    summary = (
        "Soft filter pruning: zero filters while fine-tuning, let them regrow, remove at the end (He et al. 2018)."
    )
    structures = ("channel",)
    options = {
        "interval": integer(1, most=MAX_EPOCHS, optional=True),  # fine-tuning epochs between soft prunes
        "recover": number(0.0, 1.0, high_open=True, optional=True),  # share of the epochs, the choice held
    }
    defaults = {"interval": 1, "recover": 0.5}
    space = {"interval": [1, 2], "recover": [0.25, 0.5]}

    def run(self, ctx: MethodContext) -> Pruned:
        settings = self.settings(ctx.policy)
        epochs = ctx.policy.finetune.epochs
        work = clone(ctx.dense)
        ctx.warm_up(work)
        soft = SoftPrune(ctx, work, epochs, settings["interval"], int(round(settings["recover"] * epochs)))
        history = []
        if epochs:
            soft.soft(0)
            history = ctx.train(work, ctx.policy.finetune, "fine-tune (soft pruning)", hooks=[soft])
        pruned = soft.final()
        if epochs and not soft.recover and not ctx.policy.finetune.bn_recalibrate:
            ctx.recalibrate(pruned.model, RECALIBRATE)
        ctx.pruned(pruned)
        pruned.epochs = history
        return ctx.finish(pruned)
