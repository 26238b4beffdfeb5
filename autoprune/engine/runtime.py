"""The runtime a latency is timed in: torch eager, or ONNX Runtime running the model as
``autoprune export --format onnx`` writes it (dynamic batch, the same torch.export trace).

Models are deployed in a runtime of their own more often than in PyTorch, and a pruned
width can gain or lose differently there, so the latency table, a latency budget's timing
checks and the side-by-side report can all time in ONNX Runtime (``--latency-runtime``).
An ONNX Runtime session runs with ``threads`` intra-op threads (``--threads``), one
inter-op thread, every graph optimisation on, and its idle threads not spinning: timing is
interleaved, and a session spinning after its call would steal the next one's cores. A
single layer (the latency table times thousands) goes through the TorchScript exporter,
which is ten times faster and gives the same one-node graph.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch import nn

from ..config.run import LATENCY_RUNTIMES as RUNTIMES
from ..errors import AutopruneError

RUNTIME_NAMES = {"torch": "PyTorch", "onnxruntime": "ONNX Runtime"}
_INPUT = "input"


def check_runtime(runtime: str, device: torch.device) -> None:
    """Refuse a runtime that is not installed, or cannot run on ``device``, before any work."""
    if runtime not in RUNTIMES:
        raise AutopruneError(f"unknown latency runtime {runtime!r}; choose one of: {', '.join(RUNTIMES)}")
    if runtime == "torch":
        return
    try:
        import onnx  # noqa: F401
        import onnxruntime
        import onnxscript  # noqa: F401
    except ImportError:
        raise AutopruneError(
            "--latency-runtime onnxruntime needs the onnx extra: pip install 'autoprune[onnx]'"
        ) from None
    if device.type == "cuda" and "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        raise AutopruneError(
            "--latency-runtime onnxruntime on a GPU needs ONNX Runtime's CUDA provider (pip install "
            "onnxruntime-gpu); this onnxruntime offers: " + ", ".join(onnxruntime.get_available_providers())
        )


def runtime_version(runtime: str) -> str:
    """``torch 2.x`` or ``onnxruntime 1.x``: what a latency table is keyed by."""
    if runtime == "torch":
        return f"torch {torch.__version__}"
    import onnxruntime

    return f"onnxruntime {onnxruntime.__version__} (torch {torch.__version__} export)"


def describe_runtime(runtime: str, device: torch.device, threads: int) -> str:
    """How a latency was timed, for a person: ``ONNX Runtime 1.32.0, CPU, 2 threads``."""
    name = RUNTIME_NAMES.get(runtime, runtime)
    if runtime == "onnxruntime":
        import onnxruntime

        name += f" {onnxruntime.__version__}"
    where = "GPU" if device.type == "cuda" else f"CPU, {threads} thread{'s' if threads != 1 else ''}"
    return f"{name}, {where}"


def forward_calls(models: list[nn.Module], x: torch.Tensor, runtime: str, threads: int) -> list[Callable[[], Any]]:
    """One call per model: a forward pass of the batch ``x`` in ``runtime`` (the models in
    eval mode, on ``x``'s device)."""
    if runtime == "torch":
        return [partial(m, x) for m in models]
    return [onnx_call(onnx_bytes(m, x), x, threads) for m in models]


def layer_calls(layers: list[nn.Module], inputs: list[torch.Tensor], runtime: str, threads: int) -> list[Callable]:
    """:func:`forward_calls` for single layers, each with its own input; ONNX Runtime runs
    each as the TorchScript exporter writes it (see the module docstring)."""
    if runtime == "torch":
        return [partial(m, x) for m, x in zip(layers, inputs)]
    return [onnx_call(_layer_bytes(m, x), x, threads) for m, x in zip(layers, inputs)]


def overhead_call(x: torch.Tensor, runtime: str, threads: int) -> Callable[[], Any] | None:
    """A call that costs what ``runtime`` spends on any call besides the layer's own work,
    for the latency table to subtract from a layer timed alone: in ONNX Runtime, a session
    returning its input (``Identity``) as a layer's session would; None for torch, whose
    per-module call the model pays as well."""
    if runtime == "torch":
        return None
    from onnx import TensorProto, helper

    shape = ["batch", *x.shape[1:]]
    graph = helper.make_graph(
        [helper.make_node("Identity", [_INPUT], ["output"])],
        "overhead",
        [helper.make_tensor_value_info(_INPUT, TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, shape)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return onnx_call(model.SerializeToString(), x, threads)


def onnx_bytes(model: nn.Module, x: torch.Tensor) -> bytes:
    """``model`` as ``autoprune export --format onnx`` writes it, serialised in memory."""
    from .export import exported_program

    with _quiet():
        program = exported_program(model.eval(), x[:1], type(model).__name__)
        try:
            onnx_program = torch.onnx.export(program, f=None, dynamo=True, verbose=False)
        except torch.onnx.OnnxExporterError as exc:
            raise AutopruneError(
                f"the model cannot be converted to ONNX for timing ({type(exc).__name__}); use --latency-runtime torch"
            ) from None
    return onnx_program.model_proto.SerializeToString()


def _layer_bytes(layer: nn.Module, x: torch.Tensor) -> bytes:
    buf = io.BytesIO()
    with _quiet(), torch.no_grad():
        torch.onnx.export(
            layer,
            (x,),
            buf,
            dynamo=False,
            input_names=[_INPUT],
            dynamic_axes={_INPUT: {0: "batch"}},
        )
    return buf.getvalue()


def onnx_call(model: bytes, x: torch.Tensor, threads: int) -> Callable[[], Any]:
    """A zero-argument call running the ONNX ``model`` on ``x`` in an ONNX Runtime session."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3
    providers = ["CUDAExecutionProvider"] if x.device.type == "cuda" else ["CPUExecutionProvider"]
    session = ort.InferenceSession(model, options, providers=providers)
    name = session.get_inputs()[0].name
    feed = {name: x.detach().cpu().numpy()}
    return partial(session.run, None, feed)


@contextlib.contextmanager
def _quiet():
    """The exporters' warnings and log lines silenced while they run."""
    before = logging.root.manager.disable
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.disable(logging.WARNING)
        try:
            yield
        finally:
            logging.disable(before)
