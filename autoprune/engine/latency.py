"""A latency model of the hardware: NetAdapt's lookup table (Yang et al. 2018).

For one model, device, batch size and thread count, every conv, linear and norm layer is
timed on its own, at a few widths of the channels pruning can change (its input and output
channels: a grid over both for a conv or linear layer, one axis for a depthwise conv or a
norm layer), on inputs of the shape it sees in the model. A pruned model's latency is then
predicted as the sum of its layers' latencies at their kept widths (interpolated in the
grid) plus the rest of the dense model's measured latency (activations, additions,
pooling: everything the table does not time), which is taken as fixed.

Timing is interleaved (every width of a layer is timed once per round), after warm-up, and
the median of the rounds is kept (:func:`autoprune.engine.measure.time_interleaved`). The
table is plain data: it is cached on disk as JSON beside the dense model, keyed by the
model's architecture hash, the input shape, the device's name, the batch, the threads and
the torch version, and a search sends it to its trials through Ray's object store.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import AutopruneError
from .costs import CostModel
from .graph import NORM_TYPES, PRUNABLE_TYPES, PrunableGraph
from .inputs import model_input, shape_key
from .measure import device_name, model_device, quartiles, time_interleaved, timing_threads

VERSION = 4  # bump when the table's layout or method changes: older cache files are rebuilt
GRID_2D = (0.1, 0.3, 0.55, 0.8, 1.0)  # widths timed per axis of a conv or linear layer
GRID_1D = (0.1, 0.25, 0.4, 0.55, 0.7, 0.85, 1.0)  # widths timed for a depthwise conv or norm layer
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

    def shares(self, cin: int, cout: int) -> tuple[float, float]:
        """(output activations, parameters) kept at (``cin``, ``cout``), as fractions of dense."""
        out = cout / self.cout[-1]
        return out, out * (1.0 if self.kind == "channels" else cin / self.cin[-1])

    def at(self, cin: int, cout: int) -> float:
        """Latency at (``cin``, ``cout``) channels: bilinear in the grid, linear beyond it."""
        if self.kind == "scaled":
            return self.ms[0][0] * (cin / self.cin[0]) * (cout / self.cout[0])
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


def table_key(model: nn.Module, input_shape: tuple[int, ...], device: torch.device, batch: int, threads: int) -> dict:
    from .checkpoint import architecture_key

    return {
        "version": VERSION,
        "architecture": architecture_key(model),
        "input_shape": shape_key(input_shape),
        "device": device_name(device),
        "batch": batch,
        "threads": threads if device.type == "cpu" else None,
        "torch": torch.__version__,
    }


def table_path(cache: Path, key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return cache / f"latency-{digest}.json"


def latency_table(
    model: nn.Module,
    input_shape: tuple[int, ...],
    batch: int,
    threads: int,
    cache: Path | None = None,
    log: Callable[[str], None] | None = None,
) -> LatencyTable:
    """The latency table of ``model`` (dense) on its device: read from ``cache`` when a
    table with the same key is there, else built (seconds to minutes) and written there."""
    device = model_device(model)
    key = table_key(model, input_shape, device, batch, threads)
    path = table_path(cache, key) if cache is not None else None
    if path is not None and path.is_file():
        try:
            table = LatencyTable.from_dict(json.loads(path.read_text()))
            if table.key == key:
                table.cached = True
                if log:
                    log(f"latency table: cached {path}")
                return table
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
            if log:  # unreadable, damaged or from another version: built again below
                log(f"latency table: the cached {path} cannot be used ({type(exc).__name__}); building it again")
    if log:
        log(f"latency table: timing the layers of the model on {key['device']} at batch {batch} (cached after)")
    table = build_table(model, input_shape, batch, threads, key)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")  # builders side by side each write their own
        tmp.write_text(json.dumps(table.to_dict()) + "\n")
        tmp.replace(path)
    return table


def _graph(model: nn.Module, example: torch.Tensor) -> PrunableGraph | None:
    try:
        return PrunableGraph(model, example)
    except AutopruneError:
        return None  # no channel group: every layer stays dense


def _pruned_axes(graph: PrunableGraph | None) -> dict[str, set[str]]:
    """Per module, the channel dims ("in", "out") that channel pruning may change."""
    if graph is None:
        return {}
    costs = CostModel(graph, {}, 0.0)
    axes: dict[str, set[str]] = {}
    for effects in costs.effects:
        for module, dim, _ in effects:
            axes.setdefault(module, set()).add(dim)
    return axes


def _shapes(model: nn.Module, example: torch.Tensor) -> dict[str, tuple[tuple[int, ...], int]]:
    """Per conv, linear and norm layer: its input's shape and its output's size, per sample."""
    shapes: dict[str, tuple[tuple[int, ...], int]] = {}

    def record(name: str, _module, args, output) -> None:
        if isinstance(output, torch.Tensor):
            shapes.setdefault(name, (tuple(args[0].shape[1:]), output[0].numel()))

    handles = [
        m.register_forward_hook(partial(record, name))
        for name, m in model.named_modules()
        if isinstance(m, (*PRUNABLE_TYPES, *NORM_TYPES))
    ]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in handles:
            h.remove()
    return shapes


def _widths(size: int, grid: tuple[float, ...]) -> list[int]:
    return sorted({max(1, int(round(f * size))) for f in grid} | {size})


def _layer(module: nn.Module, cin: int, cout: int) -> nn.Module:
    """A fresh layer like ``module`` with ``cin`` input and ``cout`` output channels."""
    if isinstance(module, nn.Linear):
        return nn.Linear(cin, cout, bias=module.bias is not None)
    if isinstance(module, NORM_TYPES):
        return type(module)(cout, eps=module.eps, affine=module.affine)
    groups = cin if module.groups > 1 and module.groups == module.in_channels else module.groups
    return type(module)(
        cin,
        cout,
        module.kernel_size,
        module.stride,
        module.padding,
        module.dilation,
        groups,
        module.bias is not None,
        module.padding_mode,
    )


def _kind(module: nn.Module) -> str:
    if isinstance(module, NORM_TYPES):
        return "channels"
    if isinstance(module, nn.Linear):
        return "linear"
    if module.groups > 1:
        return "channels" if module.groups == module.in_channels else "scaled"
    return "conv"


def _time_layer(
    module: nn.Module, shape: tuple[int, ...], kind: str, axes: set[str], batch: int, device: torch.device
) -> LayerLatency:
    if isinstance(module, nn.Linear):
        cin0, cout0, channel_dim = module.in_features, module.out_features, len(shape) - 1
    elif isinstance(module, NORM_TYPES):
        cin0 = cout0 = module.num_features
        channel_dim = 0
    else:
        cin0, cout0, channel_dim = module.in_channels, module.out_channels, 0
    if kind == "channels":
        cins, couts = [cin0], _widths(cout0, GRID_1D) if axes else [cout0]
        configs = [(c, c) for c in couts]
    elif kind == "scaled":
        cins, couts = [cin0], [cout0]
        configs = [(cin0, cout0)]
    else:
        cins = _widths(cin0, GRID_2D) if "in" in axes else [cin0]
        couts = _widths(cout0, GRID_2D) if "out" in axes else [cout0]
        configs = [(a, b) for a in cins for b in couts]
    inputs: dict[int, torch.Tensor] = {}
    calls = []
    for cin, cout in configs:
        if cin not in inputs:
            s = list(shape)
            s[channel_dim] = cin
            inputs[cin] = torch.randn(batch, *s, device=device)
        layer = _layer(module, cin, cout).to(device).eval()
        calls.append(partial(layer, inputs[cin]))
    samples = time_interleaved(calls, device, WARMUP, ROUNDS)
    medians = [statistics.median(s) for s in samples]
    if kind == "channels":
        ms = [medians]
    else:
        ms = [medians[i * len(couts) : (i + 1) * len(couts)] for i in range(len(cins))]
    return LayerLatency(kind, cins, couts, ms)


CALIBRATION = (0.75, 0.5, 0.3)  # kept channel shares of the uniform whole-model variants the rest is fitted on
RANDOM_VARIANTS = 5  # and this many variants whose groups keep random shares (10% to 100%)


def build_table(model: nn.Module, input_shape: tuple[int, ...], batch: int, threads: int, key: dict) -> LatencyTable:
    """Time every conv, linear and norm layer of ``model`` at its prunable widths; then time
    the dense model side by side with channel-pruned variants of it (every group keeping the
    shares of :data:`CALIBRATION`, and :data:`RANDOM_VARIANTS` random allocations) and fit
    the rest, the time the isolated layers do not account for, as a fixed part plus parts
    proportional to the kept activations and to the kept parameters (:func:`_fit_rest`).
    Timed alone, a layer finds its weights in cache; inside the model they come from memory,
    which is why the parameter term matters on small inputs."""
    from .prune import prune_channels

    t0 = time.perf_counter()
    device = model_device(model)
    was_training = model.training
    model.eval()
    try:
        example = model_input(input_shape, 1, device, zeros=True)
        graph = _graph(model, example)
        axes = _pruned_axes(graph)
        layers = {}
        with timing_threads(device, threads):
            for name, (shape, out_elements) in _shapes(model, example).items():
                m = model.get_submodule(name)
                kind = _kind(m)
                layers[name] = _time_layer(m, shape, kind, axes.get(name, set()), batch, device)
                layers[name].out_elements = out_elements
                layers[name].weights = sum(p.numel() for p in m.parameters(recurse=False))
            variants = [model]
            if graph is not None:
                rng = np.random.default_rng(0)
                for i in range(len(CALIBRATION) + RANDOM_VARIANTS):
                    plan = {}
                    for g in graph.groups:
                        keep = CALIBRATION[i] if i < len(CALIBRATION) else rng.uniform(0.1, 1.0)
                        plan[g.name] = rng.permutation(g.size)[: g.size - max(1, int(round(keep * g.size)))]
                    variants.append(prune_channels(model, example, plan)[0].eval())
            x = model_input(input_shape, batch, device)
            samples = time_interleaved([partial(v, x) for v in variants], device, WARMUP, 2 * ROUNDS)
    finally:
        model.train(was_training)
    table = LatencyTable(key, statistics.median(samples[0]), list(quartiles(samples[0])), [1.0, 0.0, 0.0, 0.0], layers)
    for v, s in zip(variants, samples):
        widths = module_widths(v)
        table.calibration.append([*table._shares(widths), table._layers_ms(widths), statistics.median(s)])
    table.fit = _fit(table.calibration)
    table.build_s = time.perf_counter() - t0
    return table


def _fit(points: list[list[float]]) -> list[float]:
    """[scale, fixed, a, w] minimising the squared error of measured = scale * layers + fixed
    + a * activation share + w * parameter share over the calibration points, with scale >= 1
    (inside the model a layer is never faster than timed alone, with its weights in cache)
    and the rest >= 0: the best least-squares fit of measured - layers over the subsets of
    the terms (scale - 1, fixed, a, w) whose coefficients all come out >= 0."""
    x = np.array([[p[2], 1.0, p[0], p[1]] for p in points])
    y = np.array([p[3] - p[2] for p in points])
    best, best_error = np.array([0.0, max(0.0, float(y.mean())), 0.0, 0.0]), math.inf
    for subset in itertools.product((0, 1), repeat=4):
        cols = [i for i in range(4) if subset[i]]
        if not cols:
            continue
        coef, *_ = np.linalg.lstsq(x[:, cols], y, rcond=None)
        if (coef < 0).any():
            continue
        full = np.zeros(4)
        full[cols] = coef
        error = float(((x @ full - y) ** 2).sum())
        if error < best_error:
            best, best_error = full, error
    return [1.0 + float(best[0]), *(float(c) for c in best[1:])]
