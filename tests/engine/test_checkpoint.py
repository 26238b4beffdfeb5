"""Files autoprune writes and reads back: the dense-model cache (torn entries, architecture
keys, untrained models) and state dicts that keep PyTorch's module metadata."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from autoprune import engine
from autoprune.config import Budget, EngineConfig, FinetuneConfig, Policy, TaskConfig
from autoprune.engine.checkpoint import architecture_key, cpu_state, load_model, save_model
from autoprune.engine.tasks import digits_task
from autoprune.engine.train import threads_path


def _cfg(tmp_path, **kw) -> EngineConfig:
    return EngineConfig(cache_dir=str(tmp_path / "cache"), progress=False, **kw)


class NetA(nn.Module):
    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, width, 3, padding=1)
        self.fc = nn.Linear(width, 10)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


class NetB(nn.Module):  # NetA's shapes, another computation
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        return self.fc(torch.tanh(self.conv(x)).amax((2, 3)))


def _task(factory, train_epochs: int = 1):
    task = digits_task(TaskConfig())
    task.name, task.model_name = "mine:task", "net"  # a user task's names, unchanged by edits
    task.model_factory, task.train_epochs = factory, train_epochs
    return task


def test_a_torn_cache_entry_is_reported_and_trained_again(tmp_path, capsys):
    cfg = _cfg(tmp_path, train_epochs=1)
    task = _task(NetA)
    first = engine.dense_model(task, cfg, log=lambda _: None)
    [entry] = list((tmp_path / "cache").glob("*.pt"))
    note = threads_path(entry)  # the torch threads that trained it
    assert sorted((tmp_path / "cache").iterdir()) == sorted([entry, note])
    entry.write_bytes(entry.read_bytes()[:500])  # an interrupted copy, a full disk
    capsys.readouterr()
    again = engine.dense_model(task, cfg, log=lambda _: None)
    err = capsys.readouterr().err
    assert "cached dense model" in err and str(entry) in err and "training it again" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert sorted((tmp_path / "cache").iterdir()) == sorted([entry, note])  # replaced whole, no temporary left
    for a, b in zip(first.state_dict().values(), again.state_dict().values()):
        torch.testing.assert_close(a, b)  # the same seeded training
    assert torch.load(entry, weights_only=True).keys() == first.state_dict().keys()


def test_the_cache_key_covers_the_architecture(tmp_path):
    cfg = _cfg(tmp_path, train_epochs=1)
    narrow = engine.dense_model(_task(NetA), cfg, log=lambda _: None)
    wide = engine.dense_model(_task(lambda: NetA(16)), cfg, log=lambda _: None)  # a wider first layer
    same_shapes = engine.dense_model(_task(NetB), cfg, log=lambda _: None)  # same shapes, edited code
    assert wide.conv.out_channels == 16 and narrow.conv.out_channels == 8
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 3  # three models, three entries
    assert architecture_key(NetA()) == architecture_key(NetB())  # shapes alone would not tell them apart
    assert architecture_key(NetA(), source=True) != architecture_key(NetB(), source=True)
    assert not torch.equal(narrow.conv.weight, same_shapes.conv.weight)  # NetB trained, not served NetA


def test_an_untrained_dense_model_is_said_unless_asked_for(tmp_path, capsys):
    engine.dense_model(_task(NetA, train_epochs=0), _cfg(tmp_path), log=lambda _: None)
    err = capsys.readouterr().err
    assert "untrained" in err and "--checkpoint" in err and "--train-epochs" in err
    engine.dense_model(_task(NetA, train_epochs=0), _cfg(tmp_path, train_epochs=0), log=lambda _: None)
    assert capsys.readouterr().err == ""
    assert not (tmp_path / "cache").exists()  # nothing to cache


def test_state_dicts_keep_module_metadata_through_files_and_ray():
    import torchvision

    from autoprune.rayenv import quiet_environment

    quiet_environment()  # token authentication is set before Ray is first imported (later tests start Ray)
    import ray.cloudpickle as cloudpickle

    state = cpu_state(torchvision.models.mnasnet0_5(num_classes=3))
    assert state._metadata[""]["version"] == 2  # mnasnet checks its own version on load
    assert cloudpickle.loads(cloudpickle.dumps(state))._metadata == state._metadata  # as sent to trials
    fresh = torchvision.models.mnasnet0_5(num_classes=3)
    dropped = dict(state)  # what the cache and model files held before
    with pytest.raises(ValueError, match="version"):
        fresh.load_state_dict(dropped)
    fresh.load_state_dict(state)


@pytest.mark.slow
def test_a_pruned_mnasnet_reloads(tmp_path, write_image_folder):
    data = write_image_folder(tmp_path / "img", classes=3, per_class=12, size=(32, 32))
    task_cfg = TaskConfig(name="imagefolder", model="mnasnet0_5", data_dir=str(data), image_size=32)
    cfg = dataclasses.replace(_cfg(tmp_path, train_epochs=1), task=task_cfg)
    from autoprune.engine.tasks import get_task

    task = get_task(task_cfg)
    dense = engine.dense_model(task, cfg, log=lambda _: None)
    dense = engine.dense_model(task, cfg, log=lambda _: None)  # from the cache, which kept the versions
    policy = Policy(structure="unstructured", finetune=FinetuneConfig(epochs=0))
    result = engine.run(task, dense, policy, Budget("flops", 0.5), cfg)
    save_model(
        tmp_path / "m.pt", result.model, task_cfg, "unstructured", [], policy.to_dict(), {}, architecture_key(dense)
    )
    model, _, record = load_model(tmp_path / "m.pt", {"data_dir": str(data)})
    x = task.example_input(2)
    torch.testing.assert_close(model(x), result.model.eval()(x))
    assert record.structure == "unstructured"
