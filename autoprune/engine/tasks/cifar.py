"""CIFAR-10 from local files in the python format, read by a restricted unpickler."""

from __future__ import annotations

import numbers
import pickle
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

from ...config import TaskConfig
from ...errors import AutopruneError
from ..models import SMALL_MODELS
from .base import Task, data_dir, model_name, stratified_split, task

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
    ``classes``; a sample is the image as a normalised (3, 32, 32) tensor and its label."""

    def __init__(self, data: np.ndarray, targets: list[int], classes: list[str]) -> None:
        self.data = data
        self.targets = targets
        self.classes = classes
        self.class_to_idx = {c: i for i, c in enumerate(classes)}

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> tuple:
        return _normalised(self.data[index : index + 1])[0], self.targets[index]

    def as_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every sample at once, as ``__getitem__`` gives them (for batching on a GPU)."""
        return _normalised(self.data), torch.as_tensor(self.targets, dtype=torch.long)


MEAN, STD = (0.4914, 0.4822, 0.4465), (0.247, 0.243, 0.261)


def _normalised(images: np.ndarray) -> torch.Tensor:
    """(N, 32, 32, 3) uint8 -> (N, 3, 32, 32) float, scaled to [0, 1] then normalised per
    channel (torchvision's ToTensor and Normalize, in the same operations)."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).contiguous().float().div(255)
    return x.sub_(torch.tensor(MEAN).view(1, 3, 1, 1)).div_(torch.tensor(STD).view(1, 3, 1, 1))


def _read_cifar(folder: Path, names: tuple[str, ...], classes: list[str]) -> CIFAR10Data:
    batches = [_read_cifar_batch(folder / name) for name in names]
    data = np.ascontiguousarray(np.concatenate([d for d, _ in batches]))
    targets = [t for _, labels in batches for t in labels]
    return CIFAR10Data(data, targets, classes)


@task("cifar10", ("resnet20", "resnet56", "plain20"), "resnet20", data_dir=True)
def cifar10_task(config: TaskConfig) -> Task:
    """CIFAR-10 from ``--data-dir`` (holding ``cifar-10-batches-py``, or that folder itself);
    10% of train is validation. Nothing is downloaded and any local copy in the python format is
    accepted; its batch files are read with a restricted unpickler (numpy arrays and plain
    data only), so a batch file that asks to load anything else is refused."""
    model = model_name(config)
    root = data_dir(config)
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
    classes = _read_cifar_meta(folder / "batches.meta")
    full = _read_cifar(folder, CIFAR_TRAIN_FILES, classes)
    test = _read_cifar(folder, ("test_batch",), classes)
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
