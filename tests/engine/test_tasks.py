"""Tasks: the built-in digits, cifar10 and imagefolder tasks on small data the tests write
themselves, and the user-facing errors of task resolution."""

from __future__ import annotations

import pickle
import textwrap
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from torch.utils.data import Subset

from autoprune.config import TaskConfig
from autoprune.engine.tasks import Task, check_task_config, get_task, labels_of
from autoprune.errors import AutopruneError

# ------------------------------------------------------------------ helpers


def _indices(subset) -> list[int]:
    assert isinstance(subset, Subset)
    return [int(i) for i in subset.indices]


def _class_counts(dataset) -> Counter:
    return Counter(int(c) for c in labels_of(dataset))


CIFAR_MEAN = np.array((0.4914, 0.4822, 0.4465), dtype=np.float32)
CIFAR_STD = np.array((0.247, 0.243, 0.261), dtype=np.float32)
CIFAR_CLASSES = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
]


def _write_cifar(root: Path, per_batch: int = 20, seed: int = 0) -> dict[str, dict]:
    """A tiny CIFAR-10 python-format directory: ``root/cifar-10-batches-py`` with five
    training batches, a test batch (``per_batch`` images each, every class equally often)
    and ``batches.meta``. Returns the pickled dicts by file name."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    written = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        labels = [i % 10 for i in range(per_batch)]
        data = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        entry = {"data": data, "labels": labels, "batch_label": name}
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f)
        written[name] = entry
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": CIFAR_CLASSES, "num_cases_per_batch": per_batch}, f)
    return written


@pytest.fixture(scope="module")
def cifar_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    return root, _write_cifar(root)


@pytest.fixture(scope="module")
def single_folder(tmp_path_factory, write_image_folder):
    return write_image_folder(tmp_path_factory.mktemp("imgs") / "data", classes=3, per_class=12)


@pytest.fixture(scope="module", params=["val", "test"])
def split_folder(request, tmp_path_factory, write_image_folder):
    """``train/`` (3 x 12 images) and a held-out folder named ``val/`` or ``test/`` (3 x 4)."""
    root = tmp_path_factory.mktemp(f"imgs_{request.param}")
    write_image_folder(root / "train", classes=3, per_class=12, seed=1)
    write_image_folder(root / request.param, classes=3, per_class=4, seed=2)
    return root, request.param


# ------------------------------------------------------------------ imagefolder


def test_imagefolder_single_folder_split_is_70_15_15_stratified_and_disjoint(single_folder):
    task = get_task(
        TaskConfig(name="imagefolder", model="resnet18", data_dir=str(single_folder), image_size=32, batch_size=4)
    )
    assert task.name == "imagefolder" and task.model_name == "resnet18"
    assert task.num_classes == 3
    # all three splits index one ImageFolder over the whole directory
    full = task.train.dataset
    assert isinstance(full, torchvision.datasets.ImageFolder)
    assert task.val.dataset is full and task.test.dataset is full
    assert full.classes == ["class_0", "class_1", "class_2"]
    train, val, test = _indices(task.train), _indices(task.val), _indices(task.test)
    # 36 images: 15% test (ceil 5.4 = 6), 15% of all for validation (6), the rest training
    assert (len(train), len(val), len(test)) == (24, 6, 6)
    assert sorted(train + val + test) == list(range(36))  # sizes add up, nothing twice
    assert not set(train) & set(val)
    assert not set(train) & set(test)
    assert not set(val) & set(test)
    # stratified: every class equally represented in every split
    assert _class_counts(task.train) == {0: 8, 1: 8, 2: 8}
    assert _class_counts(task.val) == {0: 2, 1: 2, 2: 2}
    assert _class_counts(task.test) == {0: 2, 1: 2, 2: 2}
    # labels_of agrees with decoding the images
    assert [int(task.test[i][1]) for i in range(len(task.test))] == list(labels_of(task.test))


def test_imagefolder_split_is_seeded(single_folder):
    cfg = TaskConfig(name="imagefolder", model="resnet18", data_dir=str(single_folder), image_size=32)
    a, b = get_task(cfg), get_task(cfg)
    for split in ("train", "val", "test"):
        assert _indices(getattr(a, split)) == _indices(getattr(b, split))


def test_imagefolder_train_and_held_out_layout(split_folder):
    root, held_out = split_folder
    task = get_task(TaskConfig(name="imagefolder", model="resnet18", data_dir=str(root), image_size=32))
    assert task.num_classes == 3
    full = task.train.dataset
    assert task.val.dataset is full
    # training and validation come from train/ only, 15% of it (ceil 5.4 = 6) for validation
    train, val = _indices(task.train), _indices(task.val)
    assert (len(train), len(val)) == (30, 6)
    assert sorted(train + val) == list(range(36))
    assert _class_counts(task.val) == {0: 2, 1: 2, 2: 2}
    assert _class_counts(task.train) == {0: 10, 1: 10, 2: 10}
    for i in train + val:
        assert Path(full.samples[i][0]).parent.parent == root / "train"
    # the test split is the whole held-out folder, untouched
    assert isinstance(task.test, torchvision.datasets.ImageFolder)
    assert len(task.test) == 12
    assert {Path(p).parent.parent for p, _ in task.test.samples} == {root / held_out}
    assert _class_counts(task.test) == {0: 4, 1: 4, 2: 4}


@pytest.mark.parametrize("size", [32, 24])
def test_imagefolder_input_shape_follows_image_size(tmp_path, write_image_folder, size):
    # non-square 40x36 source images: resized and centre-cropped to size x size
    root = write_image_folder(tmp_path / "data", classes=3, per_class=7, size=(40, 36))
    task = get_task(TaskConfig(name="imagefolder", data_dir=str(root), image_size=size))
    assert task.input_shape == (3, size, size)
    assert task.options == {"data_dir": str(root), "image_size": size}
    for split in (task.train, task.val, task.test):
        x, y = split[0]
        assert x.shape == (3, size, size) and x.dtype == torch.float32
        assert 0 <= int(y) < 3
    # images are normalised (ImageNet statistics), not raw 0..1 pixels
    assert float(task.train[0][0].min()) < 0
    assert task.example_input(2).shape == (2, 3, size, size)


def test_imagefolder_default_image_size_is_224(single_folder):
    task = get_task(TaskConfig(name="imagefolder", data_dir=str(single_folder)))
    assert task.input_shape == (3, 224, 224)
    assert task.train[0][0].shape == (3, 224, 224)
    assert task.model_name == "resnet18"  # the default model


def test_imagefolder_images_of_different_classes_differ(single_folder):
    """The synthetic classes are distinguishable (class colour): mean channel per class."""
    task = get_task(TaskConfig(name="imagefolder", data_dir=str(single_folder), image_size=32))
    means = {}
    for x, y in (task.train[i] for i in range(len(task.train))):
        means.setdefault(int(y), []).append(x.mean(dim=(1, 2)))
    for c, xs in means.items():
        colour = torch.stack(xs).mean(0)
        assert int(colour.argmax()) == c  # class c is tinted in channel c


@pytest.mark.parametrize(
    "model, check",
    [
        ("resnet18", lambda m: isinstance(m, torchvision.models.ResNet) and m.fc.out_features == 3),
        (
            "mobilenet_v2",
            lambda m: isinstance(m, torchvision.models.MobileNetV2) and m.classifier[-1].out_features == 3,
        ),
    ],
    ids=["resnet18", "mobilenet_v2"],
)
def test_imagefolder_model_factory_builds_named_torchvision_model(single_folder, model, check):
    task = get_task(TaskConfig(name="imagefolder", model=model, data_dir=str(single_folder), image_size=32))
    assert task.model_name == model
    torch.manual_seed(0)
    net = task.model_factory()
    assert check(net)
    other = task.model_factory()
    assert other is not net  # a fresh model each call
    x = torch.stack([task.val[i][0] for i in range(3)])
    with torch.no_grad():
        out = net.eval()(x)
    assert out.shape == (3, task.num_classes)
    assert torch.isfinite(out).all()


# ------------------------------------------------------------------ cifar10


def test_cifar10_loads_local_files_split_and_shapes(cifar_dir):
    root, written = cifar_dir
    task = get_task(TaskConfig(name="cifar10", data_dir=str(root), batch_size=16))
    assert task.name == "cifar10" and task.model_name == "resnet20"
    assert task.input_shape == (3, 32, 32) and task.num_classes == 10
    full = task.train.dataset
    assert task.val.dataset is full
    assert full.classes == CIFAR_CLASSES
    assert len(full) == 100 and len(task.test) == 20
    # 10% of training is validation, stratified: one per class
    train, val = _indices(task.train), _indices(task.val)
    assert (len(train), len(val)) == (90, 10)
    assert sorted(train + val) == list(range(100))
    assert _class_counts(task.val) == {c: 1 for c in range(10)}
    assert _class_counts(task.train) == {c: 9 for c in range(10)}
    assert _class_counts(task.test) == {c: 2 for c in range(10)}
    # the pixels are the ones written: row-major CHW planes, normalised per channel
    x, y = task.test[3]
    assert x.shape == (3, 32, 32) and int(y) == written["test_batch"]["labels"][3]
    raw = written["test_batch"]["data"][3].reshape(3, 32, 32).astype(np.float32) / 255.0
    expected = (raw - CIFAR_MEAN[:, None, None]) / CIFAR_STD[:, None, None]
    torch.testing.assert_close(x, torch.from_numpy(expected), rtol=0, atol=1e-5)
    # a training sample through the subset: data_batch_2's row 5 is sample 25 of the full set
    i = train.index(25) if 25 in train else None
    sample = task.train[i] if i is not None else task.val[val.index(25)]
    raw = written["data_batch_2"]["data"][5].reshape(3, 32, 32).astype(np.float32) / 255.0
    expected = (raw - CIFAR_MEAN[:, None, None]) / CIFAR_STD[:, None, None]
    torch.testing.assert_close(sample[0], torch.from_numpy(expected), rtol=0, atol=1e-5)
    assert int(sample[1]) == written["data_batch_2"]["labels"][5]
    # a batch from the loader
    xb, yb = next(iter(task.loader("train")))
    assert xb.shape == (16, 3, 32, 32) and yb.shape == (16,)


def test_cifar10_data_dir_may_be_the_batches_folder_itself(cifar_dir):
    root, _ = cifar_dir
    task = get_task(TaskConfig(name="cifar10", data_dir=str(root / "cifar-10-batches-py")))
    assert len(task.train) + len(task.val) == 100 and len(task.test) == 20
    assert task.options["data_dir"] == str(root)


def test_cifar10_never_downloads(cifar_dir):
    root, _ = cifar_dir
    get_task(TaskConfig(name="cifar10", data_dir=str(root)))
    # nothing was added next to the data (no archive fetched)
    assert sorted(p.name for p in root.iterdir()) == ["cifar-10-batches-py"]
    assert sorted(p.name for p in (root / "cifar-10-batches-py").iterdir()) == sorted(
        [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]
    )


@pytest.mark.parametrize(
    "model, blocks, residual", [("resnet20", 9, True), ("resnet56", 27, True), ("plain20", 9, False)]
)
def test_cifar10_models_build_and_run(cifar_dir, model, blocks, residual):
    from autoprune.engine.models import BasicBlock

    root, _ = cifar_dir
    task = get_task(TaskConfig(name="cifar10", model=model, data_dir=str(root)))
    assert task.model_name == model
    torch.manual_seed(0)
    net = task.model_factory().eval()
    found = [m for m in net.modules() if isinstance(m, BasicBlock)]
    assert len(found) == blocks  # 6n+2 layers: 3 stages of n blocks
    assert all(b.residual is residual for b in found)
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)]
    assert len(convs) == 2 * blocks + 1
    assert net.fc.out_features == 10
    x = torch.stack([task.test[i][0] for i in range(4)])
    with torch.no_grad():
        out = net(x)
    assert out.shape == (4, 10) and torch.isfinite(out).all()


# ------------------------------------------------------------------ digits


def test_digits_sizes_split_and_fixed():
    from sklearn.datasets import load_digits

    a = get_task(TaskConfig())
    assert a.name == "digits" and a.model_name == "digits_resnet"
    assert a.input_shape == (1, 8, 8) and a.num_classes == 10
    sizes = (len(a.train), len(a.val), len(a.test))
    assert sum(sizes) == 1797
    assert sizes == (1005, 432, 360)  # 20% test (ceil 359.4), 30% of the rest (24% of all) validation
    b = get_task(TaskConfig())
    for split in ("train", "val", "test"):
        for ta, tb in zip(getattr(a, split).tensors, getattr(b, split).tensors, strict=True):
            assert torch.equal(ta, tb)
    # the three splits partition the dataset: together they hold every sample exactly once
    digits = load_digits()
    rows = torch.cat(
        [torch.cat([s.tensors[0].flatten(1), s.tensors[1][:, None].float()], 1) for s in (a.train, a.val, a.test)]
    )
    x = (torch.tensor(digits.images, dtype=torch.float32).reshape(-1, 64) / 16.0 - 0.3) / 0.4
    full = torch.cat([x, torch.tensor(digits.target, dtype=torch.float32)[:, None]], 1)

    def canonical(t: torch.Tensor) -> np.ndarray:
        arr = t.numpy()
        return arr[np.lexsort(arr.T[::-1])]

    np.testing.assert_allclose(canonical(rows), canonical(full), atol=1e-6)
    # stratified: each class's share of each split matches its share of the whole
    total = Counter(digits.target.tolist())
    for split, frac in ((a.train, 1005 / 1797), (a.val, 432 / 1797), (a.test, 360 / 1797)):
        counts = _class_counts(split)
        assert set(counts) == set(range(10))
        for c in range(10):
            assert abs(counts[c] - total[c] * frac) <= 1.5, (c, counts[c], total[c] * frac)


def test_digits_model_runs():
    task = get_task(TaskConfig(batch_size=32))
    torch.manual_seed(0)
    net = task.model_factory().eval()
    xb, yb = next(iter(task.loader("test")))
    assert xb.shape == (32, 1, 8, 8)
    with torch.no_grad():
        assert net(xb).shape == (32, 10)


# ------------------------------------------------------------------ errors


@pytest.mark.parametrize("task", ["cifar10", "imagefolder"])
def test_missing_data_dir_is_an_error(task):
    with pytest.raises(AutopruneError, match="needs --data-dir"):
        get_task(TaskConfig(name=task))
    with pytest.raises(AutopruneError, match="needs --data-dir"):
        check_task_config(TaskConfig(name=task))


@pytest.mark.parametrize("task", ["cifar10", "imagefolder"])
def test_nonexistent_data_dir_is_named(task, tmp_path):
    missing = tmp_path / "no_such_dir"
    with pytest.raises(AutopruneError, match="no_such_dir.*does not exist"):
        get_task(TaskConfig(name=task, data_dir=str(missing)))
    with pytest.raises(AutopruneError, match="no_such_dir"):
        check_task_config(TaskConfig(name=task, data_dir=str(missing)))


def test_data_dir_that_is_a_file_is_an_error(tmp_path):
    f = tmp_path / "afile.txt"
    f.write_text("x")
    with pytest.raises(AutopruneError, match="afile.txt.*not a directory"):
        get_task(TaskConfig(name="cifar10", data_dir=str(f)))


def test_not_a_cifar_directory(tmp_path):
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    with pytest.raises(AutopruneError, match="empty_dir.*no CIFAR-10"):
        get_task(TaskConfig(name="cifar10", data_dir=str(empty)))


def test_incomplete_cifar_directory(tmp_path):
    _write_cifar(tmp_path, per_batch=10)
    (tmp_path / "cifar-10-batches-py" / "test_batch").unlink()
    with pytest.raises(AutopruneError, match="holds no CIFAR-10.*test_batch"):
        get_task(TaskConfig(name="cifar10", data_dir=str(tmp_path)))


def test_image_folder_without_images(tmp_path):
    (tmp_path / "class_a").mkdir()
    (tmp_path / "class_a" / "notes.txt").write_text("no images here")
    with pytest.raises(AutopruneError, match="is not an image folder"):
        get_task(TaskConfig(name="imagefolder", data_dir=str(tmp_path), image_size=32))


def test_image_folder_too_small_to_split(tmp_path, write_image_folder):
    root = write_image_folder(tmp_path / "tiny", classes=3, per_class=2)
    with pytest.raises(AutopruneError, match="tiny"):
        get_task(TaskConfig(name="imagefolder", data_dir=str(root), image_size=16))


def test_lone_train_folder_is_split_like_a_single_folder(tmp_path, write_image_folder):
    write_image_folder(tmp_path / "data" / "train", classes=3, per_class=12)
    task = get_task(TaskConfig(name="imagefolder", data_dir=str(tmp_path / "data"), image_size=16))
    assert task.num_classes == 3
    assert len(task.train) + len(task.val) + len(task.test) == 36


@pytest.mark.parametrize(
    "task, model",
    [
        ("digits", "resnet18"),
        ("cifar10", "resnet18"),
        ("cifar10", "digits_resnet"),
        ("imagefolder", "resnet_nonexistent"),
    ],
)
def test_unknown_model_for_each_task(task, model, tmp_path):
    # the model name is checked before the data directory is read
    cfg = TaskConfig(name=task, model=model, data_dir=str(tmp_path))
    with pytest.raises(AutopruneError, match=f"unknown model '{model}'"):
        get_task(cfg)
    with pytest.raises(AutopruneError, match=f"unknown model '{model}'"):
        check_task_config(cfg)


def test_unknown_model_lists_the_allowed_ones(tmp_path):
    with pytest.raises(AutopruneError) as info:
        get_task(TaskConfig(name="cifar10", model="vgg11", data_dir=str(tmp_path)))
    for allowed in ("resnet20", "resnet56", "plain20"):
        assert allowed in str(info.value)
    with pytest.raises(AutopruneError) as info:
        get_task(TaskConfig(name="imagefolder", model="not_a_net", data_dir=str(tmp_path)))
    assert "mobilenet_v2" in str(info.value) and "resnet18" in str(info.value)


def test_unknown_task_name():
    with pytest.raises(AutopruneError, match="unknown task 'imagenet'") as info:
        get_task(TaskConfig(name="imagenet"))
    for name in ("digits", "cifar10", "imagefolder"):
        assert name in str(info.value)
    with pytest.raises(AutopruneError, match="unknown task 'imagenet'"):
        check_task_config(TaskConfig(name="imagenet"))


# ------------------------------------------------------------------ user tasks


USER_MODULE = """
import torch
from torch import nn
from torch.utils.data import TensorDataset
from autoprune.engine.tasks import Task

def _data(n, seed):
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 4, generator=g), torch.arange(n) % 2)

def build(config):
    return Task(
        name="toy", model_name=config.model or "mlp",
        model_factory=lambda: nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)),
        train=_data(20, 0), val=_data(6, 1), test=_data(6, 2),
        input_shape=(4,), num_classes=2, batch_size=config.batch_size,
    )

def build_no_args():
    return build(type("C", (), {"model": None, "batch_size": 5})())

def wrong_type(config):
    return {"name": "toy"}

NOT_CALLABLE = 42
"""


@pytest.fixture
def user_module(tmp_path, monkeypatch, request):
    # a unique module name per test, so sys.modules caching never mixes tests
    test = request.node.name.replace("[", "_").replace("]", "_").replace("-", "_")
    name = f"autoprune_user_task_{test}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(USER_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    import sys

    sys.modules.pop(name, None)


def test_user_task_by_module_and_function(user_module):
    spec = f"{user_module}:build"
    task = get_task(TaskConfig(name=spec, model="tiny", batch_size=7))
    assert isinstance(task, Task)
    assert task.name == "toy" and task.model_name == "tiny"  # the config reached the builder
    assert task.batch_size == 7
    assert task.options["spec"] == spec
    assert (len(task.train), len(task.val), len(task.test)) == (20, 6, 6)
    net = task.model_factory()
    assert net(task.example_input(3)).shape == (3, 2)
    # names and paths of user tasks are not checked early (the module is the user's)
    check_task_config(TaskConfig(name=spec))


def test_user_task_without_arguments(user_module):
    task = get_task(TaskConfig(name=f"{user_module}:build_no_args"))
    assert task.model_name == "mlp" and task.batch_size == 5
    assert task.options["spec"] == f"{user_module}:build_no_args"


def test_user_task_returning_wrong_type(user_module):
    spec = f"{user_module}:wrong_type"
    with pytest.raises(AutopruneError, match="must return autoprune.engine.tasks.Task, got dict") as info:
        get_task(TaskConfig(name=spec))
    assert spec in str(info.value)


def test_user_task_not_callable(user_module):
    with pytest.raises(AutopruneError, match="NOT_CALLABLE.*is not callable"):
        get_task(TaskConfig(name=f"{user_module}:NOT_CALLABLE"))


def test_user_task_missing_attribute(user_module):
    with pytest.raises(AutopruneError, match="has no attribute 'nope'"):
        get_task(TaskConfig(name=f"{user_module}:nope"))


def test_user_task_missing_module(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(AutopruneError, match="cannot import module 'no_such_autoprune_module'"):
        get_task(TaskConfig(name="no_such_autoprune_module:build"))


@pytest.mark.parametrize("spec", [":build", "some.module:"])
def test_user_task_malformed_spec(spec):
    with pytest.raises(AutopruneError, match="package.module:function"):
        get_task(TaskConfig(name=spec))


# ------------------------------------------------------------------ batches held on a device


def _batches(loader, epochs: int = 2) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x.clone(), y.clone()) for _ in range(epochs) for x, y in loader]


def test_an_in_memory_split_is_batched_in_place_in_a_dataloaders_order():
    from torch.utils.data import DataLoader

    from autoprune.engine.tasks.base import TensorBatches

    task = get_task(TaskConfig(batch_size=50))
    for split, shuffle in (("train", True), ("val", False)):
        held = task.loader(split, shuffle=shuffle, seed=3, device=torch.device("cpu"))
        plain = task.loader(split, shuffle=shuffle, seed=3)
        assert isinstance(held, TensorBatches) and isinstance(plain, DataLoader)
        assert len(held) == len(plain) and len(held) > 2
        a, b = _batches(held), _batches(plain)  # two epochs: each reshuffles, from one generator
        assert len(a) == len(b)
        for (xa, ya), (xb, yb) in zip(a, b):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)
    epochs = _batches(task.loader("train", shuffle=True, seed=3, device="cpu"), 2)
    half = len(epochs) // 2
    assert not torch.equal(epochs[0][1], epochs[half][1]), "the second epoch was not reshuffled"


def test_a_split_is_copied_to_its_device_once_per_process():
    a = get_task(TaskConfig()).loader("train", device="cpu")
    b = get_task(TaskConfig()).loader("train", shuffle=True, seed=1, device="cpu")  # a new trial's task
    assert a.x.data_ptr() == b.x.data_ptr() and a.y.data_ptr() == b.y.data_ptr()
    import dataclasses

    another = dataclasses.replace(get_task(TaskConfig()), options={"another": True})  # another task's data
    other = another.loader("train", device="cpu")
    assert other.x.data_ptr() != a.x.data_ptr()


def test_cifar10_as_tensors_equals_its_samples(cifar_dir):
    from autoprune.engine.tasks.base import _as_tensors

    root, _ = cifar_dir
    task = get_task(TaskConfig(name="cifar10", data_dir=str(root)))
    assert task.loader("val", device="cpu").__class__.__name__ == "DataLoader"  # no float copy on the CPU
    x, y = _as_tensors(task.val, large=True)  # what a GPU would hold
    assert x.shape == (10, 3, 32, 32) and x.dtype == torch.float32
    for i in range(len(task.val)):
        sample, label = task.val[i]
        assert torch.equal(x[i], sample) and int(y[i]) == label
