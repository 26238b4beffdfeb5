"""A latency model of the hardware: NetAdapt's lookup table (Yang et al. 2018).

For one model, device, batch size, thread count and runtime (torch, or ONNX Runtime:
``engine.runtime``), every conv, linear and norm layer is timed on its own, at a few widths
of the channels pruning can change (its input and output channels: a grid over both for a
conv or linear layer, one axis for a depthwise conv or a norm layer), on inputs of the shape
it sees in the model. A pruned model's latency is then predicted as the sum of its layers'
latencies at their kept widths (interpolated in the grid) plus the rest of the dense
model's measured latency (activations, additions, pooling: everything the table does not
time), fitted on whole pruned variants (:mod:`autoprune.engine.latency_build`).

Widths are not all alike: kernels run a width that is a multiple of 8 or 16 faster than
one just above it, which they pad. So the grid's widths are multiples of
:data:`ALIGN` (where the layer is wide enough), and each wide axis is also timed at a few
widths just above one of them, from which the table learns the layer's width step (1, 4,
8 or 16, :data:`STEPS`): a width between multiples of the step costs what the next multiple
costs, and interpolation runs only between multiples, never across a step.

Timing is interleaved (every width of a layer is timed once per round), after warm-up, and
the median of the rounds is kept (:func:`autoprune.engine.measure.time_interleaved`). The
table is plain data: it is cached on disk as JSON beside the dense model, keyed by the
model's architecture hash, the input shape, the device's name, the batch, the threads and
the torch version and the runtime's, and a search sends it to its trials through Ray's object store.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from .graph import NORM_TYPES, PRUNABLE_TYPES
from .inputs import shape_key
from .measure import device_name

VERSION = 5  # bump when the table's layout or method changes: older cache files are rebuilt
GRID_2D = (0.1, 0.3, 0.55, 0.8, 1.0)  # widths timed per axis of a conv or linear layer
GRID_1D = (0.1, 0.25, 0.4, 0.55, 0.7, 0.85, 1.0)  # widths timed for a depthwise conv or norm layer
ALIGN = 16  # grid widths are multiples of this on axes at least twice as wide
STEPS = (1, 4, 8, 16)  # the width steps a layer's axis may show (and policy round_to's numbers)
STEP_SHARE = 0.25  # best_step: the largest step learned by layers holding this share of the probed time
ROUNDS, WARMUP = 9, 2  # interleaved rounds per layer (the median is kept), untimed calls first


@dataclass
class LayerLatency:
    """One layer's measured latency (ms) at widths ``cin`` x ``cout`` (``ms[i][j]``). An axis
    that pruning does not change has one width, the dense one. ``kind``: "conv"/"linear"
    (two axes), "channels" (depthwise conv or norm: one axis, ``cout``) or "scaled" (a
    grouped conv, timed dense and scaled by its kept share of the FLOPs)."""

    kind: str
    cin: list[int]
    cout: list[int]
    ms: list[list[float]]
    out_elements: int = 0  # output activation size per sample, at dense width
    weights: int = 0  # parameters, at dense width
    steps: list[int] = field(default_factory=lambda: [1, 1])  # learned width step of (cin, cout)
    probes: list[list[float]] = field(default_factory=list)  # [axis (0: cin, 1: cout), width, ms] the steps
    # were learned from

    def up(self, width: float, axis: int) -> float:
        """``width`` on ``axis`` as the hardware runs it: raised to the axis's next multiple
        of its step (at most the dense width)."""
        step = self.steps[axis]
        if step == 1:
            return width
        dense = (self.cin, self.cout)[axis][-1]
        return min(float(dense), math.ceil(width / step - 1e-9) * step)

    def shares(self, cin: int, cout: int) -> tuple[float, float]:
        """(output activations, parameters) kept at (``cin``, ``cout``), as fractions of dense."""
        out = cout / self.cout[-1]
        return out, out * (1.0 if self.kind == "channels" else cin / self.cin[-1])

    def at(self, cin: int, cout: int) -> float:
        """Latency at (``cin``, ``cout``) channels: bilinear in the grid, linear beyond it."""
        if self.kind == "scaled":
            return self.ms[0][0] * (cin / self.cin[0]) * (cout / self.cout[0])
        cin, cout = self.up(cin, 0), self.up(cout, 1)
        if self.kind == "channels":
            return _interp(self.cout, [row for row in self.ms[0]], cout)
        rows = [_interp(self.cout, row, cout) for row in self.ms]
        return _interp(self.cin, rows, cin)

    @property
    def dense_ms(self) -> float:
        return self.ms[-1][-1]


def _interp(xs: list[int], ys: list[float], x: float) -> float:
    if len(xs) == 1:
        return ys[0]
    i = int(np.clip(np.searchsorted(xs, x) - 1, 0, len(xs) - 2))
    x0, x1 = xs[i], xs[i + 1]
    return max(0.0, ys[i] + (ys[i + 1] - ys[i]) * (x - x0) / (x1 - x0))


@dataclass
class LatencyTable:
    """Predicted latency of a model's pruned variants on one device, batch and thread count."""

    key: dict[str, Any]  # what the table is valid for (see module docstring)
    dense_ms: float  # the dense model, measured whole (median)
    dense_spread: list[float]  # its quartiles over the rounds, in ms
    fit: list[float]  # the whole model from its layers: [layers' scale, fixed ms, ms per kept activation
    # share, ms per kept parameter share], fitted on the calibration timings (see _fit)
    layers: dict[str, LayerLatency]
    calibration: list[list[float]] = field(default_factory=list)  # per variant: [activation share, parameter
    # share, layers' ms, measured ms]
    build_s: float = 0.0  # how long building the table took
    cached: bool = field(default=False, compare=False)  # loaded from disk rather than built

    def predict(self, widths: dict[str, tuple[int, int]] | None = None) -> float:
        """Latency (ms) of the model with the layers in ``widths`` at those (input, output)
        channels and every other layer dense."""
        widths = widths or {}
        scale, fixed, per_activation, per_weight = self.fit
        activations, weights = self._shares(widths)
        return scale * self._layers_ms(widths) + fixed + per_activation * activations + per_weight * weights

    def _layers_ms(self, widths: dict[str, tuple[int, int]]) -> float:
        return sum(layer.at(*widths[n]) if n in widths else layer.dense_ms for n, layer in self.layers.items())

    def _shares(self, widths: dict[str, tuple[int, int]]) -> tuple[float, float]:
        """The kept shares of the layers' output activations and of their parameters."""
        totals, kept = np.zeros(2), np.zeros(2)
        for name, layer in self.layers.items():
            size = np.array([layer.out_elements, layer.weights], dtype=float)
            totals += size
            kept += size * (np.array(layer.shares(*widths[name])) if name in widths else 1.0)
        a, w = np.where(totals > 0, kept / np.maximum(totals, 1e-12), 1.0)
        return float(a), float(w)

    def best_step(self) -> int:
        """The width multiple this hardware runs fastest (policy ``round_to`` ``auto``):
        :func:`best_step` of its layers."""
        return best_step(self.layers.values())

    def predict_model(self, model: nn.Module) -> float:
        """Latency (ms) of ``model``, a pruned copy of the table's model (same module names)."""
        return self.predict(module_widths(model))

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("cached")
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LatencyTable:
        """A table as :meth:`to_dict` wrote it; ``ValueError`` on a damaged figure."""
        table = cls(**{**data, "layers": {k: LayerLatency(**v) for k, v in data["layers"].items()}})
        times = [t for layer in table.layers.values() for row in layer.ms for t in row] + table.dense_spread
        widths = [w for layer in table.layers.values() for w in (*layer.cin, *layer.cout)]
        if any(s not in STEPS for layer in table.layers.values() for s in layer.steps):
            raise ValueError("a latency table holds a width step that is not one of " + ", ".join(map(str, STEPS)))
        finite = all(isinstance(x, (int, float)) and math.isfinite(x) for x in [table.dense_ms, *times, *table.fit])
        if not (finite and table.dense_ms > 0 and min(times, default=0) >= 0 and min(widths, default=1) >= 1):
            raise ValueError("a latency table holds a negative, zero or non-finite figure")
        return table


def module_widths(model: nn.Module) -> dict[str, tuple[int, int]]:
    """(input, output) channels of every conv, linear and norm layer of ``model``."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            out[name] = (m.in_features, m.out_features)
        elif isinstance(m, PRUNABLE_TYPES):
            out[name] = (m.in_channels, m.out_channels)
        elif isinstance(m, NORM_TYPES) and m.num_features:
            out[name] = (m.num_features, m.num_features)
    return out


def best_step(layers: Iterable[LayerLatency]) -> int:
    """The largest step that layers holding at least :data:`STEP_SHARE` of the probed
    layers' dense time learned (a multiple of 16 is one of 8 too, so rounding to the larger
    step serves both); 1 where no layer was wide enough to learn one."""
    votes = [(s, layer.dense_ms) for layer in layers for s in _learned(layer)]
    total = sum(w for _, w in votes)
    for step in sorted(STEPS, reverse=True):
        if total > 0 and sum(w for s, w in votes if s >= step) >= STEP_SHARE * total:
            return step
    return 1


def _learned(layer: LayerLatency) -> list[int]:
    """The steps ``layer`` learned from its probes, one per probed axis."""
    return [layer.steps[axis] for axis in sorted({int(p[0]) for p in layer.probes})]


def table_key(
    model: nn.Module, input_shape: tuple[int, ...], device: torch.device, batch: int, threads: int, runtime: str
) -> dict:
    from .checkpoint import architecture_key
    from .runtime import runtime_version

    return {
        "version": VERSION,
        "architecture": architecture_key(model),
        "input_shape": shape_key(input_shape),
        "device": device_name(device),
        "batch": batch,
        "threads": threads if device.type == "cpu" else None,
        "torch": torch.__version__,
        "runtime": runtime_version(runtime),
    }
