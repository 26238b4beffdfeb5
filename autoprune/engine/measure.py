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
import statistics
import time
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from ..config import MeasureConfig
from .graph import PRUNABLE_TYPES


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

            analysis = FlopCountAnalysis(model, example_input)
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


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def latency_ms(model: nn.Module, input_shape: tuple[int, ...], batch: int, config: MeasureConfig) -> float:
    """Median wall time (ms) of one forward pass of a ``batch``, after ``config.warmup``
    untimed passes, with torch's intra-op threads set to ``config.threads`` on CPU."""
    device = model_device(model)
    x = torch.randn(batch, *input_shape, device=device)
    was_training = model.training
    model.eval()
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(config.threads)
    times = []
    try:
        with torch.inference_mode():
            for _ in range(config.warmup):
                model(x)
            _sync(device)
            for _ in range(config.repeats):
                t0 = time.perf_counter()
                model(x)
                _sync(device)
                times.append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(threads)
        model.train(was_training)
    return 1000.0 * statistics.median(times)


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
            "latency_ms": self.latency_ms.get(1, next(iter(self.latency_ms.values()), None)),
            "latency_ms_by_batch": {str(b): t for b, t in self.latency_ms.items()},
        }


def measure(model: nn.Module, input_shape: tuple[int, ...], config: MeasureConfig, latency: bool = True) -> Cost:
    """FLOPs, parameters and (optionally) latency of ``model`` on its device."""
    device = model_device(model)
    example = torch.zeros(1, *input_shape, device=device)
    lat = {b: latency_ms(model, input_shape, b, config) for b in config.batch_sizes} if latency else {}
    return Cost(effective_flops(model, example), count_params(model), lat)
