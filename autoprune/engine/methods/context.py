"""What every method works with: :class:`MethodContext`, the task, the models, the policy and
budget, and the stages a method is built from (warm-up, score, prune to a budget, train with
hooks, log a pruning step). Every method logs its pruning steps in ``Pruned.events``
(training step, target and reached cost fraction), so schedules can be checked.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from ...config import Budget, EngineConfig, FinetuneConfig, Policy
from ...errors import AutopruneError
from ..criteria import make_criterion
from ..hooks import TrainHook
from ..latency import LatencyTable
from ..measure import Cost, measure, speedup
from ..stages import Pruned, bn_warmup, bn_warmup_train, prune_to_budget, score, scoring_batches, warmup_on
from ..tasks import Task
from ..train import EpochCallback, train

LATENCY_CHECKS = 5  # timings of a latency-budget model (and re-solves in between) before one is taken
LATENCY_UNDER = 0.05  # a measured latency this share of the budget below it (beyond the noise) is re-solved too


PrunedCallback = Callable[[nn.Module, dict[str, float]], None]  # (pruned model, pruned fraction per group)


@dataclass
class MethodContext:
    """What every method gets: the task, the dense model, the policy and budget, the engine
    settings, the dense cost the budget is a fraction of, the device and two callbacks:
    ``on_epoch`` after every fine-tuning epoch and ``on_pruned`` once the model has reached
    its final structure (before the fine-tuning that follows; gradual pruning reaches it only
    at the end). The helpers below are the stages every method is built from."""

    task: Task
    dense: nn.Module
    policy: Policy
    budget: Budget
    cfg: EngineConfig
    dense_cost: Cost
    device: torch.device
    on_epoch: EpochCallback | None = None
    on_pruned: PrunedCallback | None = None
    latency: LatencyTable | None = None  # the hardware's latency table: predicts latency (budget, reports)
    verify_latency: bool = True  # a latency budget is checked by timing the pruned model against the dense one
    events: list[dict] = field(default_factory=list)
    data: list | None = None
    latency_checks: list[dict] = field(default_factory=list)  # each timing check of a latency budget

    def __post_init__(self) -> None:
        needs = make_criterion(self.policy.criterion, self.policy.criterion_options).needs_data
        scoring_warmup = warmup_on(self.policy) and self.policy.bn_warmup_mode == "scoring"
        if needs or scoring_warmup:
            self.data = scoring_batches(self.task, self.cfg.scoring_per_class, self.cfg.seed)

    def warm_up(self, model) -> None:
        """BN warm-up before scoring, in the policy's mode (see Policy.bn_warmup_mode)."""
        if not warmup_on(self.policy):
            return
        if self.policy.bn_warmup_mode == "train":
            bn_warmup_train(model, self.task, self.policy.bn_warmup_batches, self.cfg.seed, self.device)
        else:
            bn_warmup(model, self.data, self.device)

    def score(self, model, density: float):
        example = self.task.example_input().to(self.device)
        return score(
            model,
            self.policy,
            self.data,
            self.cfg.seed,
            example=example,
            density=density,
            loss=self.task.loss,
            predict=self.task.prediction,
        )

    def reached(self, model) -> float:
        """The model's cost as a fraction of the dense cost (effective FLOPs for masks;
        predicted latency)."""
        if self.budget.kind == "latency":
            return self.latency.predict_model(model) / self.latency.predict()
        cost = measure(model, self.task.input_shape, None, latency=False)
        if self.budget.kind == "flops":
            return cost.flops / self.dense_cost.flops
        return cost.params / self.dense_cost.params

    def log(self, step: int, phase: str, target: float, model) -> None:
        self.events.append({"step": step, "phase": phase, "target": target, "reached": self.reached(model)})

    def train(
        self,
        model,
        recipe: FinetuneConfig,
        desc: str,
        hooks: TrainHook | Iterable[TrainHook] | None = None,
        epoch_offset: int = 0,
    ):
        """Train ``model`` by ``recipe`` with the method's ``hooks``; ``on_epoch`` is told each
        epoch as ``epoch + epoch_offset`` (methods that train in rounds count on)."""

        def on_epoch(epoch, metrics):
            if self.on_epoch is not None:
                self.on_epoch(epoch + epoch_offset, metrics)

        return train(
            model,
            self.task,
            recipe,
            self.cfg.seed,
            self.device,
            desc=desc,
            progress=self.cfg.progress,
            on_epoch=on_epoch,
            hooks=hooks,
        )

    def prune(self, model, budget: Budget, floors=None, channel=None) -> Pruned:
        """A copy of ``model`` pruned to ``budget`` by the policy's criterion (``channel``:
        by these channel scores instead, see :func:`~autoprune.engine.stages.prune_to_budget`),
        a latency budget checked by timing."""
        scores = self.score(model, budget.fraction) if channel is None else None

        def solve(target=None) -> Pruned:
            return prune_to_budget(
                model,
                self.task,
                self.policy,
                budget,
                scores,
                self.dense_cost,
                None,
                floors,
                self.latency,
                target,
                channel,
            )

        pruned = solve()
        if budget.kind == "latency" and self.verify_latency and budget == self.budget:
            pruned = self._check_latency(pruned, budget, solve)
        return pruned

    def _check_latency(self, pruned: Pruned, budget: Budget, solve) -> Pruned:
        """Time the pruned model against the dense one, side by side. While the measured
        latency fraction misses the budget by more than its noise (half the interquartile
        range of the per-round ratios) above, or by more than that and 5% of the budget
        below, solve again for a corrected target (:func:`next_target`). Keeps the model
        closest to the budget without exceeding it (or the last one if none)."""
        target, kept, points = budget.fraction, None, []
        for attempt in range(1, LATENCY_CHECKS + 1):
            batch = self.cfg.measure.latency_batch
            timed = speedup(self.dense, pruned.model, self.task.input_shape, batch, self.cfg.measure)
            measured = 1.0 / timed["speedup"]
            noise = (1.0 / timed["spread"][0] - 1.0 / timed["spread"][1]) / 2
            over = measured > budget.fraction + noise
            under = measured < budget.fraction - max(noise, LATENCY_UNDER * budget.fraction)
            predicted = self.reached(pruned.model)
            check = {"attempt": attempt, "target": target, "predicted": predicted, "measured": measured}
            self.latency_checks.append({**check, "noise": noise, "missed": over, "under": under, "kept": False})
            if not over and (kept is None or measured > kept[1]):
                kept = (pruned, measured, len(self.latency_checks) - 1)
            points.append((predicted, measured))
            if not (over or under) or attempt == LATENCY_CHECKS:
                break
            target = next_target(points, budget.fraction)
            try:
                pruned = solve(min(max(target, 1e-3), 1.0))
            except AutopruneError as exc:  # the corrected target is out of this policy's reach
                self.latency_checks[-1]["unreachable"] = str(exc)
                break
        if kept is not None:
            pruned = kept[0]
            self.latency_checks[kept[2]]["kept"] = True
        else:
            self.latency_checks[-1]["kept"] = True
        return pruned

    def pruned(self, pruned: Pruned) -> None:
        """The model has its final structure: recalibrate its BN statistics if the policy asks
        (``finetune.bn_recalibrate`` training batches), then tell ``on_pruned``."""
        if self.policy.finetune.bn_recalibrate:
            self.recalibrate(pruned.model, self.policy.finetune.bn_recalibrate)
        if self.on_pruned is not None:
            self.on_pruned(pruned.model, pruned.ratios)

    def steps_per_epoch(self) -> int:
        """Training steps in one epoch of the task's training split (opens the split)."""
        return len(self.task.loader("train", shuffle=True, seed=self.cfg.seed))

    def recalibrate(self, model, batches: int) -> None:
        """Recompute ``model``'s BN statistics on ``batches`` training batches (forward passes only)."""
        train = self.task.loader("train", shuffle=True, seed=self.cfg.seed, device=self.device)
        bn_warmup(model, itertools.islice(train, batches), self.device)

    def finish(self, pruned: Pruned) -> Pruned:
        pruned.events = self.events
        return pruned


def next_target(points: list[tuple[float, float]], goal: float) -> float:
    """The predicted latency fraction to solve for next, from the (predicted, measured)
    fractions of the models timed so far, so that the measured one lands on ``goal``. Once
    one timing fell below the goal and one above, at a higher prediction, the answer is
    interpolated between the closest such two (kept within their middle 80%, so a jump in
    the measured latency, as where widths cross a step of the hardware, is bisected rather
    than overshot). Else the secant through the last two timings, or after one timing, or
    when that secant's slope is implausible, the last prediction scaled by goal / measured."""
    below = [p for p in points if p[1] < goal]
    above = [p for p in points if p[1] > goal]
    if below and above:
        lo, hi = max(below), min(above)
        if lo[0] < hi[0]:
            share = (goal - lo[1]) / (hi[1] - lo[1])
            return lo[0] + min(max(share, 0.1), 0.9) * (hi[0] - lo[0])
    (p0, m0), (p1, m1) = ([(0.0, 0.0)] + points)[-2:]
    slope = (m1 - m0) / (p1 - p0) if p1 != p0 else 0.0
    if not 0.5 <= slope <= 2.0:  # two timings too close to tell a slope: proportional
        p0 = m0 = 0.0
    return p1 + (goal - m1) * (p1 - p0) / (m1 - m0)
