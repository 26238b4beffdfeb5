"""Pruning methods: when pruning happens and how the network recovers (PRUNING.md section 5).

A method takes the dense model and returns a :class:`~autoprune.engine.Pruned` model that
meets the budget and has been trained; :func:`autoprune.engine.run` measures it. Every
method logs its pruning steps in ``Pruned.events`` (training step, target and reached cost
fraction), so schedules can be checked.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from . import engine as E
from .config import Budget, FinetuneConfig, Policy
from .criteria import make_criterion
from .errors import AutopruneError
from .graph import PrunableGraph, clone
from .measure import measure
from .policy import max_pruned
from .prune import mask_weights, prune_channels
from .registry import Registry

METHODS: Registry[Callable[..., E.Pruned]] = Registry("method")

DEFAULT_ITERATIONS = {"iterative": 3, "gradual": 10}
GRADUAL_END = 0.75  # gradual pruning reaches the budget after this share of fine-tuning steps


class _Run:
    """What every method needs: the task, the policy, scoring data, and measurement."""

    def __init__(self, task, policy: Policy, budget: Budget, cfg, dense_cost, device, on_epoch) -> None:
        self.task, self.policy, self.budget, self.cfg = task, policy, budget, cfg
        self.dense_cost, self.device, self.on_epoch = dense_cost, device, on_epoch
        needs = make_criterion(policy.criterion, policy.criterion_options).needs_data
        scoring_warmup = policy.warmup() and policy.bn_warmup_mode == "scoring"
        self.data = E.scoring_batches(task, cfg.scoring_per_class, cfg.seed) if needs or scoring_warmup else None
        self.events: list[dict] = []

    def warm_up(self, model) -> None:
        """BN warm-up before scoring, in the policy's mode (see Policy.bn_warmup_mode)."""
        if not self.policy.warmup():
            return
        if self.policy.bn_warmup_mode == "train":
            E.bn_warmup_train(model, self.task, self.policy.bn_warmup_batches, self.cfg.seed, self.device)
        else:
            E.bn_warmup(model, self.data, self.device)

    def score(self, model, density: float):
        example = self.task.example_input().to(self.device)
        return E.score(model, self.policy, self.data, self.cfg.seed, example=example, density=density)

    def reached(self, model) -> float:
        """The model's cost as a fraction of the dense cost (effective FLOPs for masks)."""
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

        return E.train(
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

    def prune(self, model, budget: Budget, floors=None) -> E.Pruned:
        scores = self.score(model, budget.fraction)
        return E.prune_to_budget(model, self.task, self.policy, budget, scores, self.dense_cost, floors=floors)

    def finish(self, pruned: E.Pruned) -> E.Pruned:
        pruned.events = self.events
        return pruned


def _prune_then_train(run: _Run, start, recipe: FinetuneConfig, phase: str, desc: str) -> E.Pruned:
    work = clone(start)
    run.warm_up(work)
    pruned = run.prune(work, run.budget)
    run.log(0, phase, run.budget.fraction, pruned.model)
    pruned.epochs = run.train(pruned.model, recipe, desc)
    return run.finish(pruned)


@METHODS.register("oneshot")
def oneshot(task, dense, policy, budget, cfg, dense_cost, device, on_epoch) -> E.Pruned:
    """Train -> prune once -> fine-tune (Han et al. 2015)."""
    run = _Run(task, policy, budget, cfg, dense_cost, device, on_epoch)
    return _prune_then_train(run, dense, policy.finetune, "before fine-tuning", "fine-tune")


@METHODS.register("rewind")
def rewind(task, dense, policy, budget, cfg, dense_cost, device, on_epoch) -> E.Pruned:
    """Prune once, then retrain with the dense model's original learning-rate schedule
    (peak ``task.train_lr``, cosine) replayed over the retraining epochs, instead of the
    small fine-tuning rate: learning-rate rewinding (Renda et al. 2020)."""
    run = _Run(task, policy, budget, cfg, dense_cost, device, on_epoch)
    recipe = dataclasses.replace(policy.finetune, lr=task.train_lr, schedule="cosine")
    return _prune_then_train(run, dense, recipe, "before retraining", "retrain (rewound lr)")


@METHODS.register("init")
def init(task, dense, policy, budget, cfg, dense_cost, device, on_epoch) -> E.Pruned:
    """Pruning at initialisation (SNIP, GraSP, SynFlow, Fisher, Hutchinson): prune the
    untrained network (seeded), then train it from scratch with the dense model's recipe
    (``train_epochs`` epochs at ``task.train_lr``). Masks hold throughout training."""
    run = _Run(task, policy, budget, cfg, dense_cost, device, on_epoch)
    E.seed_everything(cfg.seed)
    fresh = task.model_factory().to(device).eval()
    epochs = task.train_epochs if cfg.train_epochs is None else cfg.train_epochs
    recipe = dataclasses.replace(policy.finetune, epochs=epochs, lr=task.train_lr, schedule="cosine")
    return _prune_then_train(run, fresh, recipe, "at initialisation", "train from scratch")


def _split(epochs: int, rounds: int) -> list[int]:
    base = epochs // rounds
    return [base] * (rounds - 1) + [epochs - base * (rounds - 1)]


def _floors(model, task, policy: Policy) -> dict[str, int]:
    """Channels each group must keep so that max_ratio holds against the dense widths."""
    graph = PrunableGraph(clone(model), task.example_input().to(next(model.parameters()).device))
    return {g.name: g.size - max_pruned(g.size, policy.max_ratio) for g in graph.groups}


@METHODS.register("iterative")
def iterative(task, dense, policy, budget, cfg, dense_cost, device, on_epoch) -> E.Pruned:
    """k rounds of prune-a-little -> fine-tune (Han et al. 2015). Round i keeps the cost
    fraction budget**(i/k), reaching the budget at round k; the fine-tuning epochs are
    shared out over the rounds (the last gets the remainder)."""
    run = _Run(task, policy, budget, cfg, dense_cost, device, on_epoch)
    k = policy.iterations or DEFAULT_ITERATIONS["iterative"]
    work = clone(dense)
    run.warm_up(work)
    floors = _floors(dense, task, policy) if policy.structure == "channel" else None
    per_epoch = len(task.loader("train", shuffle=True, seed=cfg.seed)) if policy.finetune.epochs else 0
    sizes, kept, history, epochs = {}, {}, [], []
    for i, n_epochs in enumerate(_split(policy.finetune.epochs, k), start=1):
        step_budget = budget if i == k else Budget(budget.kind, budget.fraction ** (i / k), budget.tolerance)
        pruned = run.prune(work, step_budget, floors)
        work = pruned.model
        history += pruned.history
        run.log(len(epochs) * per_epoch, f"round {i}/{k}", step_budget.fraction, work)
        for g, r in pruned.ratios.items():
            kept[g] = kept.get(g, 1.0) * (1.0 - r)
        sizes = sizes or pruned.sizes
        recipe = dataclasses.replace(policy.finetune, epochs=n_epochs)
        epochs += run.train(work, recipe, f"fine-tune {i}/{k}", epoch_offset=len(epochs))
    ratios = pruned.ratios if policy.structure == "unstructured" else {g: 1.0 - v for g, v in kept.items()}
    out = E.Pruned(
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
def gradual(task, dense, policy, budget, cfg, dense_cost, device, on_epoch) -> E.Pruned:
    """Prune during fine-tuning on the cubic schedule (Zhu & Gupta 2017; Gale et al. 2019):
    ``iterations`` pruning steps spread over the first ``GRADUAL_END`` of the fine-tuning
    steps, each re-scoring the current network and pruning to the schedule's cost fraction;
    the rest of fine-tuning recovers. Channels are zeroed while training (and kept zero
    before every step) and physically removed at the end; weights are masked."""
    run = _Run(task, policy, budget, cfg, dense_cost, device, on_epoch)
    n = policy.iterations or DEFAULT_ITERATIONS["gradual"]
    work = clone(dense)
    run.warm_up(work)
    if policy.finetune.epochs == 0:
        return _prune_then_train(run, work, policy.finetune, "no fine-tuning: pruned at once", "fine-tune")
    steps = gradual_steps(policy.finetune.epochs * len(task.loader("train", shuffle=True, seed=cfg.seed)), n)
    end, at = steps[-1], set(steps)
    example = task.example_input().to(device)
    channel = policy.structure == "channel"
    graph = PrunableGraph(work, example) if channel else None
    floors = _floors(dense, task, policy) if channel else None
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
            counts, estimate = E.solve_unstructured(work, task, policy, step_budget, scores, dense_cost)
            zeros = {n: int((m.weight == 0).sum()) for n, m in work.named_modules() if n in counts}
            counts = {n: max(k, zeros[n]) for n, k in counts.items()}
            mask_weights(work, counts, E._below_zeros(work, scores))
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
        out = E.Pruned(model, "channel", history, ratios, state["fraction"], 1, epochs, plan=removed, sizes=sizes)
    else:
        sizes = {n: m.weight.numel() for n, m in work.named_modules() if n in state["counts"]}
        ratios = {n: k / sizes[n] for n, k in state["counts"].items()}
        out = E.Pruned(
            work, "unstructured", [], ratios, state["estimate"], 1, epochs, counts=state["counts"], sizes=sizes
        )
    return run.finish(out)
