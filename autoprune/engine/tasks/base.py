"""The task interface and registry: a model factory, train / validation / test data and an
input shape; and how a task is looked up and checked."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from ...config import TaskConfig
from ...errors import AutopruneError, first_line
from ...registry import Registry, load_object
from ..models import torchvision_model_names


@dataclass
class Task:
    """Everything the engine needs to know about a problem."""

    name: str  # task name, recorded in saved models
    model_name: str  # model name within the task
    model_factory: Callable[[], nn.Module]  # returns a fresh, untrained model
    train: Dataset  # fine-tuning and scoring data
    val: Dataset  # decisions (search, model selection)
    test: Dataset  # the final report only
    input_shape: tuple[int, ...]  # one sample's shape, e.g. (1, 8, 8)
    num_classes: int
    train_epochs: int = 0  # default dense training epochs (0: use the untrained model)
    train_lr: float = 0.1  # dense training peak learning rate (SGD, cosine)
    batch_size: int = 64
    options: dict = field(default_factory=dict)  # what rebuilds this task (saved with models)

    def loader(self, split: str, shuffle: bool = False, seed: int = 0, device: torch.device | None = None):
        """Batches of ``split``, shuffled by ``seed``. An in-memory dataset (the built-in
        ones) on ``device`` is batched where it lies: it is copied there once per process and
        indexed in place, in the order a DataLoader with the same seed gives. Other datasets
        (image folders), and CIFAR-10 on the CPU, go through a DataLoader."""
        dataset = {"train": self.train, "val": self.val, "test": self.test}[split]
        generator = torch.Generator().manual_seed(seed) if shuffle else None
        if device is not None:
            held = on_device(self, split, dataset, torch.device(device))
            if held is not None:
                return TensorBatches(*held, self.batch_size, generator)
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=shuffle, generator=generator)

    def example_input(self, batch: int = 1) -> torch.Tensor:
        return torch.randn(batch, *self.input_shape, generator=torch.Generator().manual_seed(0))

    def key(self, extra: dict) -> str:
        """A short hash identifying (task, model, options, extra): the dense-model cache key."""
        blob = json.dumps(
            {"task": self.name, "model": self.model_name, "options": self.options, **extra},
            sort_keys=True,
            default=str,
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


class TensorBatches:
    """A split's samples and labels as two tensors on one device, batched by indexing."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, generator: torch.Generator | None) -> None:
        self.x, self.y, self.batch_size, self.generator = x, y, batch_size, generator

    def __len__(self) -> int:
        return -(-len(self.y) // self.batch_size)

    def __iter__(self):
        n, b = len(self.y), self.batch_size
        if self.generator is None:
            for i in range(0, n, b):
                yield self.x[i : i + b], self.y[i : i + b]
            return
        # the draws a DataLoader makes from its generator, so a seed gives the same batches: its
        # iterator's base seed, the order, and (at the epoch's end) its sampler's unused remainder
        torch.empty((), dtype=torch.int64).random_(generator=self.generator)
        order = torch.randperm(n, generator=self.generator).to(self.x.device)
        for i in range(0, n, b):
            idx = order[i : i + b]
            yield self.x[idx], self.y[idx]
        torch.randperm(n, generator=self.generator)


_HELD: dict[tuple[str, str, str], tuple[torch.Tensor, torch.Tensor]] = {}  # (task key, split, device) -> tensors


def on_device(task: Task, split: str, dataset: Dataset, device: torch.device):
    """``dataset`` as (samples, labels) on ``device``, copied there once per process (one task
    at a time is held); None if it is not held in memory (or is large and ``device`` is the
    CPU, where batching it in place would only add a float copy)."""
    key = (task.key({}), split, str(device))
    if key in _HELD:
        return _HELD[key]
    tensors = _as_tensors(dataset, device.type != "cpu")
    if tensors is None:
        return None
    if any(k[0] != key[0] for k in _HELD):
        _HELD.clear()
    _HELD[key] = tuple(t.to(device) for t in tensors)
    return _HELD[key]


def _as_tensors(dataset: Dataset, large: bool):
    if isinstance(dataset, TensorDataset) and len(dataset.tensors) == 2:
        return dataset.tensors
    if isinstance(dataset, Subset):
        inner = _as_tensors(dataset.dataset, large)
        if inner is None:
            return None
        idx = torch.as_tensor(dataset.indices, dtype=torch.long)
        return inner[0][idx], inner[1][idx]
    if large and hasattr(dataset, "as_tensors"):
        return dataset.as_tensors()
    return None


def labels_of(dataset: Dataset) -> np.ndarray:
    """Class labels of every sample, without decoding images where the dataset knows them."""
    if isinstance(dataset, Subset):
        return labels_of(dataset.dataset)[np.asarray(dataset.indices)]
    if isinstance(dataset, TensorDataset):
        return dataset.tensors[1].numpy()
    targets = getattr(dataset, "targets", None)
    if targets is not None:
        return np.asarray(targets)
    return np.asarray([int(dataset[i][1]) for i in range(len(dataset))])


def stratified_split(
    labels: np.ndarray, fraction: float, seed: int, where: str = "the data"
) -> tuple[np.ndarray, np.ndarray]:
    """Indices (kept, carved) with ``fraction`` of every class carved out, seeded."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(labels))
    counts = np.bincount(np.asarray(labels, dtype=np.int64))
    counts = counts[counts > 0]
    carved_n = int(np.ceil(fraction * len(labels)))
    if counts.min() < 2 or carved_n < len(counts) or len(labels) - carved_n < len(counts):
        raise AutopruneError(
            f"{where} is too small to split: {len(labels)} samples in {len(counts)} classes "
            f"(smallest class {counts.min()}); a stratified {fraction:.0%} split needs at least 2 "
            f"samples per class and {len(counts)} on each side"
        )
    kept, carved = train_test_split(idx, test_size=fraction, stratify=labels, random_state=seed)
    return np.sort(kept), np.sort(carved)


@dataclass(frozen=True)
class TaskSpec:
    """A registered task: its builder and what it accepts. ``models``: the model names it
    builds (None: any torchvision classification model); ``default_model``: the model without
    ``--model``; ``data_dir``: whether it reads ``--data-dir``."""

    build: Callable[[TaskConfig], Task]
    models: tuple[str, ...] | None
    default_model: str
    data_dir: bool = False

    def model_names(self) -> list[str]:
        return list(self.models) if self.models is not None else torchvision_model_names()

    def model(self, config: TaskConfig) -> str:
        """The model ``config`` asks for, checked against what this task builds."""
        name = config.model or self.default_model
        allowed = self.model_names()
        if name not in allowed:
            what = "any torchvision classification model" if self.models is None else "choose one of"
            raise AutopruneError(f"unknown model {name!r} for task {config.name!r}; {what}: {', '.join(allowed)}")
        return name


# The built-in tasks, by name; a user task is ``package.module:function`` instead.
TASKS: Registry[TaskSpec] = Registry("task")


def task(name: str, models: tuple[str, ...] | None, default_model: str, data_dir: bool = False):
    """Register a task builder ``fn(config) -> Task`` with what it accepts (see :class:`TaskSpec`)."""

    def register(fn: Callable[[TaskConfig], Task]) -> Callable[[TaskConfig], Task]:
        TASKS.register(name)(TaskSpec(fn, models, default_model, data_dir))
        return fn

    return register


def get_task(config: TaskConfig) -> Task:
    """Resolve a task by name (or ``package.module:function``) and build its data."""
    if ":" in config.name:
        builder = load_object(config.name, "task")
        if not callable(builder):
            raise AutopruneError(f"task {config.name!r} is not callable")
        try:
            task = builder(config) if _takes_argument(builder) else builder()
        except AutopruneError:
            raise
        except Exception as exc:  # the user's code: one line naming it, like a failing --space
            raise AutopruneError(f"task {config.name!r} failed: {type(exc).__name__}: {first_line(exc)}") from exc
        if not isinstance(task, Task):
            raise AutopruneError(
                f"task {config.name!r} must return autoprune.engine.tasks.Task, got {type(task).__name__}"
            )
        task.options.setdefault("spec", config.name)
        return task
    return TASKS.get(config.name).build(config)


def check_task_config(config: TaskConfig) -> None:
    """Cheap checks of names and paths, before any data is read or model trained (values
    and ranges are the schema's: TaskConfig checks them when it is built)."""
    if ":" in config.name:
        return
    spec = TASKS.get(config.name)
    spec.model(config)
    if spec.data_dir:
        data_dir(config)


def model_name(config: TaskConfig) -> str:
    """The checked model name of a built-in task's config."""
    return TASKS.get(config.name).model(config)


def _takes_argument(fn: Callable) -> bool:
    import inspect

    try:
        return len(inspect.signature(fn).parameters) > 0
    except (TypeError, ValueError):
        return False


def data_dir(config: TaskConfig) -> Path:
    if not config.data_dir:
        raise AutopruneError(f"task {config.name!r} needs --data-dir (a local directory; nothing is downloaded)")
    path = Path(config.data_dir).expanduser()
    if not path.is_dir():
        raise AutopruneError(f"--data-dir {str(path)!r} does not exist or is not a directory")
    return path
