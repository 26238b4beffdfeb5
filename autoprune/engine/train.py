"""Training, evaluation, devices and the dense model: what every method and job shares."""

from __future__ import annotations

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
from .models import all_tensors
from .tasks import Task

EpochCallback = Callable[[int, dict[str, float]], None]  # (epoch, {"val_acc": ..., "loss": ...})


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


def evaluate(model: nn.Module, loader, device: torch.device | None = None) -> float:
    """Top-1 accuracy (a fraction in 0..1) of ``model`` on ``loader``."""
    return accuracy_and_loss(model, loader, device)[0]


def accuracy_and_loss(model: nn.Module, loader, device: torch.device | None = None) -> tuple[float, float]:
    """Top-1 accuracy (a fraction in 0..1) and mean cross-entropy of ``model`` on ``loader``."""
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    correct = total = 0
    loss = 0.0
    with torch.inference_mode():
        for x, y in loader:
            out = model(x.to(device)).float()
            y = y.to(out.device)
            loss += nn.functional.cross_entropy(out, y, reduction="sum").double()
            correct += (out.argmax(1) == y).sum()
            total += len(y)
    model.train(was_training)
    return int(correct) / max(total, 1), float(loss) / max(total, 1)


AUX_WEIGHT = 0.3  # GoogLeNet's weight for its auxiliary classifiers' losses


def training_loss(loss_fn, output, y: torch.Tensor) -> torch.Tensor:
    """The loss of a train-mode output: the main output's, plus ``AUX_WEIGHT`` times each
    auxiliary classifier's (googlenet, inception_v3 return them beside the logits in training)."""
    outs = all_tensors(output)
    loss = loss_fn(outs[0], y)
    for aux in outs[1:]:
        if aux.shape == outs[0].shape:
            loss = loss + AUX_WEIGHT * loss_fn(aux, y)
    return loss


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
    """SGD with momentum and the configured schedule; validation accuracy after every epoch.
    ``hooks`` (see :mod:`autoprune.engine.hooks`) run, in order, before each step's forward
    pass, after its backward pass and after each epoch (before ``on_epoch``)."""
    if cfg.epochs == 0:
        return []  # nothing to train: the training split is not even opened
    loader = task.loader("train", shuffle=True, seed=seed, device=device)
    val_loader = task.loader("val", device=device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    loss_fn = nn.CrossEntropyLoss()
    hooks = Hooks.of(hooks)
    total = cfg.epochs * len(loader)
    history = []
    step = 0
    bar = _progress(total, desc, progress)
    try:
        for epoch in range(cfg.epochs):
            model.train()
            running, seen = 0.0, 0
            for x, y in loader:
                hooks.on_step_start(step, total)
                for group in opt.param_groups:
                    group["lr"] = lr_at(step, total, cfg.lr, cfg.schedule)
                x, y = x.to(device), y.to(device)
                loss = training_loss(loss_fn, model(x), y)
                if not torch.isfinite(loss):
                    raise TrainingDiverged(
                        f"{desc}: the loss became {loss.item()} at epoch {epoch + 1}; lower the learning rate"
                    )
                opt.zero_grad(set_to_none=True)
                loss.backward()
                hooks.after_backward(step, total)
                opt.step()
                running += loss.item() * len(y)
                seen += len(y)
                step += 1
                bar.update(1)
            val_acc, val_loss = accuracy_and_loss(model, val_loader, device)
            metrics = {"loss": running / max(seen, 1), "val_acc": val_acc, "val_loss": val_loss}
            bar.set_postfix(
                epoch=f"{epoch + 1}/{cfg.epochs}", loss=f"{metrics['loss']:.3f}", val_acc=f"{metrics['val_acc']:.3f}"
            )
            history.append(metrics)
            hooks.on_epoch_end(epoch, metrics)
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
