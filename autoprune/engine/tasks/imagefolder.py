"""A local folder of class sub-folders, for any torchvision classification model."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from torch.utils.data import Dataset, Subset

from ...config import TaskConfig
from ...errors import AutopruneError
from ..models import torchvision_model
from .base import Task, data_dir, labels_of, model_name, stratified_split, task

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


def _splits(full, held_out: Dataset | None, where: str) -> tuple[Dataset, Dataset, Dataset]:
    """Train, validation and test sets of an image folder ``full`` (stratified, seeded): with a
    ``held_out`` folder (val/ or test/) it is the test set and 15% of ``full`` validates;
    otherwise ``full`` is split 70/15/15."""
    labels = labels_of(full)
    if held_out is not None:
        train_idx, val_idx = stratified_split(labels, 0.15, seed=0, where=where)
        return Subset(full, train_idx.tolist()), Subset(full, val_idx.tolist()), held_out
    rest, test_idx = stratified_split(labels, 0.15, seed=0, where=where)
    train_idx, val_idx = stratified_split(labels[rest], 0.15 / 0.85, seed=1, where=where)
    train, val = Subset(full, rest[train_idx].tolist()), Subset(full, rest[val_idx].tolist())
    return train, val, Subset(full, test_idx.tolist())


def _transform(size: int):
    """Resize, centre-crop to ``size``, ImageNet normalisation."""
    import torchvision.transforms as T

    return T.Compose(
        [T.Resize(size), T.CenterCrop(size), T.ToTensor(), T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))]
    )


@task("imagefolder", None, "resnet18", data_dir=True)
def imagefolder_task(config: TaskConfig) -> Task:
    """A local ImageFolder: ``train/`` and ``val/`` (or ``test/``) sub-folders of classes, or a
    single folder of classes split 70/15/15 (stratified, seeded). Untrained unless a checkpoint
    is given. ``--image-size`` (default ``config.IMAGE_SIZE``, at least 16) is the side of the centre crop.

    The folder the classes come from (``train/`` or the single folder) must hold at least two
    class sub-folders. Unreadable images: when a folder is scanned, every file with an image
    extension is opened with PIL (its header only); files PIL cannot identify (not an image,
    empty, garbage) are skipped, and one warning line on stderr says how many were skipped and
    names the first few. An image that identified but fails to decode when its sample is read
    (e.g. a truncated file) stops the run with the error
    "image '<path>' cannot be decoded (<reason>); remove or replace it"."""
    from torchvision.datasets import ImageFolder
    from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension

    model = model_name(config)
    root = data_dir(config)
    size = config.resolved().image_size
    transform = _transform(size)
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

    train, val, test = _splits(full, held_out_folder, str(single))
    num_classes = len(full.classes)
    return Task(
        name="imagefolder",
        model_name=model,
        model_factory=lambda: torchvision_model(model, num_classes, size),
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
