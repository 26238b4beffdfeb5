"""Pruning methods: when pruning happens and how the network recovers (PRUNING.md section 5).

A method takes the dense model and returns a :class:`~autoprune.engine.Pruned` model that
meets the budget and has been trained; :func:`autoprune.engine.run` measures it. Every
method logs its pruning steps in ``Pruned.events`` (training step, target and reached cost
fraction), so schedules can be checked.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from ..config import Budget, EngineConfig, FinetuneConfig, Policy
from ..errors import AutopruneError
from ..registry import Registry
from .criteria import CRITERIA, make_criterion
from .graph import PrunableGraph, clone
from .latency import LatencyTable
from .measure import Cost, measure, speedup
from .prune import mask_weights, prune_channels
from .solver import max_pruned
from .stages import (
    Pruned,
    below_zeros,
    bn_warmup,
    bn_warmup_train,
    prune_to_budget,
    score,
    scoring_batches,
    solve_unstructured,
    warmup_on,
)
from .tasks import Task
from .train import EpochCallback, seed_everything, train

METHODS: Registry[Callable[[MethodContext], Pruned]] = Registry("method")

LATENCY_CHECKS = 4  # timings of a latency-budget model (and re-solves in between) before one is taken
LATENCY_UNDER = 0.05  # a measured latency this share of the budget below it (beyond the noise) is re-solved too
GRADUAL_END = 0.75  # gradual pruning reaches the budget after this share of fine-tuning steps


PrunedCallback = Callable[[nn.Module, dict[str, float]], None]  # (pruned model, pruned fraction per group)


def check_policy(policy: Policy) -> None:
    """The registry names and options of a policy: its criterion (with its options and the
    structures it supports) and its method. ``Policy`` itself is plain data and checks only
    its own fields; every path that runs a policy calls this first."""
    criterion = CRITERIA.get(policy.criterion)
    criterion(**policy.criterion_options)  # checks the option names and values
    METHODS.get(policy.method)
    if policy.structure not in criterion.structures:
        raise AutopruneError(
            f"criterion {policy.criterion!r} supports structure(s) {', '.join(criterion.structures)}, "
            f"not {policy.structure!r}"
        )


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
        return score(model, self.policy, self.data, self.cfg.seed, example=example, density=density)

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

    def train(self, model, recipe: FinetuneConfig, desc: str, step_hook=None, epoch_offset: int = 0):
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
            step_hook=step_hook,
        )

    def prune(self, model, budget: Budget, floors=None) -> Pruned:
        scores = self.score(model, budget.fraction)

        def solve(target=None) -> Pruned:
            return prune_to_budget(
                model, self.task, self.policy, budget, scores, self.dense_cost, None, floors, self.latency, target
            )

        pruned = solve()
        if budget.kind == "latency" and self.verify_latency and budget == self.budget:
            pruned = self._check_latency(pruned, budget, solve)
        return pruned

    def _check_latency(self, pruned: Pruned, budget: Budget, solve) -> Pruned:
        """Time the pruned model against the dense one, side by side. While the measured
        latency fraction misses the budget by more than its noise (half the interquartile
        range of the per-round ratios) above, or by more than that and 5% of the budget
        below, solve again for a corrected target: by the secant through the last two
        timings (predicted against measured), or scaled by budget / measured after one timing
        or when the secant's slope is implausible. Keeps the model closest to
        the budget without exceeding it (or the last one if none)."""
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
            (p0, m0), (p1, m1) = ([(0.0, 0.0)] + points)[-2:]
            slope = (m1 - m0) / (p1 - p0) if p1 != p0 else 0.0
            if not 0.5 <= slope <= 2.0:  # two timings too close to tell a slope: proportional
                p0 = m0 = 0.0
            target = p1 + (budget.fraction - m1) * (p1 - p0) / (m1 - m0)
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
        batches = self.policy.finetune.bn_recalibrate
        if batches:
            train = self.task.loader("train", shuffle=True, seed=self.cfg.seed, device=self.device)
            bn_warmup(pruned.model, itertools.islice(train, batches), self.device)
        if self.on_pruned is not None:
            self.on_pruned(pruned.model, pruned.ratios)

    def finish(self, pruned: Pruned) -> Pruned:
        pruned.events = self.events
        return pruned


def _prune_then_train(run: MethodContext, start, recipe: FinetuneConfig, phase: str, desc: str) -> Pruned:
    work = clone(start)
    run.warm_up(work)
    pruned = run.prune(work, run.budget)
    run.log(0, phase, run.budget.fraction, pruned.model)
    run.pruned(pruned)
    pruned.epochs = run.train(pruned.model, recipe, desc)
    return run.finish(pruned)


@METHODS.register("oneshot")
def oneshot(run: MethodContext) -> Pruned:
    """Train -> prune once -> fine-tune (Han et al. 2015)."""
    return _prune_then_train(run, run.dense, run.policy.finetune, "before fine-tuning", "fine-tune")


@METHODS.register("rewind")
def rewind(run: MethodContext) -> Pruned:
    """Prune once, then retrain with the dense model's original learning-rate schedule
    (peak ``task.train_lr``, cosine) replayed over the retraining epochs, instead of the
    small fine-tuning rate: learning-rate rewinding (Renda et al. 2020)."""
    recipe = dataclasses.replace(run.policy.finetune, lr=run.task.train_lr, schedule="cosine")
    return _prune_then_train(run, run.dense, recipe, "before retraining", "retrain (rewound lr)")


@METHODS.register("init")
def init(run: MethodContext) -> Pruned:
    """Pruning at initialisation (SNIP, GraSP, SynFlow, Fisher, Hutchinson): prune the
    untrained network (seeded), then train it from scratch with the dense model's recipe
    (``train_epochs`` epochs at ``task.train_lr``). Masks hold throughout training."""
    task, policy, cfg = run.task, run.policy, run.cfg
    seed_everything(cfg.seed)
    fresh = task.model_factory().to(run.device).eval()
    epochs = task.train_epochs if cfg.train_epochs is None else cfg.train_epochs
    recipe = dataclasses.replace(policy.finetune, epochs=epochs, lr=task.train_lr, schedule="cosine")
    return _prune_then_train(run, fresh, recipe, "at initialisation", "train from scratch")


def _split(epochs: int, rounds: int) -> list[int]:
    base = epochs // rounds
    return [base] * (rounds - 1) + [epochs - base * (rounds - 1)]


def _floors(model, task, policy: Policy) -> dict[str, int]:
    """Channels each group must keep so that max_ratio holds against the dense widths."""
    graph = PrunableGraph(clone(model), task.example_input().to(next(model.parameters()).device), embedding=True)
    return {g.name: g.size - max_pruned(g.size, policy.max_ratio) for g in graph.groups}


@METHODS.register("iterative")
def iterative(run: MethodContext) -> Pruned:
    """k rounds of prune-a-little -> fine-tune (Han et al. 2015). Round i keeps the cost
    fraction budget**(i/k), reaching the budget at round k; the fine-tuning epochs are
    shared out over the rounds (the last gets the remainder)."""
    task, policy, budget, cfg = run.task, run.policy, run.budget, run.cfg
    k = policy.resolved().iterations
    work = clone(run.dense)
    run.warm_up(work)
    floors = _floors(run.dense, task, policy) if policy.structure == "channel" else None
    per_epoch = len(task.loader("train", shuffle=True, seed=cfg.seed)) if policy.finetune.epochs else 0
    sizes, kept, history, epochs = {}, {}, [], []
    for i, n_epochs in enumerate(_split(policy.finetune.epochs, k), start=1):
        step_budget = budget if i == k else Budget(budget.kind, budget.fraction ** (i / k), budget.tolerance)
        pruned = run.prune(work, step_budget, floors)
        work = pruned.model
        history += pruned.history
        run.log(len(epochs) * per_epoch, f"round {i}/{k}", step_budget.fraction, work)
        if i == k:
            run.pruned(pruned)
        for g, r in pruned.ratios.items():
            kept[g] = kept.get(g, 1.0) * (1.0 - r)
        sizes = sizes or pruned.sizes
        recipe = dataclasses.replace(policy.finetune, epochs=n_epochs)
        epochs += run.train(work, recipe, f"fine-tune {i}/{k}", epoch_offset=len(epochs))
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
    return run.finish(out)


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


@METHODS.register("gradual")
def gradual(run: MethodContext) -> Pruned:
    """Prune during fine-tuning on the cubic schedule (Zhu & Gupta 2017; Gale et al. 2019):
    ``iterations`` pruning steps spread over the first ``GRADUAL_END`` of the fine-tuning
    steps, each re-scoring the current network and pruning to the schedule's cost fraction;
    the rest of fine-tuning recovers. Channels are zeroed while training (and kept zero
    before every step) and physically removed at the end; weights are masked."""
    task, policy, budget, cfg = run.task, run.policy, run.budget, run.cfg
    n = policy.resolved().iterations
    work = clone(run.dense)
    run.warm_up(work)
    if policy.finetune.epochs == 0:
        return _prune_then_train(run, work, policy.finetune, "no fine-tuning: pruned at once", "fine-tune")
    steps = gradual_steps(policy.finetune.epochs * len(task.loader("train", shuffle=True, seed=cfg.seed)), n)
    end, at = steps[-1], set(steps)
    example = task.example_input().to(run.device)
    channel = policy.structure == "channel"
    graph = PrunableGraph(work, example, embedding=policy.embedding) if channel else None
    floors = _floors(run.dense, task, policy) if channel else None
    removed: dict[str, np.ndarray] = {g.name: np.zeros(0, dtype=int) for g in graph.groups} if channel else {}
    state: dict = {}

    def prune_step(step: int) -> None:
        fraction = budget.fraction if step == end else cubic_fraction(step, end, budget.fraction)
        step_budget = budget if step == end else Budget(budget.kind, fraction, budget.tolerance)
        if channel:
            current, _ = prune_channels(work, example, removed)
            pruned = run.prune(current, step_budget, floors)
            for g, idx in pruned.plan.items():
                if g not in removed:
                    raise AutopruneError(f"gradual pruning: group {g!r} appeared after pruning; use --method iterative")
                kept = np.setdiff1d(np.arange(graph.by_name[g].size), removed[g])
                removed[g] = np.union1d(removed[g], kept[idx]).astype(int)
            graph.mask(removed)
            reached_model = pruned.model
        else:
            scores = run.score(work, fraction)
            counts, estimate = solve_unstructured(work, task, policy, step_budget, scores, run.dense_cost)
            zeros = {n: int((m.weight == 0).sum()) for n, m in work.named_modules() if n in counts}
            counts = {n: max(k, zeros[n]) for n, k in counts.items()}
            mask_weights(work, counts, below_zeros(work, scores))
            state["counts"], state["estimate"] = counts, estimate
            reached_model = work
        state["fraction"] = fraction
        run.log(step, f"step {len(run.events) + 1}/{len(steps)}", fraction, reached_model)

    def hook(step: int, _total: int) -> None:
        if step in at:
            prune_step(step)
        elif channel and run.events:
            graph.mask(removed)  # optimiser updates would revive zeroed channels

    epochs = run.train(work, policy.finetune, "fine-tune (gradual)", step_hook=hook)
    if len(run.events) < len(steps):  # the last step falls after the final batch
        prune_step(end)
    if channel:
        graph.mask(removed)
        model, history = prune_channels(work, example, removed)
        sizes = {g.name: g.size for g in graph.groups}
        ratios = {g: len(removed[g]) / sizes[g] for g in sizes}
        out = Pruned(model, "channel", history, ratios, state["fraction"], 1, epochs, plan=removed, sizes=sizes)
    else:
        sizes = {n: m.weight.numel() for n, m in work.named_modules() if n in state["counts"]}
        ratios = {n: k / sizes[n] for n, k in state["counts"].items()}
        out = Pruned(
            work, "unstructured", [], ratios, state["estimate"], 1, epochs, counts=state["counts"], sizes=sizes
        )
    return run.finish(out)
