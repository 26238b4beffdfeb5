"""Tasks: a model factory, train / validation / test data and an input shape.

Built-ins: ``digits`` (the embedded default, scikit-learn's bundled handwritten digits),
``cifar10`` (a local CIFAR-10 python-format directory, never downloaded) and ``imagefolder``
(a local folder of class sub-folders, any torchvision classifier). A user task is
``package.module:function`` returning a :class:`Task`.
"""

from __future__ import annotations

import hashlib
import json
import numbers
import os
import pickle
import sys
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
    """Cheap checks of names and paths, before any data is read or model trained (values
    and ranges are the schema's: TaskConfig checks them when it is built)."""
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


CIFAR_FOLDER = "cifar-10-batches-py"
CIFAR_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR_FILES = (*CIFAR_TRAIN_FILES, "test_batch", "batches.meta")
CIFAR_PIXELS = 3 * 32 * 32


def _cifar_globals() -> dict[tuple[str, str], object]:
    """The only globals a CIFAR python-format batch may name: numpy's array and dtype
    reconstruction, under numpy 1.x and 2.x module names (``_frombuffer``: protocol 5 pickles;
    ``_codecs.encode``: bytes in protocol 0-2 pickles written by Python 3)."""
    import codecs

    try:
        from numpy._core import multiarray, numeric
    except ImportError:  # numpy < 2
        from numpy.core import multiarray, numeric
    table: dict[tuple[str, str], object] = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
    for package in ("numpy.core", "numpy._core"):
        table[(f"{package}.multiarray", "_reconstruct")] = multiarray._reconstruct
        table[(f"{package}.multiarray", "scalar")] = multiarray.scalar
        table[(f"{package}.numeric", "_frombuffer")] = numeric._frombuffer
    table[("_codecs", "encode")] = codecs.encode
    return table


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles plain data (dicts, lists, strings, numbers) and numpy arrays, nothing else."""

    def __init__(self, file, path: Path) -> None:
        super().__init__(file, encoding="latin1")  # the official batches are Python 2 pickles
        self.path = path
        self.allowed = _cifar_globals()

    def find_class(self, module: str, name: str) -> object:
        found = self.allowed.get((module, name))
        if found is None:
            raise AutopruneError(
                f"--data-dir file {str(self.path)!r} is not a plain CIFAR-10 batch: it asks to load "
                f"{f'{module}.{name}'!r}, which autoprune never unpickles"
            )
        return found


def _read_cifar_file(path: Path) -> dict:
    """One batch file as a dict with str keys, read by the restricted unpickler."""
    try:
        with open(path, "rb") as f:
            entry = _CifarUnpickler(f, path).load()
    except AutopruneError:
        raise
    except Exception as exc:  # noqa: BLE001 - anything a malformed pickle raises
        raise AutopruneError(
            f"--data-dir file {str(path)!r} cannot be read as a CIFAR-10 python-format batch "
            f"({type(exc).__name__}: {exc})"
        ) from None
    if not isinstance(entry, dict):
        raise AutopruneError(
            f"--data-dir file {str(path)!r} is not a CIFAR-10 batch: it holds a {type(entry).__name__}, not a dict"
        )
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in entry.items()}


def _cifar_labels(path: Path, labels: object, n: int) -> list[int]:
    where = f"--data-dir file {str(path)!r} is not a CIFAR-10 batch"
    if isinstance(labels, np.ndarray) and labels.ndim == 1 and np.issubdtype(labels.dtype, np.integer):
        labels = labels.tolist()
    if not isinstance(labels, (list, tuple)) or not all(
        isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in labels
    ):
        raise AutopruneError(f"{where}: 'labels' must be a list of integers 0..9, got {type(labels).__name__}")
    if len(labels) != n:
        raise AutopruneError(f"{where}: {len(labels)} labels for {n} images")
    bad = [int(v) for v in labels if not 0 <= v <= 9]
    if bad:
        raise AutopruneError(f"{where}: labels must lie in 0..9, found {bad[0]}")
    return [int(v) for v in labels]


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, list[int]]:
    """(images as N x 32 x 32 x 3 uint8, labels) of one data or test batch, validated."""
    entry = _read_cifar_file(path)
    where = f"--data-dir file {str(path)!r} is not a CIFAR-10 batch"
    missing = [k for k in ("data", "labels") if k not in entry]
    if missing:
        raise AutopruneError(f"{where}: it has no {' or '.join(repr(k) for k in missing)} entry")
    data = entry["data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim < 1:
        got = f"{data.dtype} array" if isinstance(data, np.ndarray) else type(data).__name__
        raise AutopruneError(f"{where}: 'data' must be a uint8 array of N x {CIFAR_PIXELS} pixels, got {got}")
    n = data.shape[0]
    if data.size != n * CIFAR_PIXELS:
        raise AutopruneError(
            f"{where}: 'data' must be a uint8 array of N x {CIFAR_PIXELS} pixels, got shape {data.shape}"
        )
    labels = _cifar_labels(path, entry["labels"], n)
    return data.reshape(n, 3, 32, 32).transpose(0, 2, 3, 1), labels


def _read_cifar_meta(path: Path) -> list[str]:
    entry = _read_cifar_file(path)
    names = entry.get("label_names")
    if isinstance(names, (list, tuple)):
        names = [v.decode("latin1") if isinstance(v, bytes) else v for v in names]
    if not isinstance(names, list) or len(names) != 10 or not all(isinstance(v, str) for v in names):
        raise AutopruneError(
            f"--data-dir file {str(path)!r} is not a CIFAR-10 batches.meta: 'label_names' must be a list "
            "of 10 class names"
        )
    return names


class CIFAR10Data(Dataset):
    """CIFAR-10 images read from local python-format batch files (what torchvision's CIFAR10
    holds, without its unrestricted unpickling): ``data`` (N, 32, 32, 3) uint8, ``targets``,
    ``classes``; a sample is the transformed PIL image and its label."""

    def __init__(self, data: np.ndarray, targets: list[int], classes: list[str], transform=None) -> None:
        self.data = data
        self.targets = targets
        self.classes = classes
        self.class_to_idx = {c: i for i, c in enumerate(classes)}
        self.transform = transform

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> tuple:
        from PIL import Image

        img = Image.fromarray(self.data[index])
        if self.transform is not None:
            img = self.transform(img)
        return img, self.targets[index]


def _read_cifar(folder: Path, names: tuple[str, ...], classes: list[str], transform) -> CIFAR10Data:
    batches = [_read_cifar_batch(folder / name) for name in names]
    data = np.ascontiguousarray(np.concatenate([d for d, _ in batches]))
    targets = [t for _, labels in batches for t in labels]
    return CIFAR10Data(data, targets, classes, transform)


@TASKS.register("cifar10")
def cifar10_task(config: TaskConfig) -> Task:
    """CIFAR-10 from ``--data-dir`` (holding ``cifar-10-batches-py``, or that folder itself);
    10% of train is validation. Nothing is downloaded and any local copy in the python format is
    accepted; its batch files are read with a restricted unpickler (numpy arrays and plain
    data only), so a batch file that asks to load anything else is refused."""
    import torchvision.transforms as T

    model = _small_model_name(config.model, "resnet20", ["resnet20", "resnet56", "plain20"])
    root = _data_dir(config, "cifar10")
    if not (root / CIFAR_FOLDER).is_dir() and (root.name == CIFAR_FOLDER):
        root = root.parent
    folder = root / CIFAR_FOLDER
    missing = [n for n in CIFAR_FILES if not (folder / n).is_file()]
    if missing:
        raise AutopruneError(
            f"--data-dir {str(root)!r} holds no CIFAR-10 python-format data: expected {CIFAR_FOLDER}/ with "
            "data_batch_1..5, test_batch and batches.meta"
            + (f" (missing: {', '.join(missing)})" if folder.is_dir() else "")
        )
    normalize = T.Compose([T.ToTensor(), T.Normalize((0.4914, 0.4822, 0.4465), (0.247, 0.243, 0.261))])
    classes = _read_cifar_meta(folder / "batches.meta")
    full = _read_cifar(folder, CIFAR_TRAIN_FILES, classes, normalize)
    test = _read_cifar(folder, ("test_batch",), classes, normalize)
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


SHOWN_SKIPPED = 3  # unreadable images named in the warning line (then "and N more")
_PIL_ERRORS = (OSError, SyntaxError, ValueError)  # what PIL raises on bad files (plus DecompressionBombError)


def _identifies_as_image(path: str) -> bool:
    """The folder-scan check: PIL recognises the file's header (opened and closed again; no
    pixels are decoded)."""
    from PIL import Image

    try:
        with Image.open(path):
            return True
    except (*_PIL_ERRORS, Image.DecompressionBombError):
        return False


def _load_image(path: str):
    """ImageFolder's loader (an RGB PIL image), with an error naming the file for an image that
    identified at scan time but does not decode (truncated, corrupt data)."""
    from PIL import Image

    try:
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB")
    except (*_PIL_ERRORS, Image.DecompressionBombError) as exc:
        raise AutopruneError(f"image {path!r} cannot be decoded ({exc}); remove or replace it") from None


def _skipped_warning(skipped: list[str]) -> str:
    shown = ", ".join(repr(p) for p in skipped[:SHOWN_SKIPPED])
    more = f" and {len(skipped) - SHOWN_SKIPPED} more" if len(skipped) > SHOWN_SKIPPED else ""
    return f"autoprune: warning: skipped {len(skipped)} image file(s) that PIL cannot identify: {shown}{more}"


@TASKS.register("imagefolder")
def imagefolder_task(config: TaskConfig) -> Task:
    """A local ImageFolder: ``train/`` and ``val/`` (or ``test/``) sub-folders of classes, or a
    single folder of classes split 70/15/15 (stratified, seeded). Untrained unless a checkpoint
    is given. ``--image-size`` (default 224, at least 16) is the side of the centre crop.

    The folder the classes come from (``train/`` or the single folder) must hold at least two
    class sub-folders. Unreadable images: when a folder is scanned, every file with an image
    extension is opened with PIL (its header only); files PIL cannot identify (not an image,
    empty, garbage) are skipped, and one warning line on stderr says how many were skipped and
    names the first few. An image that identified but fails to decode when its sample is read
    (e.g. a truncated file) stops the run with the error
    "image '<path>' cannot be decoded (<reason>); remove or replace it"."""
    import torchvision.transforms as T
    from torchvision.datasets import ImageFolder
    from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension

    model = _torchvision_model_name(config.model)
    root = _data_dir(config, "imagefolder")
    size = 224 if config.image_size is None else config.image_size
    transform = T.Compose(
        [
            T.Resize(size),
            T.CenterCrop(size),
            T.ToTensor(),
            T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
        ]
    )
    skipped: list[str] = []

    def valid(path: str) -> bool:
        if not has_file_allowed_extension(path, IMG_EXTENSIONS):
            return False  # not an image by name: ignored, as ImageFolder does
        if _identifies_as_image(path):
            return True
        skipped.append(path)
        return False

    def folder(path: Path, classes_from: bool = False) -> ImageFolder:
        need = "imagefolder needs at least two classes, one sub-folder of images per class"
        if classes_from and not any(entry.is_dir() for entry in os.scandir(path)):
            raise AutopruneError(f"--data-dir {str(path)!r} has 0 classes (no class sub-folders): {need}")
        try:
            found = ImageFolder(str(path), transform=transform, loader=_load_image, is_valid_file=valid)
        except (FileNotFoundError, RuntimeError) as exc:
            raise AutopruneError(
                f"--data-dir {str(path)!r} is not an image folder: {exc} "
                f"(images are files ending in {', '.join(IMG_EXTENSIONS)} that PIL can open)"
            ) from None
        if classes_from and len(found.classes) < 2:
            raise AutopruneError(
                f"--data-dir {str(path)!r} has {len(found.classes)} class ({', '.join(found.classes)}): {need}"
            )
        return found

    held_out = next((root / n for n in ("val", "test") if (root / n).is_dir()), None)
    split_layout = (root / "train").is_dir() and held_out is not None
    # one folder of classes; a lone train/ (no val/ or test/) is that folder
    single = root / "train" if (root / "train").is_dir() else root
    try:
        full = folder(single, classes_from=True)
        held_out_folder = folder(held_out) if split_layout else None
    finally:  # one line for all folders, also when a scan fails
        if skipped:
            print(_skipped_warning(skipped), file=sys.stderr, flush=True)

    if held_out_folder is not None:
        test: Dataset = held_out_folder
        train_idx, val_idx = stratified_split(labels_of(full), 0.15, seed=0, where=str(single))
        train, val = Subset(full, train_idx.tolist()), Subset(full, val_idx.tolist())
    else:
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
