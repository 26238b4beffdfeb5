"""Hostile and broken task inputs: CIFAR batch files that carry pickle payloads or the wrong
contents, unreadable images in an image folder, one-class folders, and out-of-range image and
batch sizes. Everything is written to tmp_path; nothing is mocked."""

from __future__ import annotations

import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest

from autoprune.config import TaskConfig
from autoprune.engine.tasks import CIFAR10Data, check_task_config, get_task, labels_of
from autoprune.errors import AutopruneError

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
TRAIN_FILES = [f"data_batch_{i}" for i in range(1, 6)]


def _batch(per_batch: int, rng: np.random.Generator, name: str, byte_keys: bool = False) -> dict:
    entry = {
        "data": rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8),
        "labels": [i % 10 for i in range(per_batch)],
        "batch_label": name,
    }
    return {k.encode(): v for k, v in entry.items()} if byte_keys else entry


def _write_cifar(root: Path, per_batch: int = 20, protocol: int | None = None, byte_keys: bool = False) -> Path:
    """``root/cifar-10-batches-py`` like tests/test_tasks.py's fixture; returns the batches folder."""
    rng = np.random.default_rng(0)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name in [*TRAIN_FILES, "test_batch"]:
        with open(folder / name, "wb") as f:
            pickle.dump(_batch(per_batch, rng, name, byte_keys), f, protocol=protocol)
    meta = {"label_names": CLASSES, "num_cases_per_batch": per_batch}
    if byte_keys:
        meta = {b"label_names": [c.encode() for c in CLASSES], b"num_cases_per_batch": per_batch}
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump(meta, f, protocol=protocol)
    return folder


class _Payload:
    """Unpickling this calls ``fn(*args)``: what a hostile batch file would carry."""

    def __init__(self, fn, *args) -> None:
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def _payloads(marker: Path) -> dict[str, _Payload]:
    return {
        "open": _Payload(open, str(marker), "w"),  # creates the marker file
        "os.system": _Payload(os.system, f"touch {marker}"),
    }


def _refused_name(payload: _Payload) -> str:
    return f"{payload.fn.__module__}.{payload.fn.__name__}"  # io.open, posix.system


# ------------------------------------------------------------------ cifar10: pickle payloads


@pytest.mark.parametrize("kind", ["open", "os.system"])
@pytest.mark.parametrize("target", ["batches.meta", "data_batch_1", "test_batch"])
def test_cifar_batch_with_a_payload_is_refused_and_not_run(tmp_path, target, kind):
    folder = _write_cifar(tmp_path / "data")
    marker = tmp_path / "marker"
    payload = _payloads(marker)[kind]
    if target == "batches.meta":
        entry = {"label_names": payload, "num_cases_per_batch": 20}
    else:
        entry = _batch(20, np.random.default_rng(1), target)
        entry["labels"] = payload
    with open(folder / target, "wb") as f:
        pickle.dump(entry, f)
    with pytest.raises(AutopruneError) as info:
        get_task(TaskConfig(name="cifar10", data_dir=str(tmp_path / "data")))
    message = str(info.value)
    assert str(folder / target) in message
    assert f"'{_refused_name(payload)}'" in message
    assert "is not a plain CIFAR-10 batch" in message and "never unpickles" in message
    assert not marker.exists()


def test_cifar_payload_as_the_whole_file_is_refused(tmp_path):
    folder = _write_cifar(tmp_path / "data")
    marker = tmp_path / "marker"
    with open(folder / "data_batch_3", "wb") as f:
        pickle.dump(_payloads(marker)["os.system"], f, protocol=2)
    with pytest.raises(AutopruneError, match=r"data_batch_3.*never unpickles"):
        get_task(TaskConfig(name="cifar10", data_dir=str(folder)))  # the batches folder itself
    assert not marker.exists()


@pytest.mark.parametrize("target", ["batches.meta", "data_batch_1"])
def test_cli_refuses_a_cifar_payload_without_a_traceback(tmp_path, cli, target):
    data = tmp_path / "data"
    folder = _write_cifar(data)
    marker = tmp_path / "marker"
    payload = _payloads(marker)["os.system"]
    entry = (
        {"label_names": payload}
        if target == "batches.meta"
        else {**_batch(20, np.random.default_rng(1), target), "data": payload}
    )
    with open(folder / target, "wb") as f:
        pickle.dump(entry, f)
    out = tmp_path / "o"
    result = cli("prune", "--task", "cifar10", "--data-dir", str(data), "--out", str(out), "--device", "cpu")
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("autoprune: error: ")
    assert target in result.stderr and _refused_name(payload) in result.stderr
    assert not marker.exists()


# ------------------------------------------------------------------ cifar10: real formats load


class _Py2Pickler(pickle._Pickler):
    """Writes what Python 2's cPickle wrote into the official archive: protocol 2, byte strings
    as Python 2 ``str`` (STRING opcodes, decoded as latin1 when read) and numpy 1.x module
    names (``numpy.core.multiarray``)."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_py2_str(self, obj: bytes) -> None:
        n = len(obj)
        self.write(
            pickle.SHORT_BINSTRING + bytes([n]) + obj if n < 256 else pickle.BINSTRING + struct.pack("<i", n) + obj
        )
        self.memoize(obj)

    dispatch[bytes] = save_py2_str

    def save_global(self, obj, name=None) -> None:
        module = obj.__module__.replace("numpy._core", "numpy.core")
        self.write(pickle.GLOBAL + f"{module}\n{name or obj.__qualname__}\n".encode())
        self.memoize(obj)


def _write_py2_cifar(root: Path, per_batch: int = 20) -> tuple[Path, dict]:
    rng = np.random.default_rng(3)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    written = {}
    for name in [*TRAIN_FILES, "test_batch"]:
        entry = _batch(per_batch, rng, name, byte_keys=True)
        entry[b"filenames"] = [f"img_{i}.png".encode() for i in range(per_batch)]
        with open(folder / name, "wb") as f:
            _Py2Pickler(f, protocol=2).dump(entry)
        written[name] = entry
    meta = {b"label_names": [c.encode() for c in CLASSES], b"num_cases_per_batch": per_batch, b"num_vis": 3072}
    with open(folder / "batches.meta", "wb") as f:
        _Py2Pickler(f, protocol=2).dump(meta)
    return folder, written


def test_python2_format_batches_load(tmp_path):
    folder, written = _write_py2_cifar(tmp_path / "data")
    raw = (folder / "data_batch_1").read_bytes()
    assert b"numpy.core.multiarray\n_reconstruct" in raw  # numpy 1.x names, as in the archive
    task = get_task(TaskConfig(name="cifar10", data_dir=str(tmp_path / "data")))
    full = task.train.dataset
    assert isinstance(full, CIFAR10Data)
    assert full.classes == CLASSES
    assert full.data.shape == (100, 32, 32, 3) and full.data.dtype == np.uint8
    assert task.test.data.shape == (20, 32, 32, 3)
    # pixels are the rows written (CHW planes in the file, HWC in memory), labels in order
    expected = written["data_batch_2"][b"data"][5].reshape(3, 32, 32).transpose(1, 2, 0)
    np.testing.assert_array_equal(full.data[25], expected)
    assert full.targets[20:40] == written["data_batch_2"][b"labels"]
    assert (len(task.train), len(task.val), len(task.test)) == (90, 10, 20)


@pytest.mark.parametrize("protocol", [2, 4, 5])
@pytest.mark.parametrize("byte_keys", [False, True], ids=["str_keys", "bytes_keys"])
def test_python3_pickles_of_any_protocol_load(tmp_path, protocol, byte_keys):
    _write_cifar(tmp_path, protocol=protocol, byte_keys=byte_keys)
    task = get_task(TaskConfig(name="cifar10", data_dir=str(tmp_path), batch_size=8))
    full = task.train.dataset
    assert full.classes == CLASSES
    assert len(full) == 100 and len(task.test) == 20
    assert (len(task.train), len(task.val)) == (90, 10)
    assert sorted(labels_of(task.val).tolist()) == list(range(10))  # stratified: one per class
    x, y = task.test[7]
    assert x.shape == (3, 32, 32) and y == 7
    xb, yb = next(iter(task.loader("train")))
    assert xb.shape == (8, 3, 32, 32) and yb.shape == (8,)
    assert task.options == {"data_dir": str(tmp_path)}


# ------------------------------------------------------------------ cifar10: wrong contents


def _replace(folder: Path, name: str, obj) -> None:
    with open(folder / name, "wb") as f:
        pickle.dump(obj, f)


@pytest.mark.parametrize(
    "name, contents, message",
    [
        ("data_batch_2", {"labels": [0] * 20}, r"no 'data' entry"),
        ("data_batch_2", {"data": np.zeros((20, 3072), np.uint8)}, r"no 'labels' entry"),
        (
            "data_batch_2",
            {"data": np.zeros((20, 3072), np.float32), "labels": [0] * 20},
            r"'data' must be a uint8 array of N x 3072 pixels, got float32 array",
        ),
        (
            "data_batch_2",
            {"data": np.zeros((20, 1000), np.uint8), "labels": [0] * 20},
            r"'data' must be a uint8 array of N x 3072 pixels, got shape \(20, 1000\)",
        ),
        ("data_batch_2", {"data": [[0] * 3072] * 20, "labels": [0] * 20}, r"uint8 array.*got list"),
        ("test_batch", {"data": np.zeros((20, 3072), np.uint8), "labels": [0] * 19}, r"19 labels for 20 images"),
        ("test_batch", {"data": np.zeros((20, 3072), np.uint8), "labels": [0] * 19 + [10]}, r"0\.\.9, found 10"),
        (
            "test_batch",
            {"data": np.zeros((20, 3072), np.uint8), "labels": ["cat"] * 20},
            r"'labels' must be a list of integers",
        ),
        ("test_batch", [1, 2, 3], r"holds a list, not a dict"),
        ("batches.meta", {"label_names": CLASSES[:9]}, r"batches.meta.*'label_names' must be a list of 10"),
        ("batches.meta", {"num_cases_per_batch": 20}, r"'label_names' must be a list of 10"),
    ],
)
def test_cifar_batch_contents_are_validated(tmp_path, name, contents, message):
    folder = _write_cifar(tmp_path)
    _replace(folder, name, contents)
    with pytest.raises(AutopruneError, match=message) as info:
        get_task(TaskConfig(name="cifar10", data_dir=str(tmp_path)))
    assert str(folder / name) in str(info.value)


@pytest.mark.parametrize("contents", [b"", b"not a pickle at all", os.urandom(64), b"\x80\x05\x95"])
def test_cifar_garbage_file_is_an_error_naming_it(tmp_path, contents):
    folder = _write_cifar(tmp_path)
    (folder / "data_batch_4").write_bytes(contents)
    with pytest.raises(AutopruneError, match=r"data_batch_4.* cannot be read as a CIFAR-10 python-format batch"):
        get_task(TaskConfig(name="cifar10", data_dir=str(tmp_path)))


def test_cifar_missing_files_are_named(tmp_path):
    folder = _write_cifar(tmp_path)
    (folder / "data_batch_5").unlink()
    (folder / "batches.meta").unlink()
    with pytest.raises(AutopruneError, match=r"holds no CIFAR-10.*missing: data_batch_5, batches.meta"):
        get_task(TaskConfig(name="cifar10", data_dir=str(tmp_path)))


# ------------------------------------------------------------------ imagefolder: unreadable images


def _truncated_png(path: Path, seed: int = 0) -> None:
    """A PNG whose header is valid but whose pixel data stops half way."""
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
    Image.fromarray(pixels, "RGB").save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _warnings(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "warning" in line]


def test_garbage_image_is_skipped_with_one_warning(tmp_path, write_image_folder, capsys):
    root = write_image_folder(tmp_path / "data", classes=3, per_class=12)
    garbage = root / "class_1" / "broken.png"
    garbage.write_bytes(os.urandom(500))
    (root / "class_2" / "notes.txt").write_text("not an image, ignored without a word")
    task = get_task(TaskConfig(name="imagefolder", data_dir=str(root), image_size=16))
    lines = _warnings(capsys.readouterr().err)
    assert len(lines) == 1
    assert "skipped 1 image file(s) that PIL cannot identify" in lines[0]
    assert str(garbage) in lines[0] and "notes.txt" not in lines[0]
    full = task.train.dataset
    paths = [p for p, _ in full.samples]
    assert str(garbage) not in paths and len(paths) == 36
    assert len(task.train) + len(task.val) + len(task.test) == 36
    for split in (task.train, task.val, task.test):  # every sample decodes
        for i in range(len(split)):
            assert split[i][0].shape == (3, 16, 16)


def test_many_unreadable_images_make_one_line_naming_the_first_few(tmp_path, write_image_folder, capsys):
    write_image_folder(tmp_path / "data" / "train", classes=3, per_class=12, seed=1)
    write_image_folder(tmp_path / "data" / "val", classes=3, per_class=4, seed=2)
    bad = [tmp_path / "data" / "train" / "class_0" / f"bad_{i}.jpg" for i in range(4)]
    bad.append(tmp_path / "data" / "val" / "class_2" / "empty.PNG")
    for i, path in enumerate(bad):
        path.write_bytes(b"" if path.name == "empty.PNG" else os.urandom(100 + i))
    task = get_task(TaskConfig(name="imagefolder", data_dir=str(tmp_path / "data"), image_size=16))
    lines = _warnings(capsys.readouterr().err)
    assert len(lines) == 1, lines
    assert "skipped 5 image file(s)" in lines[0] and lines[0].endswith("and 2 more")
    assert sum(str(p) in lines[0] for p in bad) == 3
    assert len(task.test) == 12 and len(task.train) + len(task.val) == 36


def test_no_warning_for_clean_folders(tmp_path, write_image_folder, capsys):
    root = write_image_folder(tmp_path / "data", classes=2, per_class=10)
    get_task(TaskConfig(name="imagefolder", data_dir=str(root), image_size=16))
    assert _warnings(capsys.readouterr().err) == []


def test_truncated_image_is_an_error_naming_it_when_read(tmp_path, write_image_folder):
    root = write_image_folder(tmp_path / "data", classes=3, per_class=12)
    truncated = root / "class_0" / "img_005.png"
    _truncated_png(truncated)
    task = get_task(TaskConfig(name="imagefolder", data_dir=str(root), image_size=16))
    full = task.train.dataset
    index = [p for p, _ in full.samples].index(str(truncated))  # it identified: kept at scan time
    split = next(s for s in (task.train, task.val, task.test) if index in s.indices)
    with pytest.raises(AutopruneError) as info:
        split[list(split.indices).index(index)]
    message = str(info.value)
    assert message.startswith(f"image '{truncated}' cannot be decoded (")
    assert message.endswith("); remove or replace it")
    with pytest.raises(AutopruneError, match="cannot be decoded"):
        next(iter(task.loader(next(n for n in ("train", "val", "test") if getattr(task, n) is split))))


def test_a_class_of_only_unreadable_images_is_an_error(tmp_path, write_image_folder, capsys):
    root = write_image_folder(tmp_path / "data", classes=2, per_class=8)
    (root / "class_2").mkdir()
    (root / "class_2" / "a.png").write_bytes(os.urandom(50))
    with pytest.raises(AutopruneError, match=r"is not an image folder: Found no valid file for the classes class_2"):
        get_task(TaskConfig(name="imagefolder", data_dir=str(root), image_size=16))
    lines = _warnings(capsys.readouterr().err)
    assert len(lines) == 1 and "a.png" in lines[0]  # the warning says why, even though the scan failed


# ------------------------------------------------------------------ imagefolder: class count


def test_one_class_folder_is_an_error(tmp_path, write_image_folder):
    root = write_image_folder(tmp_path / "data", classes=1, per_class=20)
    with pytest.raises(AutopruneError, match=r"has 1 class \(class_0\).*at least two classes") as info:
        get_task(TaskConfig(name="imagefolder", data_dir=str(root), image_size=16))
    assert str(root) in str(info.value)


def test_one_class_train_folder_is_an_error(tmp_path, write_image_folder):
    write_image_folder(tmp_path / "data" / "train", classes=1, per_class=20)
    write_image_folder(tmp_path / "data" / "val", classes=3, per_class=4)
    with pytest.raises(AutopruneError, match=r"train' has 1 class.*at least two classes"):
        get_task(TaskConfig(name="imagefolder", data_dir=str(tmp_path / "data"), image_size=16))


def test_loose_images_without_class_folders_are_an_error(tmp_path, write_image_folder):
    write_image_folder(tmp_path / "src", classes=1, per_class=6)
    root = tmp_path / "loose"
    root.mkdir()
    for path in (tmp_path / "src" / "class_0").iterdir():
        path.rename(root / path.name)
    with pytest.raises(AutopruneError, match=r"loose' has 0 classes.*at least two classes"):
        get_task(TaskConfig(name="imagefolder", data_dir=str(root), image_size=16))


# ------------------------------------------------------------------ image and batch sizes


@pytest.mark.parametrize("size", [0, -4, 8, 15, True, 32.0, "32"])
def test_bad_image_size_is_refused_when_the_config_is_built(tmp_path, size):
    """The schema (autoprune/schema.py) checks it, for the CLI, the Python API and model files."""
    with pytest.raises(
        AutopruneError, match=rf"^--image-size must be an integer >= 16, at most 4096 \(or unset\), got {size!r}$"
    ):
        TaskConfig(name="imagefolder", data_dir=str(tmp_path), image_size=size)


@pytest.mark.parametrize("batch_size", [0, -1, 2.5, None, False])
def test_bad_batch_size_is_refused_when_the_config_is_built(batch_size):
    with pytest.raises(AutopruneError, match="^--batch-size must be an integer >= 1"):
        TaskConfig(batch_size=batch_size)


def test_image_size_none_means_224_and_16_is_allowed(tmp_path, write_image_folder):
    root = write_image_folder(tmp_path / "data", classes=2, per_class=8)
    check_task_config(TaskConfig(name="imagefolder", data_dir=str(root), image_size=None))
    check_task_config(TaskConfig(name="imagefolder", data_dir=str(root), image_size=16, batch_size=1))
    task = get_task(TaskConfig(name="imagefolder", data_dir=str(root)))
    assert task.input_shape == (3, 224, 224) and task.options["image_size"] == 224
    assert task.test[0][0].shape == (3, 224, 224)
    task = get_task(TaskConfig(name="imagefolder", data_dir=str(root), image_size=16, batch_size=1))
    assert task.input_shape == (3, 16, 16) and task.batch_size == 1
    assert task.test[0][0].shape == (3, 16, 16)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--image-size", "0"], r"--image-size must be an integer >= 16.*got 0"),
        (["--batch-size", "0"], r"--batch-size must be an integer >= 1.*got 0"),
    ],
)
def test_cli_rejects_sizes_without_a_traceback(tmp_path, cli, write_image_folder, flags, message):
    import re

    root = write_image_folder(tmp_path / "data", classes=2, per_class=8)
    result = cli("list", "groups", "--task", "imagefolder", "--data-dir", str(root), *flags)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert re.fullmatch(f"autoprune: error: {message}", result.stderr.strip()), result.stderr
