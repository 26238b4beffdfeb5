"""Exported models (torch.export's .pt2, ONNX) take any batch size and compute what the
PyTorch model computes; an ONNX model is one file that runs wherever it is copied; a model
that cannot be exported so is refused in one line that names it."""

from __future__ import annotations

import shutil

import pytest
import torch
from torch import nn

from autoprune import engine
from autoprune.config import Budget, Policy
from autoprune.engine.export import export_model, exported_program, save_onnx
from autoprune.engine.measure import measure
from autoprune.errors import AutopruneError

BATCHES = (1, 32)


@pytest.fixture(scope="module")
def pruned(digits_task, digits_dense):
    """The trained digits model pruned to half its FLOPs (channels), and real test digits."""
    policy = Policy(structure="channel", criterion="magnitude", scope="global")
    dense_cost = measure(digits_dense, digits_task.input_shape, None, latency=False)
    scores = engine.score(digits_dense, policy, None, seed=0)
    model = engine.prune_to_budget(digits_dense, digits_task, policy, Budget("flops", 0.5), scores, dense_cost).model
    images = next(iter(digits_task.loader("test")))[0]
    assert images.shape[0] >= max(BATCHES)
    return model.cpu().eval(), digits_task.example_input(), images


def _reference(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


def _largest_difference(got, want: torch.Tensor) -> float:
    got = torch.as_tensor(got).detach()
    assert got.shape == want.shape
    return float((got - want).abs().max())


def test_pt2_runs_at_batch_1_and_32(pruned, tmp_path):
    model, example, images = pruned
    files = export_model(model, example, tmp_path / "m.pt2", "pt2")
    assert files == [tmp_path / "m.pt2"] and sorted(p.name for p in tmp_path.iterdir()) == ["m.pt2"]
    program = torch.export.load(str(files[0])).module()
    for batch in BATCHES:
        x = images[:batch]
        assert _largest_difference(program(x), _reference(model, x)) < 1e-4, batch


def test_onnx_is_one_file_with_a_symbolic_batch_that_runs_where_it_is_copied(pruned, tmp_path):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    model, example, images = pruned
    files = export_model(model, example, tmp_path / "out" / "m.onnx", "onnx")
    assert files == [tmp_path / "out" / "m.onnx"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["m.onnx"]  # no m.onnx.data
    (tmp_path / "elsewhere").mkdir()
    copy = shutil.copy(files[0], tmp_path / "elsewhere" / "copied.onnx")
    shutil.rmtree(tmp_path / "out")  # nothing of the original location is left to read
    graph = onnx.load(copy)
    onnx.checker.check_model(graph)
    for value in (*graph.graph.input, *graph.graph.output):
        assert value.type.tensor_type.shape.dim[0].dim_param == "batch", value.name
    session = ort.InferenceSession(copy, providers=["CPUExecutionProvider"])
    [name] = [i.name for i in session.get_inputs()]
    for batch in BATCHES:
        x = images[:batch]
        [got] = session.run(None, {name: x.numpy()})
        assert _largest_difference(got, _reference(model, x)) < 1e-4, batch


def test_onnx_weights_kept_apart_are_a_second_file_named_beside_the_model(pruned, tmp_path):
    """The form that weights over 2 GiB take, written here for a small model."""
    onnx = pytest.importorskip("onnx")
    model, example, _ = pruned
    program = exported_program(model, example, "digits_resnet")
    files = save_onnx(program, tmp_path / "big.onnx", True, "digits_resnet")
    assert files == [tmp_path / "big.onnx", tmp_path / "big.onnx.data"]
    assert all(p.stat().st_size > 0 for p in files)
    graph = onnx.load(str(files[0]), load_external_data=False)
    assert {e.value for init in graph.graph.initializer for e in init.external_data if e.key == "location"} == {
        "big.onnx.data"
    }
    (tmp_path / "alone").mkdir()
    shutil.copy(files[0], tmp_path / "alone")
    with pytest.raises(onnx.checker.ValidationError, match=r"big\.onnx\.data"):  # the model file alone is not enough
        onnx.load(str(tmp_path / "alone" / "big.onnx"))


class ReshapesToOne(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        return self.fc(x.reshape(1, 64))


class AddsABatchOfTwo(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 10)
        self.register_buffer("shift", torch.ones(2, 10))

    def forward(self, x):
        return self.fc(x.flatten(1)) + self.shift


class BranchesOnTheBatch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        out = self.fc(x.flatten(1))
        return out * 2 if x.shape[0] > 1 else out


@pytest.mark.parametrize("fmt", ["pt2", "onnx"])
@pytest.mark.parametrize(
    "cls, reason",
    [
        (ReshapesToOne, "fails on a batch of 2"),
        (AddsABatchOfTwo, "fixes the batch size"),
        (BranchesOnTheBatch, "another result on a batch of 1"),
    ],
)
def test_a_model_that_fixes_its_batch_is_refused_in_one_line(tmp_path, fmt, cls, reason):
    if fmt == "onnx":
        pytest.importorskip("onnx")
    torch.manual_seed(0)
    with pytest.raises(AutopruneError) as refused:
        export_model(cls(), torch.randn(1, 1, 8, 8), tmp_path / f"m.{fmt}", fmt, name="fixed_net")
    message = str(refused.value)
    assert "'fixed_net'" in message and reason in message and "any batch size" in message, message
    assert "\n" not in message and len(message) < 400, message
    assert not list(tmp_path.iterdir())


@torch.library.custom_op("autoprune_test::twice", mutates_args=())
def _twice(x: torch.Tensor) -> torch.Tensor:
    return x * 2


@_twice.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


class Twice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return _twice(self.fc(x))


def test_an_operator_without_an_onnx_form_is_refused_with_the_pt2_way_out(tmp_path):
    pytest.importorskip("onnx")
    model = Twice().eval()
    with pytest.raises(AutopruneError) as refused:
        export_model(model, torch.randn(1, 4), tmp_path / "m.onnx", "onnx", name="twice_net")
    message = str(refused.value)
    assert "'twice_net' cannot be converted to ONNX" in message and "autoprune_test.twice" in message, message
    assert "--format pt2" in message and "\n" not in message
    assert not (tmp_path / "m.onnx").exists()
    [path] = export_model(model, torch.randn(1, 4), tmp_path / "m.pt2", "pt2")  # the way out works
    x = torch.randn(5, 4)
    assert _largest_difference(torch.export.load(str(path)).module()(x), _reference(model, x)) == 0


def test_an_unknown_format_names_the_known_ones(tmp_path):
    with pytest.raises(AutopruneError, match="unknown export format 'tflite'; choose one of: pt2, onnx"):
        export_model(nn.Linear(4, 3), torch.randn(1, 4), tmp_path / "m.tflite", "tflite")
