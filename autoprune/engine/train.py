"""Training, evaluation, devices and the dense model: what every method and job shares."""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..config import EngineConfig, FinetuneConfig
from ..errors import AutopruneError
from .checkpoint import architecture_key, atomic_save, cpu_state, load_state, load_tensors
from .hooks import Hooks, TrainHook
from .inputs import batch_len, to_device
from .models import first_tensor
from .tasks import Task
from .tasks.metrics import Accuracy

EpochCallback = Callable[[int, dict[str, float]], None]  # (epoch, {"val_acc": ..., "loss": ...}): the task's metric key


class TrainingDiverged(AutopruneError):
    """The loss became NaN or infinite."""


# ------------------------------------------------------------------ devices and seeds


def resolve_device(device: str | None) -> torch.device:
    if device:
        try:
            dev = torch.device(device)
        except (RuntimeError, ValueError, TypeError):
            raise AutopruneError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from None
        if dev.type not in ("cpu", "cuda"):  # meta, xla, mps, ...: not what autoprune runs on
            raise AutopruneError(f"device {device!r} is not supported; use cpu, cuda or cuda:N")
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise AutopruneError(f"device {device!r} asked for, but no CUDA GPU is available")
        if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
            raise AutopruneError(f"device {device!r}: this machine has {torch.cuda.device_count()} GPU(s)")
        return dev
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)


# ------------------------------------------------------------------ training and evaluation


def evaluate(model: nn.Module, loader, device: torch.device | None = None, task: Task | None = None) -> float:
    """The task's metric of ``model`` on ``loader`` (without a task: top-1 accuracy, a
    fraction in 0..1)."""
    return metric_and_loss(model, loader, device, task)[0]


def metric_and_loss(
    model: nn.Module, loader, device: torch.device | None = None, task: Task | None = None
) -> tuple[float, float]:
    """The task's metric and its mean loss per sample of ``model`` on ``loader`` (without a
    task: top-1 accuracy and mean cross-entropy). A task's own ``evaluate`` gives the metric's
    value instead (the model in eval mode, without gradients)."""
    device = device or next(model.parameters()).device
    metric = task.metric if task is not None else Accuracy()
    predict = task.prediction if task is not None else first_tensor
    was_training = model.training
    model.eval()
    metric.reset()
    total = 0
    loss = 0.0
    with torch.inference_mode():
        for x, y in loader:
            x, y = to_device(x, device), to_device(y, device)
            out = model(x)
            n = batch_len(x, y)
            pred = predict(out).float()
            if task is not None and task.loss is not None:
                loss += float(task.loss(out, y)) * n
            else:
                loss += float(nn.functional.cross_entropy(pred, y, reduction="sum").double())
            metric.update(pred, y)
            total += n
    score = metric.compute()
    if task is not None and task.evaluate is not None:  # the user's own evaluation of the split
        with torch.inference_mode():
            score = float(task.evaluate(model, loader))
    model.train(was_training)
    return score, loss / max(total, 1)


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
    hooks: TrainHook | Iterable[TrainHook] | None = None,
) -> list[dict[str, float]]:
    """SGD with momentum and the configured schedule (or the task's own optimiser, and its
    train step), the task's validation metric and loss after every epoch.
    ``hooks`` (see :mod:`autoprune.engine.hooks`) run, in order, before each step's forward
    pass, after its backward pass and after each epoch (before ``on_epoch``)."""
    if cfg.epochs == 0:
        return []  # nothing to train: the training split is not even opened
    loader = task.loader("train", shuffle=True, seed=seed, device=device)
    val_loader = task.loader("val", device=device)
    params = [p for p in model.parameters() if p.requires_grad]
    total = cfg.epochs * len(loader)
    opt, scheduler = make_optimizer(task, params, cfg, total)
    hooks = Hooks.of(hooks)
    history = []
    step = 0
    bar = _progress(total, desc, progress)
    key = task.metric_key()
    try:
        for epoch in range(cfg.epochs):
            model.train()
            running, seen = 0.0, 0
            for x, y in loader:
                hooks.on_step_start(step, total)
                if task.optimizer is None:
                    for group in opt.param_groups:
                        group["lr"] = lr_at(step, total, cfg.lr, cfg.schedule)
                x, y = to_device(x, device), to_device(y, device)
                opt.zero_grad(set_to_none=True)
                loss = task.train_step(model, x, y) if task.train_step else task.loss_of(model(x), y, train=True)
                if not torch.isfinite(loss):
                    raise TrainingDiverged(
                        f"{desc}: the loss became {loss.item()} at epoch {epoch + 1}; lower the learning rate"
                    )
                loss.backward()
                hooks.after_backward(step, total)
                opt.step()
                if scheduler is not None:
                    scheduler.step()
                n = batch_len(x, y)
                running += loss.item() * n
                seen += n
                step += 1
                bar.update(1)
            score, val_loss = metric_and_loss(model, val_loader, device, task)
            metrics = {"loss": running / max(seen, 1), key: score, "val_loss": val_loss}
            bar.set_postfix(
                {"epoch": f"{epoch + 1}/{cfg.epochs}", "loss": f"{metrics['loss']:.3f}", key: f"{score:.3f}"}
            )
            history.append(metrics)
            hooks.on_epoch_end(epoch, metrics)
            if on_epoch is not None:
                on_epoch(epoch, metrics)
    finally:
        bar.close()
    return history


def make_optimizer(task: Task, params: list, cfg: FinetuneConfig, total: int):
    """The optimiser (and a scheduler, or None) of a training run: the task's own
    (``Task.optimizer``), else SGD with momentum whose learning rate :func:`train` sets each step."""
    if task.optimizer is None:
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay), None
    made = task.optimizer(params, lr=cfg.lr, total_steps=total)
    opt, scheduler = made if isinstance(made, tuple) else (made, None)
    if not isinstance(opt, torch.optim.Optimizer):
        raise AutopruneError(
            f"task {task.name!r}: optimizer(params, lr, total_steps) must return a torch.optim.Optimizer or "
            f"(optimizer, scheduler), got {type(made).__name__}"
        )
    return opt, scheduler


# ------------------------------------------------------------------ the dense model


def cache_dir(cfg: EngineConfig) -> Path:
    root = cfg.cache_dir or os.environ.get("AUTOPRUNE_CACHE") or "~/.cache/autoprune"
    return Path(root).expanduser()


# Dense training also keeps its weights after this many steps: the lottery method's default
# rewind point. One epoch of digits (16 of its 480 dense steps, about 3%): Frankle et al. (2020)
# find that rewinding to a point early in training (a small fraction of it) works where
# rewinding to initialisation (step 0) fails.
DENSE_REWIND_STEP = 16


def dense_epochs(task: Task, cfg: EngineConfig) -> int:
    """The dense training epochs of ``cfg``: ``--train-epochs``, else the task's own."""
    return task.train_epochs if cfg.train_epochs is None else cfg.train_epochs


def dense_path(task: Task, cfg: EngineConfig, epochs: int, model: nn.Module) -> Path:
    """Where the dense model of ``task`` trained ``epochs`` epochs with ``cfg.seed`` is cached,
    keyed by a hash of (task, ``model``'s architecture and source, seed, epochs, lr)."""
    key = task.key(
        {"seed": cfg.seed, "epochs": epochs, "lr": task.train_lr, "arch": architecture_key(model, source=True)}
    )
    return cache_dir(cfg) / f"{task.name.replace(':', '.')}-{task.model_name}-{key}.pt"


def threads_path(path: Path) -> Path:
    """Where the torch threads that trained the dense model cached at ``path`` are noted (on
    the CPU a run's float sums, hence its weights, depend on them)."""
    return path.with_name(f"{path.stem}-threads.json")


def dense_threads(path: Path) -> int | None:
    """The torch threads the dense model cached at ``path`` was trained with (None: not noted)."""
    try:
        return int(json.loads(threads_path(path).read_text())["threads"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def rewind_path(path: Path, step: int) -> Path:
    """Where the weights of the dense run cached at ``path`` after ``step`` training steps are kept."""
    return path.with_name(f"{path.stem}-step{step}.pt")


class _Reached(Exception):
    """The dense run reached the step it was asked to stop at."""


class _Snapshots(TrainHook):
    """Saves the model's state (on the CPU, atomically) after the optimiser steps in
    ``paths``, before the next step runs; raises :class:`_Reached` there if it is ``stop``."""

    def __init__(self, model: nn.Module, paths: dict[int, Path], stop: int | None) -> None:
        self.model, self.paths, self.stop = model, paths, stop

    def on_step_start(self, step: int, total: int) -> None:
        if step in self.paths:
            atomic_save(cpu_state(self.model), self.paths[step])
        if step == self.stop:
            raise _Reached


def dense_training(
    task: Task,
    cfg: EngineConfig,
    epochs: int,
    device: torch.device,
    save: dict[int, Path] | None = None,
    stop: int | None = None,
) -> nn.Module:
    """The seeded dense run: the task's model built after seeding with ``cfg.seed``, trained
    ``epochs`` epochs at ``task.train_lr`` on the cosine schedule. ``save``: the weights after
    those steps are written to those paths; ``stop``: the run ends after that many steps
    (the schedule is still the whole run's). On the CPU the same seed gives the same weights
    at every step, so a shorter run reproduces the beginning of a longer one exactly."""
    seed_everything(cfg.seed)
    model = task.model_factory().to(device)
    recipe = FinetuneConfig(epochs=epochs, lr=task.train_lr)
    hook = _Snapshots(model, save or {}, stop)
    try:
        train(model, task, recipe, cfg.seed, device, desc="dense training", progress=cfg.progress, hooks=hook)
    except _Reached:
        pass
    return model


def dense_model(task: Task, cfg: EngineConfig, log: Callable[[str], None] = print) -> nn.Module:
    """``--checkpoint`` if given, else the task's model trained once with ``cfg.seed`` and
    cached on disk (:func:`dense_path`), with its weights after ``DENSE_REWIND_STEP`` steps
    beside it (:func:`rewind_path`). An unreadable cache entry is reported and retrained;
    entries are written atomically."""
    device = resolve_device(cfg.device)
    seed_everything(cfg.seed)
    model = task.model_factory()
    if cfg.checkpoint:
        _load_checkpoint(model, cfg.checkpoint)
        return model.to(device).eval()
    epochs = dense_epochs(task, cfg)
    if epochs == 0:
        if cfg.train_epochs is None:
            print(
                f"warning: task {task.name!r} trains no dense model by default and no --checkpoint was given, so "
                "an untrained model is pruned; pass --checkpoint FILE or --train-epochs N (--train-epochs 0 "
                "says an untrained model is meant)",
                file=sys.stderr,
            )
        return model.to(device).eval()
    path = dense_path(task, cfg, epochs, model)
    if path.is_file():
        try:
            load_state(model, load_tensors(path, "cached dense model"), f"cached dense model {str(path)!r}")
            log(f"dense model: cached {path}")
            return model.to(device).eval()
        except AutopruneError as exc:
            print(f"warning: {exc}; training it again", file=sys.stderr)
    log(f"dense model: training {task.model_name} on {task.name} for {epochs} epochs (cached after)")
    model = dense_training(task, cfg, epochs, device, save={DENSE_REWIND_STEP: rewind_path(path, DENSE_REWIND_STEP)})
    atomic_save(cpu_state(model), path)
    threads_path(path).write_text(json.dumps({"threads": torch.get_num_threads(), "device": device.type}) + "\n")
    return model.eval()


def _load_checkpoint(model: nn.Module, path: str) -> None:
    state = load_tensors(path, "--checkpoint")
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        if state.get("history"):
            raise AutopruneError(f"--checkpoint {path!r} is an already pruned model; start from dense weights")
        state = state["state_dict"]
    load_state(model, state, f"--checkpoint {path!r}")
