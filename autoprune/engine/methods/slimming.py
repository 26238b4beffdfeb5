"""Network slimming: an L1 penalty on the batch-norm scales while training, then prune and
recover (Liu et al. 2017). Also the schedule the penalty family shares (``group_lasso``).

The schedule, all inside the policy's fine-tuning epochs (matched compute): train with the
penalty for the first ``sparsify`` share of the steps; at that step prune to the budget by the
policy's criterion, the pruned channels going into a :class:`~autoprune.engine.hooks.ChannelMask`
that holds them at zero from then on (the penalty stops) and the batch norms' running
statistics restarting (:class:`FreshStatistics`); the remaining steps recover; at the end the
masked channels are removed physically. Without fine-tuning it prunes at once, unpenalised.

How far the penalty pushed the scores apart is written into the prune event: ``below`` (at the
prune step) and ``below_before`` (before the first penalised step) are the share of the
penalised magnitudes under ``BELOW`` (5%) of the largest in their layer (slimming: |gamma| of
each batch norm) or group (group lasso: a group's channel norms); ``mean`` and ``mean_before``
are their mean. The share is relative to the layer's largest because where another batch norm
follows, a scale common to a layer's gammas matters little; 5% rather than less because SGD
with momentum on a subgradient leaves a scale driven to zero oscillating around it, not at it.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ...errors import AutopruneError
from ...schema import number
from ..graph import NORM_TYPES, Group, PrunableGraph, clone
from ..hooks import ChannelMask, TrainHook
from ..stages import Pruned, kept_layers
from .base import Method, pruned_at_once, register
from .context import MethodContext

BELOW = 0.05  # a magnitude under this share of its layer's (group's) largest counts as pushed to zero


class Penalty:
    """A sparsity penalty on the prunable channel groups of a model: :meth:`add_gradient` adds
    ``lam`` times its (sub)gradient to the parameters' ``.grad``; :meth:`magnitudes` are the
    non-negative values it drives toward zero, one tensor per layer or group."""

    def __init__(self, model, groups: list[Group]) -> None:
        self.model, self.groups = model, groups

    def add_gradient(self, lam: float) -> None:
        raise NotImplementedError

    def magnitudes(self) -> list[torch.Tensor]:
        raise NotImplementedError


class BNScales(Penalty):
    """lam * sum |gamma| over the batch norms whose channels belong to the groups (their
    ``out`` slices): the subgradient lam * sign(gamma) is added to gamma's gradient."""

    def __init__(self, model, groups: list[Group]) -> None:
        super().__init__(model, groups)
        self.norms: dict[str, torch.Tensor] = {}  # batch-norm name -> the channel indices penalised
        for group in groups:
            for item in group.items:
                module = model.get_submodule(item.module)
                if item.dim == "out" and isinstance(module, NORM_TYPES) and module.weight is not None:
                    idx = torch.as_tensor(item.idxs, dtype=torch.long, device=module.weight.device)
                    known = self.norms.get(item.module)
                    self.norms[item.module] = idx if known is None else torch.unique(torch.cat([known, idx]))
        if not self.norms:
            raise AutopruneError(
                "method 'slimming' penalises batch-norm scales, and no prunable channel group of this model has a "
                "batch norm; use --method group_lasso"
            )

    def add_gradient(self, lam: float) -> None:
        with torch.no_grad():
            for name, idx in self.norms.items():
                gamma = self.model.get_submodule(name).weight
                if gamma.grad is not None:
                    gamma.grad.index_add_(0, idx, lam * torch.sign(gamma[idx]))

    def magnitudes(self) -> list[torch.Tensor]:
        with torch.no_grad():
            return [self.model.get_submodule(n).weight[idx].abs() for n, idx in self.norms.items()]


def spread(magnitudes: list[torch.Tensor]) -> tuple[float, float]:
    """The share of ``magnitudes`` under ``BELOW`` times the largest of their own tensor, and
    their mean."""
    below = sum(int((m < BELOW * m.max()).sum()) for m in magnitudes if m.numel())
    total = sum(m.numel() for m in magnitudes)
    mean = sum(float(m.double().sum()) for m in magnitudes) / max(total, 1)
    return below / max(total, 1), mean


def prune_step(total: int, share: float) -> int:
    """The training step at which a penalty method prunes: the ``share`` of ``total`` steps
    spent sparsifying, at least one; ``total`` means after the last step."""
    return min(total, max(1, round(share * total)))


class FreshStatistics(TrainHook):
    """Batch-norm running statistics that restart when the network is pruned: those gathered on
    the dense network no longer describe the pruned one, and with a layer's momentum m they
    would take many steps to fade. From :meth:`start` each layer's statistics are the plain
    average of the training batches seen since, for ceil(1 / m) steps, after which its momentum
    returns (:meth:`stop`, which the method also calls when training ends)."""

    def __init__(self, model) -> None:
        self.norms = [m for m in model.modules() if isinstance(m, NORM_TYPES) and m.track_running_stats]
        self.saved: dict[nn.Module, tuple[float, int]] = {}  # layer -> (its momentum, the step it returns)

    def start(self, step: int) -> None:
        for m in self.norms:
            m.reset_running_stats()
            if m.momentum is not None:  # None: the layer averages all its batches already
                self.saved[m] = (m.momentum, step + math.ceil(1 / m.momentum))
                m.momentum = None

    def on_step_start(self, step: int, total: int) -> None:
        for m, (momentum, until) in list(self.saved.items()):
            if step >= until:
                m.momentum = momentum
                del self.saved[m]

    def stop(self) -> None:
        for m, (momentum, _) in self.saved.items():
            m.momentum = momentum
        self.saved.clear()


class PenaltySchedule(TrainHook):
    """Adds the penalty's gradient after every backward pass until step ``at``, where it prunes
    the live network to the budget into ``mask`` (which holds the pruned channels at zero from
    then on) and logs the step with how far the penalty pushed the magnitudes apart."""

    def __init__(self, ctx: MethodContext, work, mask: ChannelMask, penalty: Penalty, lam: float, at: int) -> None:
        self.ctx, self.work, self.mask, self.penalty, self.lam, self.at = ctx, work, mask, penalty, lam, at
        self.before = spread(penalty.magnitudes())
        self.pruned: Pruned | None = None
        self.restat = FreshStatistics(work)

    def on_step_start(self, step: int, total: int) -> None:
        if step == self.at:
            self.prune(step)

    def after_backward(self, step: int, total: int) -> None:
        if self.pruned is None and self.lam > 0:
            self.penalty.add_gradient(self.lam)

    def prune(self, step: int, training: bool = True) -> None:
        """Prune at ``step``; ``training``: steps follow (else training is over)."""
        ctx = self.ctx
        below, mean = spread(self.penalty.magnitudes())
        pruned = ctx.prune(self.work, ctx.budget)
        self.mask.grow(pruned.plan)  # the mask is empty: the copy's numbering is the dense one
        ctx.log(step, "after sparsifying", ctx.budget.fraction, pruned.model)
        ctx.events[-1].update(below=below, below_before=self.before[0], mean=mean, mean_before=self.before[1])
        self.pruned = pruned
        ctx.pruned(pruned)
        batches = ctx.policy.finetune.bn_recalibrate
        if batches:  # ctx.pruned recalibrated the copy; the network that trains on is the masked one
            ctx.recalibrate(self.work, batches)
        elif training:
            self.restat.start(step)


class PenaltyMethod(Method):
    """Sparsify with a penalty, prune to the budget, recover (the schedule above). Subclasses
    set ``penalty_type`` to the :class:`Penalty` they add."""

    family = "penalty"
    structures = ("channel",)
    options = {
        "penalty": number(0.0, optional=True, most=1e6),  # lambda
        "sparsify": number(0.0, 1.0, low_open=True, high_open=True, optional=True),  # share of the steps
    }
    space = {"penalty": [1e-3, 1e-2, 1e-1], "sparsify": [0.25, 0.5, 0.75]}
    penalty_type: type[Penalty]

    def run(self, ctx: MethodContext) -> Pruned:
        task, policy = ctx.task, ctx.policy
        opts = self.settings(policy)
        if policy.finetune.epochs == 0:
            return pruned_at_once(ctx)
        work = clone(ctx.dense)
        ctx.warm_up(work)
        example = task.example_input().to(ctx.device)
        mask = ChannelMask(PrunableGraph(work, example, embedding=policy.embedding))
        kept = kept_layers(work, policy, example)
        groups = [g for g in mask.graph.groups if not any(it.module in kept for it in g.items)]
        penalty = self.penalty_type(work, groups)
        total = policy.finetune.epochs * ctx.steps_per_epoch()
        schedule = PenaltySchedule(ctx, work, mask, penalty, opts["penalty"], prune_step(total, opts["sparsify"]))
        epochs = ctx.train(work, policy.finetune, f"fine-tune ({self.name})", hooks=[schedule, mask, schedule.restat])
        if schedule.pruned is None:  # the prune step falls after the last batch
            schedule.prune(total, training=False)
        schedule.restat.stop()
        mask.apply()
        model, history = mask.pruned_copy(example)
        sizes, plan, first = mask.sizes, mask.plan, schedule.pruned
        ratios = {g: len(plan[g]) / sizes[g] for g in sizes}
        out = Pruned(model, "channel", history, ratios, first.estimate, first.attempts, epochs, plan=plan, sizes=sizes)
        return ctx.finish(out)


@register
class Slimming(PenaltyMethod):
    """Network slimming: lam * sum |gamma| on the batch-norm scales of the prunable groups while
    sparsifying (:class:`BNScales`), then prune and recover. The paper prunes by |gamma|, the
    ``bn_scale`` criterion (``--criterion bn_scale``); any channel criterion works."""

    name = "slimming"
    summary = (
        "L1 penalty on batch-norm scales while training, then prune and recover: network slimming (Liu et al. 2017)."
    )
    defaults = {"penalty": 1e-2, "sparsify": 0.5}
    penalty_type = BNScales
