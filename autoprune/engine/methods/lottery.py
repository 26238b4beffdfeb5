"""Lottery-ticket weight rewinding: iterative pruning whose survivors are rewound to the dense
run's early weights and retrained (Frankle et al. 2019, 2020)."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import torch
from torch.nn.utils import prune as torch_prune

from ...config import Budget
from ...errors import AutopruneError
from ...schema import MAX_STEPS, integer
from ..checkpoint import cpu_state, load_state, load_tensors
from ..graph import clone, replay_history
from ..prune import current_masks
from ..stages import Pruned
from ..threads import using_threads
from ..train import DENSE_REWIND_STEP, dense_epochs, dense_path, dense_threads, dense_training, rewind_path
from .base import Method, floors, register, split
from .context import MethodContext

MAX_REWIND_STEP = 10_000_000


def dense_run(ctx: MethodContext, k: int) -> tuple[int, Path]:
    """The dense training that produced ``ctx.dense``: its epochs and cache path. Refuses,
    before any training, a dense model autoprune did not train (``--checkpoint``, a task
    that trains none, weights that match no cached dense run) and a ``k`` past its end.
    Looked up: the epochs of ``cfg.train_epochs`` and the task's own (a search's trials set
    ``train_epochs`` to their own epochs)."""
    task, cfg = ctx.task, ctx.cfg
    why = f"method 'lottery' rewinds the pruned network to the dense run's weights after {k} training steps"
    if cfg.checkpoint:
        raise AutopruneError(
            f"{why}, which --checkpoint {cfg.checkpoint!r} does not hold: drop --checkpoint so that autoprune "
            "trains (and caches) the dense model itself, or use --method rewind (learning-rate rewinding needs "
            "no early weights)"
        )
    if dense_epochs(task, cfg) == 0:
        untrained = (
            "--train-epochs 0 asks for" if cfg.train_epochs == 0 else f"task {task.name!r} trains no dense model:"
        )
        raise AutopruneError(
            f"{why}, but {untrained} an untrained model, which has no such weights: pass --train-epochs N so that "
            "autoprune trains and caches the dense model, or use --method rewind"
        )
    own, model, tried = cpu_state(ctx.dense), task.model_factory(), []
    for epochs in dict.fromkeys(e for e in (dense_epochs(task, cfg), task.train_epochs) if e > 0):
        path = dense_path(task, cfg, epochs, model)
        tried.append(str(path))
        if path.is_file() and _same(load_tensors(path, "cached dense model"), own):
            total = epochs * ctx.steps_per_epoch()
            if k >= total:
                raise AutopruneError(
                    f"{why}, but the dense training took only {total} steps: pass --method-option rewind_step=K "
                    f"with K below {total}"
                )
            return epochs, path
    raise AutopruneError(
        f"{why}, so it prunes only a dense model that autoprune trained and cached for this task and seed; no "
        f"cached dense model has these weights (looked for {', '.join(tried)}): start from autoprune's own dense "
        "model (engine.dense_model, with the same --seed, --train-epochs and --cache-dir), or use --method rewind"
    )


def _same(state, own) -> bool:
    return isinstance(state, dict) and state.keys() == own.keys() and all(torch.equal(state[n], own[n]) for n in own)


def rewind_state(ctx: MethodContext, epochs: int, path: Path, k: int) -> dict[str, torch.Tensor]:
    """The dense run's weights after ``k`` steps: from the cache beside the dense model, else
    by re-running the seeded dense training for ``k`` steps (and caching them)."""
    step_path = rewind_path(path, k)
    if step_path.is_file():
        try:
            return load_tensors(step_path, "cached rewind weights")
        except AutopruneError as exc:
            print(f"warning: {exc}; training it again", file=sys.stderr)
    threads = dense_threads(path) if ctx.device.type == "cpu" else None  # as the dense run had: same sums
    with using_threads(threads or torch.get_num_threads()):
        dense_training(ctx.task, ctx.cfg, epochs, ctx.device, save={k: step_path}, stop=k)
    return load_tensors(step_path, "cached rewind weights")


class Rewinder:
    """Builds the pruned network with the step-``k`` weights: channels by replaying the
    pruning history on the dense model at step ``k``; weights by masking it."""

    def __init__(self, ctx: MethodContext, state: dict[str, torch.Tensor], k: int) -> None:
        self.ctx, self.state, self.k = ctx, state, k

    def __call__(self, pruned: Pruned, history: list):
        ctx = self.ctx
        model = ctx.task.model_factory()
        load_state(model, self.state, f"the dense run's weights after {self.k} steps")
        model.to(ctx.device)
        if pruned.structure == "channel":
            return replay_history(model, ctx.task.example_input().to(ctx.device), history)
        modules = dict(model.named_modules())
        for name, mask in current_masks(pruned.model).items():
            torch_prune.custom_from_mask(modules[name], "weight", mask.detach().clone())
        return model


@register
class Lottery(Method):
    """Iterative pruning with weight rewinding: round i of n keeps the cost fraction
    budget**(i/n), scored by the policy's criterion on the network trained so far; then the
    surviving weights are set back to their values after ``rewind_step`` steps of dense
    training and retrained with the dense recipe (peak ``task.train_lr``, cosine) for the
    round's share of the fine-tuning epochs. n is ``iterations``, or the fine-tuning epochs
    if fewer (a round without training would rank weights untrained since the rewind);
    without fine-tuning it prunes once and rewinds. Channel groups keep ``max_ratio``
    against the dense widths."""

    name = "lottery"
    family = "rewinding"
    summary = (
        "Iterative pruning that rewinds the surviving weights to the dense run's step-k values "
        "and retrains them: lottery-ticket weight rewinding (Frankle et al. 2019, 2020)."
    )
    structures = ("channel", "unstructured")
    options = {
        "iterations": integer(1, most=MAX_STEPS, optional=True),  # rounds
        "rewind_step": integer(0, most=MAX_REWIND_STEP, optional=True),  # k: dense training steps to rewind to
    }
    defaults = {"iterations": 3, "rewind_step": DENSE_REWIND_STEP}
    space = {"iterations": [1, 2, 3]}
    in_steps = True

    def run(self, ctx: MethodContext) -> Pruned:
        task, policy, budget = ctx.task, ctx.policy, ctx.budget
        settings = self.settings(policy)
        k = settings["rewind_step"]
        epochs, path = dense_run(ctx, k)
        rewind = Rewinder(ctx, rewind_state(ctx, epochs, path, k), k)
        n = max(1, min(settings["iterations"], policy.finetune.epochs))
        work = clone(ctx.dense)
        ctx.warm_up(work)
        channel = policy.structure == "channel"
        caps = floors(ctx.dense, task, policy) if channel else None
        per_epoch = ctx.steps_per_epoch() if policy.finetune.epochs else 0
        recipe = dataclasses.replace(policy.finetune, lr=task.train_lr, schedule="cosine")
        kept, history, trained, sizes = {}, [], [], {}
        for i, n_epochs in enumerate(split(policy.finetune.epochs, n), start=1):
            step_budget = budget if i == n else Budget(budget.kind, budget.fraction ** (i / n), budget.tolerance)
            pruned = ctx.prune(work, step_budget, caps)
            history += pruned.history
            sizes = sizes or pruned.sizes
            for g, r in pruned.ratios.items():
                kept[g] = kept.get(g, 1.0) * (1.0 - r)
            ratios = {g: 1.0 - v for g, v in kept.items()} if channel else pruned.ratios
            work = rewind(pruned, history)
            ctx.log(len(trained) * per_epoch, f"round {i}/{n}", step_budget.fraction, work)
            if i == n:
                ctx.pruned(dataclasses.replace(pruned, model=work, ratios=ratios))
            round_recipe = dataclasses.replace(recipe, epochs=n_epochs)
            trained += ctx.train(work, round_recipe, f"retrain {i}/{n} (rewound)", epoch_offset=len(trained))
        out = dataclasses.replace(pruned, model=work, history=history, ratios=ratios, epochs=trained, sizes=sizes)
        out.plan = {}  # (the rounds' plans index different widths; the history is the replayable record)
        return ctx.finish(out)
