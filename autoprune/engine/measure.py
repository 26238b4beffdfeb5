"""Measurement: FLOPs (fvcore), effective FLOPs for masked weights, parameters, latency.

FLOPs follow fvcore's convention: one fused multiply-add is one FLOP; convolutions, linear
layers, batch norm and pooling are counted, element-wise ops (add, relu) count 0. Effective
FLOPs of a masked layer are its dense FLOPs times its weight density (ShrinkBench's
convention). Latency is measured, never derived: the median of timed forward passes after
warm-up, with torch's thread count fixed, on the model's own device.
"""

from __future__ import annotations

import contextlib
import logging
import platform
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..config import MeasureConfig
from ..errors import AutopruneError
from .graph import PRUNABLE_TYPES
from .inputs import model_input
from .runtime import forward_calls


@contextlib.contextmanager
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logger = logging.getLogger("fvcore")
        level = logger.level
        logger.setLevel(logging.ERROR)
        try:
            yield
        finally:
            logger.setLevel(level)


def flops_by_module(model: nn.Module, example_input: torch.Tensor) -> tuple[float, dict[str, float]]:
    """fvcore's total FLOPs for one forward pass of ``example_input`` and the FLOPs of each
    module (keys are module names, "" the whole model)."""
    was_training = model.training
    model.eval()
    try:
        with _quiet(), torch.no_grad():
            from fvcore.nn import FlopCountAnalysis

            from .attention import attention_flops

            analysis = FlopCountAnalysis(model, example_input)
            analysis.set_op_handle("aten::scaled_dot_product_attention", attention_flops)
            analysis.unsupported_ops_warnings(False)
            analysis.uncalled_modules_warnings(False)
            analysis.tracer_warnings("none")
            total = float(analysis.total())
            by_module = {k: float(v) for k, v in analysis.by_module().items()}
    finally:
        model.train(was_training)
    return total, by_module


def weight_density(module: nn.Module) -> float:
    w = module.weight
    return float(torch.count_nonzero(w).item()) / w.numel()


def effective_flops(model: nn.Module, example_input: torch.Tensor) -> float:
    """fvcore FLOPs with every conv/linear layer scaled by the density of its weights."""
    total, by_module = flops_by_module(model, example_input)
    for name, m in model.named_modules():
        if isinstance(m, PRUNABLE_TYPES):
            total -= by_module.get(name, 0.0) * (1.0 - weight_density(m))
    return total


def count_params(model: nn.Module) -> int:
    """Parameters, with masked (zero) conv/linear weights not counted."""
    n = sum(p.numel() for p in model.parameters())
    for m in model.modules():
        if isinstance(m, PRUNABLE_TYPES):
            n -= m.weight.numel() - int(torch.count_nonzero(m.weight).item())
    return int(n)


def model_device(model: nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def device_name(device: torch.device | str) -> str:
    """The hardware a latency belongs to: the GPU's name, or the CPU's model name."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            return next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine() or "cpu"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def timing_threads(device: torch.device, threads: int):
    """Torch's intra-op threads fixed to ``threads`` while timing on the CPU."""
    saved = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


MIN_ROUNDS = 3  # rounds a time cap leaves at least


def time_interleaved(
    calls: list[Callable[[], Any]], device: torch.device, warmup: int, rounds: int, seconds: float | None = None
) -> list[list[float]]:
    """Milliseconds of each of ``calls``, ``rounds`` samples each, taken side by side: every
    call is warmed up (``warmup`` untimed calls), then each round times every call once, in
    an order that reverses from round to round, so drift and load from other processes hit
    all calls alike. On CUDA the device is synchronised around every sample. With
    ``seconds``, warm-up and rounds stop once that much time has passed (after at least one
    warm-up call each and ``MIN_ROUNDS`` rounds): a big model on CPU is timed fewer times."""
    began = time.perf_counter()

    def over() -> bool:
        return seconds is not None and time.perf_counter() - began > seconds

    with torch.inference_mode():
        for call in calls:
            for w in range(warmup):
                if w and over():
                    break
                call()
        _sync(device)
        samples: list[list[float]] = [[] for _ in calls]
        for r in range(rounds):
            if r >= MIN_ROUNDS and over():
                break
            order = range(len(calls)) if r % 2 == 0 else range(len(calls) - 1, -1, -1)
            for i in order:
                t0 = time.perf_counter()
                calls[i]()
                _sync(device)
                samples[i].append(1000.0 * (time.perf_counter() - t0))
    return samples


def latency_ms(model: nn.Module, input_shape: tuple[int, ...], batch: int, config: MeasureConfig) -> float:
    """Median wall time (ms) of one forward pass of a ``batch``, after ``config.warmup``
    untimed passes, with torch's intra-op threads set to ``config.threads`` on CPU."""
    return side_by_side([model], input_shape, batch, config)[0].median_ms


def forward_bytes(model: nn.Module, example: torch.Tensor) -> int:
    """Bytes one sample's forward pass may hold at once, estimated from a pass over
    ``example`` (one sample): the input plus three times the largest output of any layer
    (the output being written, the input it is read from, a residual kept aside)."""
    largest = [0]

    def hook(_m, _i, out) -> None:
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                largest[0] = max(largest[0], t.numel() * t.element_size())

    handles = [m.register_forward_hook(hook) for m in model.modules() if not list(m.children())]
    try:
        with torch.inference_mode():
            model(example)
    finally:
        for h in handles:
            h.remove()
    return example.numel() * example.element_size() + 3 * largest[0]


def free_memory(device: torch.device) -> int:
    """Bytes free for new tensors on ``device``: the GPU's free memory, or the memory the
    operating system reports available."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    import psutil

    return psutil.virtual_memory().available


def check_latency_batch(model: nn.Module, example: torch.Tensor, batch: int, device: torch.device) -> None:
    """Refuse a ``--latency-batch`` whose forward pass cannot fit in ``device``'s free memory
    (:func:`forward_bytes` per sample), before any training: the timing would otherwise fail
    on an allocation after the work."""
    per_sample = forward_bytes(model, example)
    free = free_memory(device)
    if batch * per_sample > 0.8 * free:
        fits = max(1, int(0.8 * free // max(per_sample, 1)))
        raise AutopruneError(
            f"--latency-batch {batch} needs about {batch * per_sample / 2**30:.1f} GiB for one forward pass of "
            f"this model ({per_sample / 2**20:.2f} MiB a sample), and {device} has {free / 2**30:.1f} GiB free; "
            f"use --latency-batch {fits} or less"
        )


def out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is torch failing to allocate (a GPU's or the CPU allocator's)."""
    return isinstance(exc, torch.OutOfMemoryError) or "can't allocate memory" in str(exc)


@dataclass
class Timed:
    """One model's latency from :func:`side_by_side`."""

    median_ms: float
    samples: list[float]


def side_by_side(
    models: list[nn.Module], input_shape: tuple[int, ...], batch: int, config: MeasureConfig
) -> list[Timed]:
    """The latency of each of ``models`` (all on one device) on one random ``batch``, timed
    interleaved in one run (:func:`time_interleaved`, ``config.repeats`` rounds after
    ``config.warmup`` untimed passes), torch's threads fixed to ``config.threads`` on CPU,
    in ``config.runtime`` (torch, or ONNX Runtime on each model's ONNX export)."""
    device = model_device(models[0])
    modes = [m.training for m in models]
    for m in models:
        m.eval()
    try:
        x = model_input(input_shape, batch, device)
        with timing_threads(device, config.threads):
            calls = forward_calls(models, x, config.runtime, config.threads)
            samples = time_interleaved(calls, device, config.warmup, config.repeats, config.seconds)
    except RuntimeError as exc:  # torch.OutOfMemoryError is one
        if not out_of_memory(exc):
            raise
        raise AutopruneError(
            f"timing a batch of {batch} ran out of memory on {device}; use a smaller --latency-batch"
        ) from None
    finally:
        for m, mode in zip(models, modes):
            m.train(mode)
    return [Timed(statistics.median(s), s) for s in samples]


def quartiles(values: list[float]) -> tuple[float, float]:
    if len(values) < 2:
        return (values[0], values[0])
    q = statistics.quantiles(values, n=4, method="inclusive")
    return (q[0], q[2])


def speedup(
    dense: nn.Module, pruned: nn.Module, input_shape: tuple[int, ...], batch: int, config: MeasureConfig
) -> dict[str, Any]:
    """Dense against pruned, timed side by side: both latencies (median ms) and the speed-up,
    the median over rounds of dense time / pruned time in the same round, with its spread
    (the quartiles of those ratios)."""
    d, p = side_by_side([dense, pruned], input_shape, batch, config)
    ratios = [a / b for a, b in zip(d.samples, p.samples)]
    return {
        "dense_ms": d.median_ms,
        "pruned_ms": p.median_ms,
        "speedup": statistics.median(ratios),
        "spread": list(quartiles(ratios)),
    }


@dataclass
class Cost:
    """A model's measured cost."""

    flops: float  # fvcore FLOPs per sample (effective FLOPs for masked weights)
    params: int  # parameters (nonzero for masked weights)
    latency_ms: dict[int, float]  # batch size -> median forward time in ms

    def to_dict(self) -> dict:
        return {
            "flops": self.flops,
            "params": self.params,
            "latency_measured_ms": self.latency_ms.get(1, next(iter(self.latency_ms.values()), None)),
            "latency_ms_by_batch": {str(b): t for b, t in self.latency_ms.items()},
        }


def measure(model: nn.Module, input_shape: tuple[int, ...], config: MeasureConfig, latency: bool = True) -> Cost:
    """FLOPs, parameters and (optionally) latency of ``model`` on its device."""
    device = model_device(model)
    example = model_input(input_shape, 1, device, zeros=True)
    lat = {b: latency_ms(model, input_shape, b, config) for b in config.batch_sizes} if latency else {}
    return Cost(effective_flops(model, example), count_params(model), lat)
