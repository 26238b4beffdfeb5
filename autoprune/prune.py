"""Applying a plan: channel removal or weight masks; saving, loading and exporting models.

Saved models are weights plus the pruning history, replayed on the dense architecture, and
load with ``torch.load(weights_only=True)``: no pickled code runs on load.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

from .config import TaskConfig
from .errors import AutopruneError
from .graph import PRUNABLE_TYPES, PrunableGraph, clone, replay_history

FORMAT = "autoprune.pruned/1"


def prune_channels(model: nn.Module, example_input: torch.Tensor, plan: dict[str, np.ndarray]):
    """A copy of ``model`` with the planned channels physically removed, and its history."""
    pruned = clone(model)
    graph = PrunableGraph(pruned, example_input)
    graph.prune(plan)
    return pruned, graph.history()


def mask_weights(model: nn.Module, counts: dict[str, int], scores: dict[str, torch.Tensor]) -> None:
    """Mask the ``counts[name]`` lowest-scored weights of each layer, in place. The masks stay
    applied through training (torch's pruning reparametrisation) until :func:`fold_masks`."""
    modules = dict(model.named_modules())
    for name, k in counts.items():
        module = modules[name]
        mask = torch.ones(module.weight.numel(), device=module.weight.device)
        if k > 0:
            order = torch.argsort(scores[name].flatten().double(), stable=True)
            mask[order[:k].to(mask.device)] = 0.0
        torch_prune.custom_from_mask(module, "weight", mask.view_as(module.weight))


def fold_masks(model: nn.Module) -> None:
    """Make masks permanent: the masked weights become plain zeros."""
    for module in model.modules():
        if isinstance(module, PRUNABLE_TYPES) and torch_prune.is_pruned(module):
            if hasattr(module, "weight_mask"):
                torch_prune.remove(module, "weight")


def current_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: m.weight_mask for n, m in model.named_modules() if hasattr(m, "weight_mask")}


def save_model(
    path: str | Path,
    model: nn.Module,
    task_config: TaskConfig,
    structure: str,
    history: list,
    policy: dict[str, Any],
    metrics: dict[str, Any],
) -> None:
    """Write a self-describing pruned model: weights, pruning history, policy, metrics."""
    fold_masks(model)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    blob = {
        "format": FORMAT,
        "task": dataclasses.asdict(task_config),
        "structure": structure,
        "history": history,
        "policy": policy,
        "metrics": metrics,
        "state_dict": state,
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(blob, tmp)
    tmp.replace(path)


def read_model_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise AutopruneError(f"model file {str(path)!r} does not exist")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a corrupt or foreign file is the user's input
        raise AutopruneError(f"cannot read model file {str(path)!r}: {exc}") from None
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise AutopruneError(
            f"{str(path)!r} is not an autoprune pruned model (written by `autoprune prune` or "
            "`autoprune search`); a dense checkpoint is passed with --checkpoint instead"
        )
    return blob


def load_model(path: str | Path, task_config: TaskConfig | None = None):
    """Rebuild a saved pruned model: (model, task, blob). ``task_config`` overrides the
    task the file records (for example a data directory that moved)."""
    from .tasks import get_task

    blob = read_model_file(path)
    config = task_config or TaskConfig(**blob["task"])
    task = get_task(config)
    model = task.model_factory()
    if blob["history"]:
        replay_history(model, task.example_input(), blob["history"])
    try:
        model.load_state_dict(blob["state_dict"])
    except RuntimeError as exc:
        raise AutopruneError(
            f"the weights in {str(path)!r} do not fit task {config.name!r} / model "
            f"{task.model_name!r}: {str(exc).splitlines()[0]}"
        ) from None
    return model.eval(), task, blob


def export_model(model: nn.Module, example_input: torch.Tensor, out: str | Path, fmt: str) -> Path:
    """Export for deployment: ``pt2`` (torch.export) or ``onnx`` (needs the onnx extra)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    if fmt == "pt2":
        program = torch.export.export(model, (example_input,))
        torch.export.save(program, str(out))
    elif fmt == "onnx":
        try:
            import onnx  # noqa: F401
            import onnxscript  # noqa: F401
        except ImportError:
            raise AutopruneError("ONNX export needs the onnx extra: pip install 'autoprune[onnx]'") from None
        torch.onnx.export(model, (example_input,), str(out), dynamo=True, verbose=False)
    else:
        raise AutopruneError(f"unknown export format {fmt!r}; choose one of: pt2, onnx")
    return out
