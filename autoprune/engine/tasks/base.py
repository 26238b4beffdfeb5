"""The task interface and registry: a model factory, train / validation / test data and an
input shape; and how a task is looked up and checked."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from ...config import TaskConfig
from ...contract import declare_metric
from ...errors import AutopruneError, first_line
from ...registry import Registry, load_object
from ..inputs import model_input
from ..models import all_tensors, first_tensor, torchvision_model_names
from .metrics import Accuracy, Metric


@dataclass
class Task:
    """Everything the engine needs to know about a problem.

    The defaults are classification: cross-entropy, accuracy, batches ``(inputs, labels)``,
    a model returning logits, and autoprune's SGD recipe. A task of another kind, or one with
    its own recipe, sets what differs:

    * ``loss(outputs, target) -> tensor``: ``outputs`` as the model returns them (a tensor, a
      tuple, a dict or an output object), ``target`` the batch's target; the default is
      cross-entropy on the prediction (plus ``AUX_WEIGHT`` times each auxiliary output's in
      training: googlenet, inception, segmentation heads' ``aux``);
    * ``metric``: a :class:`~autoprune.engine.tasks.metrics.Metric` (name, direction),
      accumulated over a split; reported as ``val_<name>`` / ``test_<name>`` and what the
      search ranks on;
    * ``output``: which of the model's outputs is the prediction (a key, an index or a
      function of the outputs); default the first tensor (a dict's first value: a
      torchvision segmentation model's ``out``, a HuggingFace output's ``logits``);
    * ``input_key`` / ``target_key``: where a batch holds its inputs and target (a tuple's
      index, a dict's key);
    * ``train_step(model, inputs, target) -> loss``: the user's own forward pass and loss
      (augmentation, label smoothing, mixed precision); autoprune still zeroes the gradients,
      calls backward, runs the pruning method's hooks and steps the optimiser;
    * ``optimizer(params, lr, total_steps) -> optimizer`` (or ``(optimizer, scheduler)``,
      the scheduler stepped once per step): the user's optimiser and schedule, for the dense
      training and every fine-tuning;
    * ``evaluate(model, loader) -> float``: the user's own evaluation of a split (its
      ``(inputs, target)`` batches), in eval mode without gradients; it replaces the metric's
      value, ``metric`` still names it and gives its direction.
    """

    name: str  # task name, recorded in saved models
    model_name: str  # model name within the task
    model_factory: Callable[[], nn.Module]  # returns a fresh, untrained model
    train: Dataset  # fine-tuning and scoring data
    val: Dataset  # decisions (search, model selection)
    test: Dataset  # the final report only
    input_shape: tuple[int, ...]  # one sample's shape, e.g. (1, 8, 8); Tokens((64,), vocab) for token ids
    num_classes: int = 0  # classes of a classification task (0: not one)
    train_epochs: int = 0  # default dense training epochs (0: use the untrained model)
    train_lr: float = 0.1  # dense training peak learning rate (SGD, cosine)
    batch_size: int = 64
    options: dict = field(default_factory=dict)  # what rebuilds this task (saved with models)
    metric: Metric = field(default_factory=Accuracy)
    loss: Callable[[Any, Any], torch.Tensor] | None = None
    output: str | int | Callable[[Any], torch.Tensor] | None = None
    input_key: str | int = 0
    target_key: str | int = 1
    train_step: Callable[[nn.Module, Any, Any], torch.Tensor] | None = None
    optimizer: Callable[..., Any] | None = None
    evaluate: Callable[[nn.Module, Any], float] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.metric, Metric):
            raise AutopruneError(
                f"task {self.name!r}: metric must be an autoprune Metric (Accuracy, MeanIoU, RMSE, MAE or a "
                f"subclass), got {type(self.metric).__name__}"
            )
        name = str(getattr(self.metric, "name", ""))
        if not name.isidentifier() or name != name.lower():
            raise AutopruneError(f"task {self.name!r}: a metric's name must be a lower-case identifier, got {name!r}")
        for what in ("loss", "output", "train_step", "optimizer", "evaluate"):
            value = getattr(self, what)
            if what != "output" and value is not None and not callable(value):
                raise AutopruneError(f"task {self.name!r}: {what} must be callable, got {type(value).__name__}")
        declare_metric(name, self.metric.mode, self.metric.percent)
        if (self.input_key, self.target_key) == (0, 1) and isinstance(_first_sample(self.train), dict):
            raise AutopruneError(
                f"task {self.name!r}: its samples are dicts; set input_key and target_key to the keys of the "
                "model's input and the target"
            )

    def metric_key(self, split: str = "val") -> str:
        """``val_<metric name>`` (or ``test_...``): the key the task's metric is reported under."""
        return f"{split}_{self.metric.name}"

    def metric_info(self) -> dict[str, Any]:
        """The metric as summaries record it: its name, its keys and which way is better."""
        m = self.metric
        return {"name": m.name, "key": self.metric_key(), "mode": m.mode, "percent": m.percent}

    def loader(self, split: str, shuffle: bool = False, seed: int = 0, device: torch.device | None = None):
        """Batches of ``split`` as ``(inputs, target)`` pairs, shuffled by ``seed``. An
        in-memory dataset (the built-in ones) on ``device`` is batched where it lies: it is
        copied there once per process and indexed in place, in the order a DataLoader with
        the same seed gives. Other datasets (image folders, dict samples), and CIFAR-10 on the
        CPU, go through a DataLoader."""
        dataset = {"train": self.train, "val": self.val, "test": self.test}[split]
        generator = torch.Generator().manual_seed(seed) if shuffle else None
        pairs = (self.input_key, self.target_key) == (0, 1)  # batches already are (inputs, target)
        if device is not None and pairs:
            held = on_device(self, split, dataset, torch.device(device))
            if held is not None:
                return TensorBatches(*held, self.batch_size, generator)
        loader = DataLoader(dataset, batch_size=self.batch_size, shuffle=shuffle, generator=generator)
        return loader if pairs else Pairs(loader, self)

    def split(self, batch) -> tuple[Any, Any]:
        """``(inputs, target)`` of a batch (or one sample)."""
        try:
            return batch[self.input_key], batch[self.target_key]
        except (KeyError, IndexError, TypeError) as exc:
            raise AutopruneError(
                f"task {self.name!r}: a batch of type {type(batch).__name__} has no input {self.input_key!r} and "
                f"target {self.target_key!r} ({type(exc).__name__}: {exc}); set the task's input_key and target_key"
            ) from None

    def prediction(self, outputs) -> torch.Tensor:
        """The tensor of the model's ``outputs`` that the metric reads (see ``output``)."""
        if callable(self.output):
            return self.output(outputs)
        if self.output is not None:
            if isinstance(self.output, str) and not isinstance(outputs, dict):
                return getattr(outputs, self.output)
            return outputs[self.output]
        found = first_tensor(outputs)
        if found is None:
            raise AutopruneError(
                f"task {self.name!r}: the model returned {type(outputs).__name__} with no tensor in it; "
                "set the task's output (a key, an index or a function) to pick the prediction"
            )
        return found

    def loss_of(self, outputs, target, train: bool = False) -> torch.Tensor:
        """The task's loss of ``outputs`` against ``target`` (in training the default loss
        adds auxiliary outputs' losses, see :func:`training_loss`)."""
        if self.loss is not None:
            return self.loss(outputs, target)
        if train and self.output is None:
            return training_loss(nn.functional.cross_entropy, outputs, target)
        return nn.functional.cross_entropy(self.prediction(outputs).float(), target)

    def example_input(self, batch: int = 1) -> torch.Tensor:
        return model_input(self.input_shape, batch, generator=torch.Generator().manual_seed(0))

    def key(self, extra: dict) -> str:
        """A short hash identifying (task, model, options, extra): the dense-model cache key."""
        blob = json.dumps(
            {"task": self.name, "model": self.model_name, "options": self.options, **extra},
            sort_keys=True,
            default=str,
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _first_sample(dataset: Dataset):
    try:
        return dataset[0] if len(dataset) else None
    except Exception:  # the user's dataset: whatever it raises, the loader will raise it again
        return None


AUX_WEIGHT = 0.3  # GoogLeNet's weight for its auxiliary classifiers' losses


def training_loss(loss_fn, output, y: torch.Tensor) -> torch.Tensor:
    """The loss of a train-mode output: the main output's, plus ``AUX_WEIGHT`` times each
    auxiliary output's of the same shape (googlenet, inception_v3 return auxiliary
    classifiers beside the logits in training; segmentation models an ``aux`` map)."""
    outs = all_tensors(output)
    loss = loss_fn(outs[0].float(), y)
    for aux in outs[1:]:
        if aux.shape == outs[0].shape:
            loss = loss + AUX_WEIGHT * loss_fn(aux.float(), y)
    return loss


class Pairs:
    """A DataLoader's batches as ``(inputs, target)`` pairs (:meth:`Task.split`)."""

    def __init__(self, loader: DataLoader, task: Task) -> None:
        self.loader, self.task = loader, task

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for batch in self.loader:
            yield self.task.split(batch)


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


def labels_of(dataset: Dataset, key: str | int = 1) -> np.ndarray:
    """Class labels of every sample (``sample[key]``), without decoding images where the
    dataset knows them."""
    if isinstance(dataset, Subset):
        return labels_of(dataset.dataset, key)[np.asarray(dataset.indices)]
    if isinstance(dataset, TensorDataset):
        return dataset.tensors[1].numpy()
    targets = getattr(dataset, "targets", None)
    if targets is not None:
        return np.asarray(targets)
    return np.asarray([int(dataset[i][key]) for i in range(len(dataset))])


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
