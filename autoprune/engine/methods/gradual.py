"""Gradual pruning during fine-tuning on the cubic schedule (Zhu & Gupta 2017; Gale et al. 2019)."""

from __future__ import annotations

from ...config import Budget
from ...errors import AutopruneError
from ...schema import MAX_STEPS, integer
from ..graph import PrunableGraph, clone
from ..hooks import ChannelMask, TrainHook
from ..prune import mask_weights
from ..stages import Pruned, below_zeros, solve_unstructured
from .base import Method, floors, prune_then_train, register
from .context import MethodContext

GRADUAL_END = 0.75  # gradual pruning reaches the budget after this share of fine-tuning steps


def cubic_fraction(step: int, end: int, budget: float) -> float:
    """Kept cost fraction at ``step`` on the cubic schedule of Zhu & Gupta: the pruned
    fraction s_t = s_f * (1 - (1 - t/T)**3), s_f = 1 - budget, T = ``end``."""
    t = min(step, end) / end
    return 1.0 - (1.0 - budget) * (1.0 - (1.0 - t) ** 3)


def gradual_steps(total: int, n: int) -> list[int]:
    """The training steps at which gradual pruning prunes: ``n`` evenly spaced steps up to
    ``GRADUAL_END`` of ``total``, the last one reaching the budget."""
    end = max(1, int(round(GRADUAL_END * total)))
    return sorted({max(1, int(round(i * end / n))) for i in range(1, n + 1)})


class CubicSchedule(TrainHook):
    """Prunes the live network at the schedule's steps, each time re-scoring it and pruning
    to the cubic schedule's cost fraction. Channels go into a :class:`ChannelMask` (zeroed,
    removed at the end); weights are masked (torch's pruning reparametrisation, which holds
    them at zero), the masks only growing."""

    def __init__(self, ctx: MethodContext, work, steps: list[int], mask: ChannelMask | None) -> None:
        self.ctx, self.work, self.steps, self.mask = ctx, work, steps, mask
        self.end, self.at = steps[-1], set(steps)
        self.example = ctx.task.example_input().to(ctx.device)
        self.floors = floors(ctx.dense, ctx.task, ctx.policy) if mask is not None else None
        self.fraction = self.estimate = None
        self.counts: dict[str, int] = {}

    @property
    def done(self) -> bool:
        return len(self.ctx.events) >= len(self.steps)

    def on_step_start(self, step: int, total: int) -> None:
        if step in self.at:
            self.prune_step(step)

    def prune_step(self, step: int) -> None:
        ctx, budget = self.ctx, self.ctx.budget
        fraction = budget.fraction if step == self.end else cubic_fraction(step, self.end, budget.fraction)
        step_budget = budget if step == self.end else Budget(budget.kind, fraction, budget.tolerance)
        if self.mask is not None:
            current, _ = self.mask.pruned_copy(self.example)
            pruned = ctx.prune(current, step_budget, self.floors)
            appeared = [g for g in pruned.plan if g not in self.mask.sizes]
            if appeared:
                raise AutopruneError(
                    f"gradual pruning: group {appeared[0]!r} appeared after pruning; use --method iterative"
                )
            self.mask.grow(pruned.plan)
            reached_model = pruned.model
        else:
            work = self.work
            scores = ctx.score(work, fraction)
            counts, self.estimate = solve_unstructured(work, ctx.task, ctx.policy, step_budget, scores, ctx.dense_cost)
            zeros = {n: int((m.weight == 0).sum()) for n, m in work.named_modules() if n in counts}
            self.counts = {n: max(k, zeros[n]) for n, k in counts.items()}
            mask_weights(work, self.counts, below_zeros(work, scores))
            reached_model = work
        self.fraction = fraction
        ctx.log(step, f"step {len(ctx.events) + 1}/{len(self.steps)}", fraction, reached_model)


@register
class Gradual(Method):
    """``iterations`` pruning steps spread over the first ``GRADUAL_END`` of the fine-tuning
    steps (:class:`CubicSchedule`); the rest of fine-tuning recovers. Channels are zeroed
    while training (held at zero before every step by a :class:`ChannelMask`) and physically
    removed at the end; weights are masked. Without fine-tuning it prunes at once."""

    name = "gradual"
    family = "gradual"
    summary = "Prune during fine-tuning on the cubic schedule (Zhu & Gupta 2017; Gale et al. 2019)."
    options = {"iterations": integer(1, most=MAX_STEPS, optional=True)}  # pruning steps
    defaults = {"iterations": 10}
    space = {"iterations": [5, 10, 20]}
    in_steps = True

    def run(self, ctx: MethodContext) -> Pruned:
        task, policy = ctx.task, ctx.policy
        n = self.settings(policy)["iterations"]
        work = clone(ctx.dense)
        ctx.warm_up(work)
        if policy.finetune.epochs == 0:
            return prune_then_train(ctx, work, policy.finetune, "no fine-tuning: pruned at once", "fine-tune")
        per_epoch = ctx.steps_per_epoch()
        steps = gradual_steps(policy.finetune.epochs * per_epoch, n)
        mask = None
        if policy.structure == "channel":
            example = task.example_input().to(ctx.device)
            mask = ChannelMask(PrunableGraph(work, example, embedding=policy.embedding))
        schedule = CubicSchedule(ctx, work, steps, mask)
        hooks = [schedule] if mask is None else [schedule, mask]
        epochs = ctx.train(work, policy.finetune, "fine-tune (gradual)", hooks=hooks)
        if not schedule.done:  # the last step falls after the final batch
            schedule.prune_step(schedule.end)
        if mask is not None:
            mask.apply()
            model, history = mask.pruned_copy(schedule.example)
            sizes = mask.sizes
            ratios = {g: len(mask.plan[g]) / sizes[g] for g in sizes}
            out = Pruned(model, "channel", history, ratios, schedule.fraction, 1, epochs, plan=mask.plan, sizes=sizes)
        else:
            counts = schedule.counts
            sizes = {n: m.weight.numel() for n, m in work.named_modules() if n in counts}
            ratios = {n: k / sizes[n] for n, k in counts.items()}
            out = Pruned(work, "unstructured", [], ratios, schedule.estimate, 1, epochs, counts=counts, sizes=sizes)
        return ctx.finish(out)
