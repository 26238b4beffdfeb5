"""The shared prune-and-fine-tune engine: one plain function per stage, no Ray or MLflow.

copy dense model -> (BN warm-up) -> score -> solve the budget -> prune -> measure ->
fine-tune -> evaluate (validation for decisions, test only for the final report).
``autoprune prune``, the search trials and the tests all call :func:`run`.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from . import criteria as crit
from .checkpoint import architecture_key, atomic_save, cpu_state, load_state, load_tensors
from .config import Budget, EngineConfig, FinetuneConfig, MeasureConfig, Policy
from .errors import AutopruneError
from .graph import PRUNABLE_TYPES, CostModel, PrunableGraph, clone
from .measure import Cost, flops_by_module, measure
from .policy import LayerInfo, max_masked, max_pruned, solve_channels, solve_masks
from .prune import fold_masks, mask_weights, prune_channels
from .tasks import Task, labels_of

EpochCallback = Callable[[int, dict[str, float]], None]  # (epoch, {"val_acc": ..., "loss": ...})


class TrainingDiverged(AutopruneError):
    """The loss became NaN or infinite."""


# ------------------------------------------------------------------ devices and seeds


def resolve_device(device: str | None) -> torch.device:
    if device:
        try:
            dev = torch.device(device)
        except RuntimeError:
            raise AutopruneError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise AutopruneError(f"device {device!r} asked for, but no CUDA GPU is available")
        return dev
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)


# ------------------------------------------------------------------ training and evaluation


def evaluate(model: nn.Module, loader, device: torch.device | None = None) -> float:
    """Top-1 accuracy (a fraction in 0..1) of ``model`` on ``loader``."""
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    correct = total = 0
    with torch.inference_mode():
        for x, y in loader:
            out = model(x.to(device))
            correct += int((out.argmax(1).cpu() == y).sum())
            total += len(y)
    model.train(was_training)
    return correct / max(total, 1)


def lr_at(step: int, total: int, peak: float, schedule: str) -> float:
    """Learning rate at ``step`` of ``total``: cosine decay from ``peak`` to 0, or constant."""
    if schedule == "constant" or total <= 0:
        return peak
    return 0.5 * peak * (1 + math.cos(math.pi * step / total))


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(
        total=total, desc=desc, disable=not enabled, leave=False, file=sys.stderr, dynamic_ncols=True, unit="batch"
    )


def train(
    model: nn.Module,
    task: Task,
    cfg: FinetuneConfig,
    seed: int,
    device: torch.device,
    desc: str = "train",
    progress: bool = False,
    on_epoch: EpochCallback | None = None,
    step_hook: Callable[[int, int], None] | None = None,
) -> list[dict[str, float]]:
    """SGD with momentum and the configured schedule; validation accuracy after every epoch.
    ``step_hook(step, total)`` runs before each optimiser step (gradual pruning uses it)."""
    if cfg.epochs == 0:
        return []  # nothing to train: the training split is not even opened
    loader = task.loader("train", shuffle=True, seed=seed)
    val_loader = task.loader("val")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    loss_fn = nn.CrossEntropyLoss()
    total = cfg.epochs * len(loader)
    history = []
    step = 0
    bar = _progress(total, desc, progress)
    try:
        for epoch in range(cfg.epochs):
            model.train()
            running, seen = 0.0, 0
            for x, y in loader:
                if step_hook is not None:
                    step_hook(step, total)
                for group in opt.param_groups:
                    group["lr"] = lr_at(step, total, cfg.lr, cfg.schedule)
                x, y = x.to(device), y.to(device)
                loss = loss_fn(model(x), y)
                if not torch.isfinite(loss):
                    raise TrainingDiverged(
                        f"{desc}: the loss became {loss.item()} at epoch {epoch + 1}; lower the learning rate"
                    )
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                running += loss.item() * len(y)
                seen += len(y)
                step += 1
                bar.update(1)
            metrics = {"loss": running / max(seen, 1), "val_acc": evaluate(model, val_loader, device)}
            bar.set_postfix(
                epoch=f"{epoch + 1}/{cfg.epochs}", loss=f"{metrics['loss']:.3f}", val_acc=f"{metrics['val_acc']:.3f}"
            )
            history.append(metrics)
            if on_epoch is not None:
                on_epoch(epoch, metrics)
    finally:
        bar.close()
    return history


# ------------------------------------------------------------------ the dense model


def cache_dir(cfg: EngineConfig) -> Path:
    root = cfg.cache_dir or os.environ.get("AUTOPRUNE_CACHE") or "~/.cache/autoprune"
    return Path(root).expanduser()


def dense_model(task: Task, cfg: EngineConfig, log: Callable[[str], None] = print) -> nn.Module:
    """``--checkpoint`` if given, else the task's model trained once with ``cfg.seed`` and
    cached on disk, keyed by a hash of (task, model architecture and source, seed, epochs).
    An unreadable cache entry is reported and retrained; entries are written atomically."""
    device = resolve_device(cfg.device)
    seed_everything(cfg.seed)
    model = task.model_factory()
    if cfg.checkpoint:
        _load_checkpoint(model, cfg.checkpoint)
        return model.to(device).eval()
    epochs = task.train_epochs if cfg.train_epochs is None else cfg.train_epochs
    if epochs == 0:
        if cfg.train_epochs is None:
            print(
                f"warning: task {task.name!r} trains no dense model by default and no --checkpoint was given, so "
                "an untrained model is pruned; pass --checkpoint FILE or --train-epochs N (--train-epochs 0 "
                "says an untrained model is meant)",
                file=sys.stderr,
            )
        return model.to(device).eval()
    key = task.key(
        {"seed": cfg.seed, "epochs": epochs, "lr": task.train_lr, "arch": architecture_key(model, source=True)}
    )
    path = cache_dir(cfg) / f"{task.name.replace(':', '.')}-{task.model_name}-{key}.pt"
    if path.is_file():
        try:
            load_state(model, load_tensors(path, "cached dense model"), f"cached dense model {str(path)!r}")
            log(f"dense model: cached {path}")
            return model.to(device).eval()
        except AutopruneError as exc:
            print(f"warning: {exc}; training it again", file=sys.stderr)
            seed_everything(cfg.seed)
            model = task.model_factory()
    log(f"dense model: training {task.model_name} on {task.name} for {epochs} epochs (cached after)")
    model.to(device)
    train(
        model,
        task,
        FinetuneConfig(epochs=epochs, lr=task.train_lr),
        cfg.seed,
        device,
        desc="dense training",
        progress=cfg.progress,
    )
    atomic_save(cpu_state(model), path)
    return model.eval()


def _load_checkpoint(model: nn.Module, path: str) -> None:
    state = load_tensors(path, "--checkpoint")
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        if state.get("history"):
            raise AutopruneError(f"--checkpoint {path!r} is an already pruned model; start from dense weights")
        state = state["state_dict"]
    load_state(model, state, f"--checkpoint {path!r}")


# ------------------------------------------------------------------ stages


def scoring_batches(task: Task, per_class: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A fixed, seeded subset of the training split: ``per_class`` samples of every class."""
    labels = labels_of(task.train)
    rng = np.random.default_rng(seed)
    picked = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        picked.extend(rng.choice(idx, size=min(per_class, len(idx)), replace=False).tolist())
    picked.sort()
    xs, ys = zip(*(task.train[i] for i in picked))
    x, y = torch.stack(list(xs)), torch.as_tensor(ys)
    b = task.batch_size
    return [(x[i : i + b], y[i : i + b]) for i in range(0, len(y), b)]


def bn_warmup(model: nn.Module, batches, device: torch.device) -> None:
    """Refresh BN running statistics on ``batches`` (train mode, no gradients): only the
    statistics change, computed as an exact average over the batches."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    was_training = model.training
    model.train()
    with torch.no_grad():
        for x, _ in batches:
            model(x.to(device))
    for m, mom in zip(norms, saved):
        m.momentum = mom
    model.train(was_training)


def bn_warmup_train(model: nn.Module, task: Task, max_batches: int | None, seed: int, device: torch.device) -> None:
    """The second-order pruning-at-initialisation study's warm-up: one pass over the training
    split (shuffled, seeded; at most ``max_batches`` batches) in train mode with each BN
    layer's own momentum, no gradients. Only the running statistics change."""
    was_training = model.training
    model.train()
    with torch.no_grad():
        for i, (x, _) in enumerate(task.loader("train", shuffle=True, seed=seed)):
            if max_batches is not None and i >= max_batches:
                break
            model(x.to(device))
    model.train(was_training)


_KEEP_TYPES = {
    "conv": (nn.Conv1d, nn.Conv2d, nn.Conv3d),
    "conv1d": (nn.Conv1d,),
    "conv2d": (nn.Conv2d,),
    "conv3d": (nn.Conv3d,),
    "linear": (nn.Linear,),
}


def kept_layers(model: nn.Module, policy: Policy, example: torch.Tensor) -> set[str]:
    """The conv / linear layers ``policy`` leaves untouched: by name glob (``keep``), by type
    (``keep_types``) and the output layer (``keep_classifier``). A glob that matches no layer
    is an error naming the layers there are."""
    from fnmatch import fnmatchcase

    from .models import classifier_layer

    layers = crit.scored_modules(model)
    types = tuple(t for k in policy.keep_types for t in _KEEP_TYPES[k])
    kept = {n for n, m in layers.items() if types and isinstance(m, types)}
    for glob in policy.keep:
        hits = {n for n in layers if fnmatchcase(n, glob)}
        if not hits:
            raise AutopruneError(
                f"--keep {glob!r} matches no conv or linear layer; the layers are: {', '.join(layers)}"
            )
        kept |= hits
    if policy.keep_classifier:
        names = {m: n for n, m in model.named_modules()}
        kept.add(names[classifier_layer(model, example)])
    return kept


def score(
    model: nn.Module,
    policy: Policy,
    data,
    seed: int,
    example: torch.Tensor | None = None,
    density: float | None = None,
) -> crit.Scores:
    """Per-weight scores of the conv/linear layers (and, for some criteria, norm layers) by
    the policy's criterion. A model carrying weight masks is scored as a folded copy."""
    criterion = crit.make_criterion(policy.criterion, policy.criterion_options)
    if criterion.needs_data and not data:
        raise AutopruneError(f"criterion {policy.criterion!r} needs scoring data")
    if any(hasattr(m, "weight_mask") for m in model.modules()):
        model = clone(model)
        fold_masks(model)
    was_training = model.training
    model.eval()
    ctx = crit.ScoreContext(
        model=model,
        modules=crit.scored_modules(model),
        data=data if criterion.needs_data else None,
        seed=seed,
        structure=policy.structure,
        example=example,
        density=density,
    )
    try:
        scores = criterion.score(ctx)
    finally:
        model.train(was_training)
    for name, s in scores.items():
        if not torch.isfinite(s).all():
            raise AutopruneError(
                f"criterion {policy.criterion!r} gave non-finite scores for {name}; the model may have "
                "diverged, or the criterion's options overflow"
            )
    return scores


@dataclass
class Pruned:
    """The result of the prune stage."""

    model: nn.Module
    structure: str
    history: list  # channel: replayable torch-pruning history; unstructured: []
    ratios: dict[str, float]  # group (channel) or layer (unstructured) -> pruned fraction
    estimate: float  # the solver's estimate of the kept cost fraction
    attempts: int = 1  # solver rounds until fvcore confirmed the budget
    epochs: list[dict[str, float]] = field(default_factory=list)  # fine-tuning, per epoch
    plan: dict[str, np.ndarray] = field(default_factory=dict)  # channel: removed indices per group
    counts: dict[str, int] = field(default_factory=dict)  # unstructured: masked weights per layer
    events: list[dict[str, Any]] = field(default_factory=list)  # each pruning step: when, target, reached
    sizes: dict[str, int] = field(default_factory=dict)  # dense channels per group / weights per layer


def solve_unstructured(
    model: nn.Module, task: Task, policy: Policy, budget: Budget, scores: crit.Scores, dense_cost: Cost
) -> tuple[dict[str, int], float]:
    """Masked weights per layer (the lowest-scored go) to meet the budget, and the estimate.
    Weights that are already exactly zero (masked earlier) are ranked below everything."""
    example = task.example_input().to(next(model.parameters()).device)
    total, by_module = flops_by_module(model, example)
    kept = kept_layers(model, policy, example)
    layers = [
        LayerInfo(n, m.weight.numel(), by_module.get(n, 0.0))
        for n, m in model.named_modules()
        if isinstance(m, PRUNABLE_TYPES) and n not in kept
    ]
    if not layers:
        raise AutopruneError(
            "every conv and linear layer is kept (--keep, --keep-types, --keep-classifier): nothing is left to prune"
        )
    below = _below_zeros(model, scores)
    ranked = {layer.name: below[layer.name].double().numpy() for layer in layers}
    if policy.scope == "per_layer":
        _check_names(policy.ratios or {}, [layer.name for layer in layers], "layer")
    return solve_masks(layers, ranked, policy, budget, (dense_cost.flops, float(dense_cost.params)))


def prune_to_budget(
    model: nn.Module,
    task: Task,
    policy: Policy,
    budget: Budget,
    scores: crit.Scores,
    dense_cost: Cost,
    graph: PrunableGraph | None = None,
    floors: dict[str, int] | None = None,
) -> Pruned:
    """Solve the budget for ``scores`` and prune a copy of ``model`` to it. Channel plans are
    checked against fvcore on the really pruned model and re-solved if they miss. The
    budget is a fraction of ``dense_cost``, which may be larger than ``model``'s own cost
    (iterative methods prune an already pruned model further)."""
    example = task.example_input().to(next(model.parameters()).device)
    dense = (dense_cost.flops, float(dense_cost.params))
    which = 0 if budget.kind == "flops" else 1
    if policy.structure == "unstructured":
        counts, estimate = solve_unstructured(model, task, policy, budget, scores, dense_cost)
        pruned = clone(model)
        fold_masks(pruned)
        mask_weights(pruned, counts, _below_zeros(pruned, scores))
        sizes = {n: m.weight.numel() for n, m in pruned.named_modules() if n in counts}
        ratios = {n: k / sizes[n] for n, k in counts.items()}
        return Pruned(pruned, "unstructured", [], ratios, estimate, counts=counts, sizes=sizes)

    names, sizes, channel, costs = channel_problem(model, example, policy, scores, graph)
    target = budget.fraction
    best = None
    for attempt in range(1, 6):
        plan = solve_channels(names, sizes, channel, policy, budget, costs.cost, dense, target, floors)
        pruned, history = prune_channels(model, example, plan.indices())
        real = measure(pruned, task.input_shape, None, latency=False)
        real_fraction = (real.flops, real.params)[which] / dense[which]
        if real_fraction <= budget.fraction:
            best = Pruned(
                pruned,
                "channel",
                history,
                plan.ratios(),
                plan.fraction,
                attempt,
                plan=plan.indices(),
                sizes=dict(zip(names, sizes)),
            )
            if real_fraction >= budget.fraction - budget.tolerance:
                break
            target += (budget.fraction - budget.tolerance / 2) - real_fraction
        else:
            target -= real_fraction - budget.fraction + 1e-4
        target = min(target, budget.fraction)
    if best is None:
        raise AutopruneError(
            f"could not meet --budget-{budget.kind} {budget.fraction:g}: the pruned model "
            f"measured {real_fraction:.4f}; this model has layers whose cost the solver cannot "
            "estimate"
        )
    return best


def _below_zeros(model: nn.Module, scores: crit.Scores) -> crit.Scores:
    """Scores with already-zero weights set to -inf, so masks only ever grow."""
    out = dict(scores)
    for n, m in model.named_modules():
        if n in scores and isinstance(m, PRUNABLE_TYPES):
            out[n] = torch.where(m.weight.detach().cpu() == 0, -torch.inf, scores[n].double())
    return out


def channel_problem(
    model: nn.Module,
    example: torch.Tensor,
    policy: Policy,
    scores: crit.Scores,
    graph: PrunableGraph | None = None,
) -> tuple[list[str], list[int], dict[str, np.ndarray], CostModel]:
    """The channel solver's inputs: group names and sizes, channel scores (normalised per
    group for global scope) and the cost model."""
    graph = graph or PrunableGraph(clone(model), example)
    kept = kept_layers(model, policy, example)
    if kept:  # a group that touches a kept layer (its outputs or its inputs) is never pruned
        graph.groups = [g for g in graph.groups if not any(it.module in kept for it in g.items)]
        graph.by_name = {g.name: g for g in graph.groups}
        if not graph.groups:
            raise AutopruneError(
                "every channel group touches a kept layer (--keep, --keep-types, "
                "--keep-classifier): nothing is left to prune"
            )
    if policy.scope == "per_layer":
        graph.check_names(policy.ratios or {})
    criterion = crit.make_criterion(policy.criterion, policy.criterion_options)
    reduced = crit.channel_scores(graph, scores, policy.reduction, out_only=criterion.out_only)
    channel = {g: criterion.channel_value(v) for g, v in reduced.items()}
    if policy.scope == "global":
        channel = crit.normalise(channel)
    total, by_module = flops_by_module(model, example)
    names, sizes = graph.group_names(), [g.size for g in graph.groups]
    return names, sizes, channel, CostModel(graph, by_module, total)


def _check_names(ratios: dict[str, float], allowed: list[str], what: str) -> None:
    unknown = sorted(set(ratios) - set(allowed))
    if unknown:
        raise AutopruneError(
            f"unknown {what} name(s) {', '.join(unknown)}; this model's {what}s are: {', '.join(allowed)}"
        )


# ------------------------------------------------------------------ the whole run


@dataclass
class RunResult:
    """What one engine run produced."""

    model: nn.Module  # the pruned, fine-tuned model (masks folded)
    policy: Policy
    budget: Budget
    history: list  # replayable channel-pruning history ([] for unstructured)
    ratios: dict[str, float]
    dense: dict[str, Any]  # flops, params, latency_ms, val_acc (test_acc when asked)
    pruned: dict[str, Any]  # the same, plus flops_ratio, params_ratio, speedup
    epochs: list[dict[str, float]] = field(default_factory=list)  # fine-tuning, per epoch
    collapse: dict[str, Any] = field(default_factory=dict)  # see collapse_report
    events: list[dict[str, Any]] = field(default_factory=list)  # the method's pruning steps


def collapse_report(pruned: Pruned, policy: Policy) -> dict[str, Any]:
    """Per group (channel) or layer (unstructured): the kept fraction; and which were pruned
    to their floor (one channel, or ``max_ratio``) or emptied, so collapse is visible."""
    kept, at_floor, empty = {}, [], []
    for name, ratio in pruned.ratios.items():
        size = pruned.sizes.get(name)
        kept[name] = 1.0 - ratio
        if not size:
            continue
        removed = int(round(ratio * size))
        if removed >= size:
            empty.append(name)
        elif removed >= (max_pruned if pruned.structure == "channel" else max_masked)(size, policy.max_ratio):
            at_floor.append(name)
    return {"kept_fraction": kept, "at_floor": at_floor, "empty": empty}


def measure_model(model: nn.Module, task: Task, config: MeasureConfig, test: bool = False) -> dict[str, Any]:
    """Cost (FLOPs, params, latency) and validation accuracy of a model; test accuracy only
    when ``test`` (the final report)."""
    cost = measure(model, task.input_shape, config)
    out = {**cost.to_dict(), "val_acc": evaluate(model, task.loader("val"))}
    if test:
        out["test_acc"] = evaluate(model, task.loader("test"))
    return out


def run(
    task: Task,
    dense: nn.Module,
    policy: Policy,
    budget: Budget,
    cfg: EngineConfig,
    dense_metrics: dict[str, Any] | None = None,
    test: bool = False,
    on_epoch: EpochCallback | None = None,
) -> RunResult:
    """Prune a copy of ``dense`` by ``policy`` to ``budget``, fine-tune and measure it."""
    device = next(dense.parameters()).device
    seed_everything(cfg.seed)
    dense_metrics = dense_metrics or measure_model(dense, task, cfg.measure, test=test)
    dense_cost = Cost(dense_metrics["flops"], dense_metrics["params"], {})
    from .methods import METHODS

    method = METHODS.get(policy.method)
    pruned = method(task, dense, policy, budget, cfg, dense_cost, device, on_epoch)
    model = pruned.model
    fold_masks(model)
    out = measure_model(model, task, cfg.measure, test=test)
    out["flops_ratio"] = out["flops"] / dense_metrics["flops"]
    out["params_ratio"] = out["params"] / dense_metrics["params"]
    out["ideal_speedup"] = 1.0 / out["flops_ratio"]
    by_batch = dense_metrics.get("latency_ms_by_batch", {})
    out["speedup_by_batch"] = {b: by_batch[b] / t for b, t in out["latency_ms_by_batch"].items() if b in by_batch}
    out["speedup"] = out["speedup_by_batch"].get("1", next(iter(out["speedup_by_batch"].values()), None))
    out["solver_attempts"] = pruned.attempts
    return RunResult(
        model,
        policy,
        budget,
        pruned.history,
        pruned.ratios,
        dense_metrics,
        out,
        pruned.epochs,
        collapse_report(pruned, policy),
        pruned.events,
    )
