"""Exporting a model for deployment: torch.export's ``.pt2`` archive or an ONNX file.

Both take any batch size: the batch (dimension 0 of the input) is exported as the symbolic
size ``batch``. The model is traced on a batch of two (its example input's first sample,
twice), since the tracer fixes a size of 1 as a constant, and the traced program is checked
against the model on batches of 1 and 3. An ONNX model is one self-contained file when its
weights fit in a protobuf message (2 GiB); a larger one keeps its weights in a second file,
``NAME.onnx.data``, which must stay beside it under that name.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..errors import AutopruneError
from .models import all_tensors, train_batch

FORMATS = ("pt2", "onnx")
ONNX_INLINE_BYTES = 2**31 - 2**27  # protobuf's 2 GiB message limit, less room for the graph itself
CHECKED_BATCHES = (1, 3)  # batch sizes the traced program must agree with the model on
_ANY_BATCH = (
    "write its forward so that it holds for any batch size (take sizes from the input, such as x.shape[0] or -1 "
    "in a reshape, never a constant batch)"
)


def export_model(
    model: nn.Module, example_input: torch.Tensor, out: str | Path, fmt: str, *, name: str | None = None
) -> list[Path]:
    """Export ``model`` (put in eval mode) to ``out`` as ``pt2`` (torch.export) or ``onnx``
    (needs the onnx extra), with a dynamic batch size. Returns every file written, ``out``
    first; an ONNX model over 2 GiB of weights adds ``out`` + ``.data``. ``name`` names the
    model in errors (default: its class)."""
    if fmt not in FORMATS:
        raise AutopruneError(f"unknown export format {fmt!r}; choose one of: {', '.join(FORMATS)}")
    if fmt == "onnx":
        _check_onnx_installed()
    name = name or type(model).__name__
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    program = exported_program(model.eval(), example_input, name)
    if fmt == "pt2":
        torch.export.save(program, str(out))
        return [out]
    return save_onnx(program, out, weight_bytes(model) > ONNX_INLINE_BYTES, name)


def exported_program(model: nn.Module, example_input: torch.Tensor, name: str) -> torch.export.ExportedProgram:
    """``model`` traced by torch.export with a dynamic dimension 0 (the batch). A model that
    fails on a batch of two, or whose computation fixes the batch size, is refused with the
    reason."""
    example = train_batch(example_input[:1])  # a batch of two: a traced size of 1 would be a constant
    try:
        with torch.no_grad():
            model(example)
    except Exception as exc:  # noqa: BLE001 - the model's own failure, on a batch of two
        raise AutopruneError(
            f"model {name!r} cannot be exported with a dynamic batch size: it fails on a batch of "
            f"{example.shape[0]} ({type(exc).__name__}: {_first_line(str(exc))}); {_ANY_BATCH}"
        ) from None
    try:
        program = torch.export.export(model, (example,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    except Exception as exc:  # noqa: BLE001 - torch reports a fixed size in several exception types
        text = str(exc)
        if "specializ" not in text and "Constraints violated" not in text:
            raise
        raise AutopruneError(
            f"model {name!r} cannot be exported with a dynamic batch size: its forward fixes the batch size "
            f"(torch.export: {_constraint(text)}); {_ANY_BATCH}"
        ) from None
    check_batches(model, program, example_input[:1], name)
    return program


def check_batches(model: nn.Module, program: torch.export.ExportedProgram, sample: torch.Tensor, name: str) -> None:
    """The traced ``program`` gives the model's outputs on batches of :data:`CHECKED_BATCHES`
    copies of ``sample``: a forward that branches on the batch size is traced one way only."""
    module = program.module()
    for batch in CHECKED_BATCHES:
        x = sample.expand(batch, *sample.shape[1:]).clone()
        try:
            with torch.no_grad():
                want, got = all_tensors(model(x)), all_tensors(module(x))
        except Exception as exc:  # noqa: BLE001 - a guard of the traced program, or the model's own failure
            raise AutopruneError(
                f"model {name!r} cannot be exported with a dynamic batch size: on a batch of {batch} it fails "
                f"({type(exc).__name__}: {_first_line(str(exc))}); {_ANY_BATCH}"
            ) from None
        if len(want) != len(got) or not all(_same(w, g) for w, g in zip(want, got)):
            raise AutopruneError(
                f"model {name!r} cannot be exported with a dynamic batch size: traced on a batch of 2, it computes "
                f"another result on a batch of {batch} (its forward depends on the batch size); {_ANY_BATCH}"
            )


def _same(want: torch.Tensor, got: torch.Tensor) -> bool:
    if want.shape != got.shape or want.dtype != got.dtype:
        return False
    if not want.is_floating_point() or want.numel() == 0:
        return torch.equal(want, got)
    scale = max(1.0, float(want.abs().max()))
    return torch.allclose(got, want, rtol=1e-3, atol=1e-4 * scale, equal_nan=True)


def weight_bytes(model: nn.Module) -> int:
    """Bytes of ``model``'s parameters and buffers (the initializers of its ONNX graph)."""
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


def save_onnx(program: torch.export.ExportedProgram, out: Path, external: bool, name: str) -> list[Path]:
    """Write ``program`` as the ONNX model ``out``, its batch dimension named ``batch``: one
    file, or (``external``) its weights in ``out`` + ``.data`` beside it. Returns the files
    written, ``out`` first."""
    try:
        onnx_program = torch.onnx.export(program, f=None, dynamo=True, verbose=False)
    except torch.onnx.OnnxExporterError as exc:  # an operator with no ONNX form (torch.export itself succeeded)
        root: BaseException = exc
        while root.__cause__ is not None:
            root = root.__cause__
        raise AutopruneError(
            f"model {name!r} cannot be converted to ONNX ({type(root).__name__}: {_first_line(str(root))}); "
            "export it with --format pt2, which holds any model torch.export traces"
        ) from None
    if hasattr(onnx_program, "rename_axes"):  # torch's symbol ("s77") becomes "batch"
        onnx_program.rename_axes({onnx_program.model.graph.inputs[0].shape[0]: "batch"})
    onnx_program.save(str(out), external_data=external)
    return [out, out.with_name(out.name + ".data")] if external else [out]


def _check_onnx_installed() -> None:
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError:
        raise AutopruneError("ONNX export needs the onnx extra: pip install 'autoprune[onnx]'") from None


def _first_line(text: str) -> str:
    lines = [line.strip(" -") for line in text.splitlines() if line.strip(" -")]
    return lines[0] if lines else "no detail"


def _constraint(text: str) -> str:
    """torch.export's reason for a violated constraint: its first listed item, without advice."""
    items = [line.strip(" -") for line in text.splitlines() if line.lstrip().startswith("- ")]
    return (items[0] if items else _first_line(text)).split(". ")[0].rstrip(".")
