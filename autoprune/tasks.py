"""Tasks: a model factory, train / validation / test data and an input shape.

Built-ins: ``digits`` (the embedded default, scikit-learn's bundled handwritten digits),
``cifar10`` (a local CIFAR-10 python-format directory, never downloaded) and ``imagefolder``
(a local folder of class sub-folders, any torchvision classifier). A user task is
``package.module:function`` returning a :class:`Task`.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from .config import TaskConfig
from .errors import AutopruneError
from .models import SMALL_MODELS, torchvision_model, torchvision_model_names
from .registry import Registry, load_object

# A task builder takes the TaskConfig (model name, data dir, ...) and returns a Task.
TASKS: Registry[Callable[[TaskConfig], Task]] = Registry("task")


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

    def loader(self, split: str, shuffle: bool = False, seed: int = 0) -> DataLoader:
        dataset = {"train": self.train, "val": self.val, "test": self.test}[split]
        generator = torch.Generator().manual_seed(seed) if shuffle else None
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


def get_task(config: TaskConfig) -> Task:
    """Resolve a task by name (or ``package.module:function``) and build its data."""
    if ":" in config.name:
        builder = load_object(config.name, "task")
        if not callable(builder):
            raise AutopruneError(f"task {config.name!r} is not callable")
        task = builder(config) if _takes_argument(builder) else builder()
        if not isinstance(task, Task):
            raise AutopruneError(f"task {config.name!r} must return autoprune.tasks.Task, got {type(task).__name__}")
        task.options.setdefault("spec", config.name)
        return task
    return TASKS.get(config.name)(config)


def check_task_config(config: TaskConfig) -> None:
    """Cheap checks of names and paths, before any data is read or model trained."""
    if ":" in config.name:
        return
    TASKS.get(config.name)
    if config.name == "digits":
        _small_model_name(config.model, "digits_resnet", ["digits_resnet"])
    elif config.name == "cifar10":
        _small_model_name(config.model, "resnet20", ["resnet20", "resnet56", "plain20"])
        _data_dir(config, "cifar10")
    elif config.name == "imagefolder":
        _torchvision_model_name(config.model)
        _data_dir(config, "imagefolder")


def _takes_argument(fn: Callable) -> bool:
    import inspect

    try:
        return len(inspect.signature(fn).parameters) > 0
    except (TypeError, ValueError):
        return False


def _small_model_name(name: str | None, default: str, allowed: list[str]) -> str:
    name = name or default
    if name not in allowed:
        raise AutopruneError(f"unknown model {name!r} for this task; choose one of: {', '.join(allowed)}")
    return name


def _torchvision_model_name(name: str | None) -> str:
    name = name or "resnet18"
    names = torchvision_model_names()
    if name not in names:
        raise AutopruneError(
            f"unknown model {name!r} for task imagefolder; any torchvision classification model: {', '.join(names)}"
        )
    return name


def _data_dir(config: TaskConfig, task: str) -> Path:
    if not config.data_dir:
        raise AutopruneError(f"task {task!r} needs --data-dir (a local directory; nothing is downloaded)")
    path = Path(config.data_dir).expanduser()
    if not path.is_dir():
        raise AutopruneError(f"--data-dir {str(path)!r} does not exist or is not a directory")
    return path


# ---------------------------------------------------------------- digits (the default)


@TASKS.register("digits")
def digits_task(config: TaskConfig) -> Task:
    """scikit-learn's 1,797 bundled 8x8 digits; fixed stratified 64/16/20 train/val/test split."""
    from sklearn.datasets import load_digits

    model = _small_model_name(config.model, "digits_resnet", ["digits_resnet"])
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = (x - 0.3) / 0.4  # roughly zero-mean, unit-variance pixels
    y = torch.tensor(data.target, dtype=torch.long)
    rest, test = stratified_split(data.target, 0.2, seed=0)
    train, val = stratified_split(data.target[rest], 0.2, seed=1)
    train, val = rest[train], rest[val]

    def subset(idx: np.ndarray) -> TensorDataset:
        return TensorDataset(x[idx], y[idx])

    return Task(
        name="digits",
        model_name=model,
        model_factory=lambda: SMALL_MODELS.get(model)(10, 1),
        train=subset(train),
        val=subset(val),
        test=subset(test),
        input_shape=(1, 8, 8),
        num_classes=10,
        train_epochs=30,
        train_lr=0.1,
        batch_size=config.batch_size,
    )


# ---------------------------------------------------------------- cifar10 (local files)


def _cifar10_class() -> type:
    from torchvision.datasets import CIFAR10

    class LocalCIFAR10(CIFAR10):
        """torchvision's CIFAR-10 reader that never downloads and accepts any local copy in
        the python format (the checksums of the official archive are not required)."""

        def _check_integrity(self) -> bool:
            folder = os.path.join(self.root, self.base_folder)
            names = [n for n, _ in self.train_list + self.test_list] + [self.meta["filename"]]
            return all(os.path.isfile(os.path.join(folder, n)) for n in names)

        def _load_meta(self) -> None:
            import pickle

            path = os.path.join(self.root, self.base_folder, self.meta["filename"])
            with open(path, "rb") as f:  # the dataset's own format (python pickles)
                self.classes = pickle.load(f, encoding="latin1")[self.meta["key"]]
            self.class_to_idx = {c: i for i, c in enumerate(self.classes)}

    return LocalCIFAR10


@TASKS.register("cifar10")
def cifar10_task(config: TaskConfig) -> Task:
    """CIFAR-10 from ``--data-dir`` (holding ``cifar-10-batches-py``); 10% of train is validation."""
    import torchvision.transforms as T

    model = _small_model_name(config.model, "resnet20", ["resnet20", "resnet56", "plain20"])
    root = _data_dir(config, "cifar10")
    if not (root / "cifar-10-batches-py").is_dir() and (root.name == "cifar-10-batches-py"):
        root = root.parent
    cls = _cifar10_class()
    normalize = T.Compose([T.ToTensor(), T.Normalize((0.4914, 0.4822, 0.4465), (0.247, 0.243, 0.261))])
    try:
        full = cls(str(root), train=True, transform=normalize, download=False)
        test = cls(str(root), train=False, transform=normalize, download=False)
    except RuntimeError:
        raise AutopruneError(
            f"--data-dir {str(root)!r} holds no CIFAR-10 python-format data: expected "
            "cifar-10-batches-py/ with data_batch_1..5, test_batch and batches.meta"
        ) from None
    train_idx, val_idx = stratified_split(np.asarray(full.targets), 0.1, seed=0)
    return Task(
        name="cifar10",
        model_name=model,
        model_factory=lambda: SMALL_MODELS.get(model)(10, 3),
        train=Subset(full, train_idx.tolist()),
        val=Subset(full, val_idx.tolist()),
        test=test,
        input_shape=(3, 32, 32),
        num_classes=10,
        train_epochs=30,
        train_lr=0.1,
        batch_size=config.batch_size,
        options={"data_dir": str(root)},
    )


# ---------------------------------------------------------------- imagefolder (local files)


@TASKS.register("imagefolder")
def imagefolder_task(config: TaskConfig) -> Task:
    """A local ImageFolder: ``train/`` and ``val/`` (or ``test/``) sub-folders of classes, or a
    single folder of classes split 70/15/15 (stratified, seeded). Untrained unless a checkpoint
    is given."""
    import torchvision.transforms as T
    from torchvision.datasets import ImageFolder

    model = _torchvision_model_name(config.model)
    root = _data_dir(config, "imagefolder")
    size = config.image_size or 224
    transform = T.Compose(
        [
            T.Resize(size),
            T.CenterCrop(size),
            T.ToTensor(),
            T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
        ]
    )

    def folder(path: Path) -> ImageFolder:
        try:
            return ImageFolder(str(path), transform=transform)
        except (FileNotFoundError, RuntimeError) as exc:
            raise AutopruneError(f"--data-dir {str(path)!r} is not an image folder: {exc}") from None

    held_out = next((root / n for n in ("val", "test") if (root / n).is_dir()), None)
    if (root / "train").is_dir() and held_out is not None:
        full = folder(root / "train")
        test: Dataset = folder(held_out)
        train_idx, val_idx = stratified_split(labels_of(full), 0.15, seed=0, where=str(root / "train"))
        train, val = Subset(full, train_idx.tolist()), Subset(full, val_idx.tolist())
    else:
        # one folder of classes; a lone train/ (no val/ or test/) is that folder
        single = root / "train" if (root / "train").is_dir() else root
        full = folder(single)
        labels = labels_of(full)
        rest, test_idx = stratified_split(labels, 0.15, seed=0, where=str(single))
        train_idx, val_idx = stratified_split(labels[rest], 0.15 / 0.85, seed=1, where=str(single))
        train, val = Subset(full, rest[train_idx].tolist()), Subset(full, rest[val_idx].tolist())
        test = Subset(full, test_idx.tolist())
    num_classes = len(full.classes)
    return Task(
        name="imagefolder",
        model_name=model,
        model_factory=lambda: torchvision_model(model, num_classes),
        train=train,
        val=val,
        test=test,
        input_shape=(3, size, size),
        num_classes=num_classes,
        train_epochs=0,
        train_lr=0.01,
        batch_size=config.batch_size,
        options={"data_dir": str(root), "image_size": size},
    )
