"""Saving and loading models; every file is data (exporting for deployment is :mod:`.export`).

Files load with ``torch.load(weights_only=True)``. A saved pruned model is a validated
record (:class:`ModelRecord`): weights, the pruning history replayed on the dense
architecture, the policy and the task it was pruned on. The task record *describes*; it is
never acted on by itself: loading a model never imports the module of a user task nor reads
a data directory unless the user names them again (``--task``, ``--data-dir``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import os
import re
from collections import OrderedDict
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import STRUCTURES, Policy, TaskConfig
from ..errors import AutopruneError
from ..schema import Spec, checked, choice, from_dict, mapping, nested, text, validate

FORMAT = "autoprune.pruned/1"
DATA_TASKS = ("cifar10", "imagefolder")  # built-in tasks that read a user-named directory


# ------------------------------------------------------------------ state dicts and files


def cpu_state(model: nn.Module) -> OrderedDict:
    """``model``'s state dict on the CPU, keeping PyTorch's ``_metadata`` (module versions,
    which some loaders such as torchvision's mnasnet check)."""
    state = model.state_dict()
    out = OrderedDict((k, v.detach().cpu()) for k, v in state.items())
    metadata = getattr(state, "_metadata", None)
    if metadata is not None:
        out._metadata = metadata  # type: ignore[attr-defined]
    return out


def room_to_save(model: torch.nn.Module) -> int:
    """Bytes that saving ``model`` (or a pruned copy, which is smaller) needs on disk at most:
    its tensors twice (the file and its temporary copy, :func:`atomic_save`) and 1 MiB."""
    size = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    return 2 * size + (1 << 20)


def atomic_save(obj: Any, path: Path) -> None:
    """Write ``obj`` with ``torch.save`` to a temporary file, then rename it into place: an
    interrupted run never leaves a torn file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        torch.save(obj, tmp)
        tmp.replace(path)
    except (OSError, RuntimeError) as exc:  # torch reports a failed write as RuntimeError("[enforce fail ...")
        if isinstance(exc, RuntimeError) and "enforce fail" not in str(exc) and "write" not in str(exc):
            raise
        raise AutopruneError(f"{str(path)!r} could not be written: {write_failure(exc, path.parent)}") from None
    finally:
        tmp.unlink(missing_ok=True)


def write_failure(exc: BaseException, folder: Path) -> str:
    """Why a write failed, in words: the OS's reason, or (torch's own errors say little) the
    free space left where it was written."""
    import shutil

    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return "the write failed"
    return f"the write failed with {free / 2**20:.1f} MiB free there (a full disk, or a file size limit)"


def load_tensors(path: str | Path, what: str) -> Any:
    """``torch.load(path, weights_only=True)`` with one-line errors: a missing, empty or
    foreign file, or one that asks to unpickle anything but tensors and plain containers."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise AutopruneError(f"{what} {str(path)!r} is a directory, not a file")
    if not path.exists():
        raise AutopruneError(f"{what} {str(path)!r} does not exist")
    if not path.is_file():  # a device, a named pipe, a socket: reading one may never end
        raise AutopruneError(f"{what} {str(path)!r} is not a regular file")
    if path.stat().st_size == 0:
        raise AutopruneError(f"{what} {str(path)!r} is empty (0 bytes)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a corrupt or hostile file is the user's input
        text = str(exc)
        refused = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
        if refused:
            raise AutopruneError(
                f"{what} {str(path)!r} asks to load {refused.group(1)!r}; autoprune loads files as data only "
                "(tensors, numbers, strings and plain containers) and never runs what a file names"
            ) from None
        detail = re.search(r"WeightsUnpickler error:\s*(.+)", text, re.S)
        reason = " ".join((detail.group(1) if detail else text).split("Check the documentation")[0].split())
        reason = reason.split(". ")[0].rstrip(".")  # torch's first sentence; never its advice
        raise AutopruneError(
            f"{what} {str(path)!r} is not a readable torch file ({type(exc).__name__}: {reason or 'no detail'})"
        ) from None


def load_state(model: nn.Module, state: Any, what: str) -> None:
    """``model.load_state_dict(state)``, or one line naming what does not fit: missing and
    unexpected keys and shape mismatches (the first few of each, with counts)."""
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise AutopruneError(f"{what} is not a state dict (a mapping of names to tensors)")
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    problems = [
        f"{label}: {_few(items)}"
        for label, items in (("missing", missing), ("unexpected", unexpected), ("shape (file vs model)", shapes))
        if items
    ]
    if problems:
        raise AutopruneError(f"{what} does not fit the model: " + "; ".join(problems))
    broken = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if broken:  # else every score and metric downstream is NaN, and the criterion gets the blame
        raise AutopruneError(f"{what} holds NaN or infinite values: {_few(broken)}")
    try:
        model.load_state_dict(state)
    except Exception as exc:  # noqa: BLE001 - a module's own check of what it loads (versions, ...)
        raise AutopruneError(f"{what} cannot be loaded into the model: {str(exc).splitlines()[0]}") from None


def _few(items: list[str], n: int = 3) -> str:
    more = f" and {len(items) - n} more" if len(items) > n else ""
    return ", ".join(items[:n]) + more


def architecture_key(model: nn.Module, source: bool = False) -> str:
    """A short hash of a model's architecture: its state-dict names and shapes and, with
    ``source``, the source code of its module classes (so an edited user model is noticed
    even when the shapes stay)."""
    h = hashlib.sha256()
    for name, value in model.state_dict().items():
        h.update(f"{name}:{tuple(value.shape)}:{value.dtype};".encode())
    if source:
        for cls in sorted({type(m) for m in model.modules()}, key=lambda c: f"{c.__module__}.{c.__qualname__}"):
            h.update(_class_source(cls).encode())
    return h.hexdigest()[:16]


@cache
def _class_source(cls: type) -> str:
    try:
        return inspect.getsource(cls)
    except (OSError, TypeError):  # built in, or defined interactively
        return f"{cls.__module__}.{cls.__qualname__}"


# ------------------------------------------------------------------ the saved pruned model


def _history(value: Any) -> str | None:
    ok = isinstance(value, list) and all(
        isinstance(step, list)
        and len(step) == 3
        and isinstance(step[0], str)
        and (isinstance(step[1], bool) or step[1] == "heads")
        and isinstance(step[2], list)
        and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in step[2])
        for step in value
    )
    return (
        None
        if ok
        else "must be a list of [layer name, is_out_channel, [channel indices]] or [attention, 'heads', [heads]] steps"
    )


def _tensors(value: dict) -> str | None:
    return None if all(isinstance(v, torch.Tensor) for v in value.values()) else "must map names to tensors"


@dataclass
class ModelRecord:
    """What a pruned-model file holds; every field is checked on load."""

    format: str = checked(choice((FORMAT,)))
    task: TaskConfig = checked(nested(TaskConfig))  # the task it was pruned on (a description only)
    structure: str = checked(choice(STRUCTURES))
    history: list = checked(Spec("any", extra=_history))  # channel removals, replayed on the dense model
    policy: Policy = checked(nested(Policy))
    metrics: dict = checked(mapping())
    state_dict: dict = checked(mapping(extra=_tensors))
    arch: str | None = checked(text(optional=True), None)  # architecture_key of the dense model

    def __post_init__(self) -> None:
        validate(self, "model file", flags_first=False)


def save_model(
    path: str | Path,
    model: nn.Module,
    task_config: TaskConfig,
    structure: str,
    history: list,
    policy: dict[str, Any],
    metrics: dict[str, Any],
    arch: str | None = None,
) -> None:
    """Write a self-describing pruned model: weights, pruning history, policy, metrics and
    (``arch``) the dense architecture's key, checked when it is loaded."""
    from .prune import fold_masks

    fold_masks(model)
    blob = {
        "format": FORMAT,
        "task": dataclasses.asdict(task_config),
        "structure": structure,
        "history": history,
        "policy": policy,
        "metrics": metrics,
        "state_dict": cpu_state(model),
        "arch": arch,
    }
    atomic_save(blob, Path(path))


def read_model_file(path: str | Path) -> ModelRecord:
    """The checked record of a pruned-model file."""
    blob = load_tensors(path, "model file")
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise AutopruneError(
            f"{str(path)!r} is not an autoprune pruned model (written by `autoprune prune` or "
            "`autoprune search`); a dense checkpoint is passed with --checkpoint instead"
        )
    try:
        return from_dict(ModelRecord, blob, "model file")
    except AutopruneError as exc:
        raise AutopruneError(f"{str(path)!r} holds a bad record: {exc}") from None


def task_for_model(record: TaskConfig, given: dict[str, Any], path: str | Path) -> TaskConfig:
    """The task to rebuild a saved model with: the file's record, overridden by what the user
    named. The file alone never selects code to import or a directory to read."""
    merged = from_dict(TaskConfig, {**dataclasses.asdict(record), **given}, "task")
    if ":" in merged.name and "name" not in given:
        raise AutopruneError(
            f"{str(path)!r} was pruned on the user task {record.name!r}; a model file never makes autoprune "
            f"import code: name the task again with --task {record.name}"
        )
    if merged.name in DATA_TASKS and "data_dir" not in given:
        if merged.name != record.name:  # the user named the task; its data is missing
            raise AutopruneError(f"task {merged.name!r} needs --data-dir (a local directory; nothing is downloaded)")
        raise AutopruneError(
            f"{str(path)!r} was pruned on task {merged.name!r} (data in {record.data_dir!r}); a model file never "
            "makes autoprune read a directory: name the data again with --data-dir DIR"
        )
    return merged


def reload_flags(task: TaskConfig) -> str:
    """The flags a model saved from ``task`` needs when it is loaded again (see
    :func:`task_for_model`): ``--task`` for a user task, ``--data-dir`` for a data task."""
    flags = f" --task {task.name}" if ":" in task.name else ""
    if task.name in DATA_TASKS or (":" in task.name and task.data_dir):
        flags += f" --data-dir {task.data_dir}"
    return flags


def check_history_length(history: list, model, path: str | Path) -> None:
    """A pruning history removes each channel (or head) of the model at most once: more steps
    or indices than the model's weights have rows and columns come from an altered file, whose
    replay would only keep the loader busy."""
    capacity = sum(sum(p.shape[:2]) for p in model.parameters() if p.dim() >= 1)
    removed = sum(len(step[2]) for step in history)
    if len(history) > capacity or removed > capacity:
        raise AutopruneError(
            f"{str(path)!r} holds a pruning history of {len(history)} steps removing {removed} channels, more than "
            f"the model has ({capacity}): it was altered"
        )


def load_model(path: str | Path, task: TaskConfig | dict[str, Any] | None = None):
    """Rebuild a saved pruned model: (model, task, record). ``task`` is what the user names:
    a whole :class:`TaskConfig`, or only some of its fields (a dict; the CLI's flags)."""
    from .graph import replay_history
    from .tasks import get_task

    record = read_model_file(path)
    given = dataclasses.asdict(task) if isinstance(task, TaskConfig) else dict(task or {})
    config = task_for_model(record.task, given, path)
    built = get_task(config)
    model = built.model_factory()
    saved_on = f"model {record.task.model or 'default'!r} of task {record.task.name!r}"
    other = (
        f"{str(path)!r} was pruned from {saved_on}; task {config.name!r} builds model {built.model_name!r}, "
        "a different architecture: load it with the task and model it was pruned on"
    )
    if record.arch is not None and architecture_key(model) != record.arch:
        raise AutopruneError(other)
    if record.history:
        check_history_length(record.history, model, path)
        try:
            replay_history(model, built.example_input(), record.history)
        except Exception:  # noqa: BLE001 - the history names layers this model does not have
            raise AutopruneError(other) from None
    load_state(model, record.state_dict, f"the weights in {str(path)!r}")
    return model.eval(), built, record
