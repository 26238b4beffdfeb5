"""Building a latency table (:mod:`autoprune.engine.latency`) and caching it: every layer
timed alone at the grid's widths and at the probes that teach it its width step, then whole
pruned variants timed side by side to fit the rest of the model's time."""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import statistics
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import AutopruneError
from .costs import CostModel
from .graph import NORM_TYPES, PRUNABLE_TYPES, PrunableGraph
from .inputs import model_input
from .latency import (
    ALIGN,
    GRID_1D,
    GRID_2D,
    ROUNDS,
    STEPS,
    WARMUP,
    LatencyTable,
    LayerLatency,
    best_step,
    module_widths,
    table_key,
)
from .measure import model_device, quartiles, time_interleaved, timing_threads
from .runtime import check_runtime, forward_calls, layer_calls, overhead_call


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
    runtime: str = "torch",
) -> LatencyTable:
    """The latency table of ``model`` (dense) on its device, timed in ``runtime``: read from
    ``cache`` when a table with the same key is there, else built (seconds to minutes) and
    written there."""
    device = model_device(model)
    check_runtime(runtime, device)
    key = table_key(model, input_shape, device, batch, threads, runtime)
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
        log(
            f"latency table: timing the layers of the model in {key['runtime']} on {key['device']} at batch "
            f"{batch} (cached after)"
        )
    table = build_table(model, input_shape, batch, threads, key, runtime)
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
    """The widths a grid of shares gives an axis of ``size``: multiples of :data:`ALIGN`
    where the axis is at least twice that wide, and the dense width."""
    if size < 2 * ALIGN:
        return sorted({max(1, int(round(f * size))) for f in grid} | {size})
    return sorted({max(ALIGN, int(round(f * size / ALIGN)) * ALIGN) for f in grid} | {size})


PROBES = (0, 1, 4, 8, 16)  # offsets above an aligned width timed to learn an axis's step


def _probe_widths(size: int) -> list[int]:
    """The widths timed to learn the step of an axis of ``size``: a multiple of
    :data:`ALIGN` near half of it and :data:`PROBES` above (none on an axis under 3 x ALIGN)."""
    if size < 3 * ALIGN:
        return []
    base = min(max(ALIGN, int(round(size / 2 / ALIGN)) * ALIGN), (size - ALIGN) // ALIGN * ALIGN)
    return [base + k for k in PROBES]


def learn_step(times: list[float]) -> int:
    """The width step (one of :data:`STEPS`) that best explains the latencies ``times`` at
    the :data:`PROBES` offsets above an aligned width: a step ``s`` predicts that a width
    costs what its next multiple of ``s`` costs, the cost growing linearly from the first
    probe to the last. A step is learned only where it explains the timings clearly better
    than linear growth (by more than 5% of the aligned width's time), and where the last
    probe costs more than the first; else 1."""
    first, last = times[0], times[-1]
    if first <= 0 or last <= first:  # nothing timed after the runtime's own cost, or no growth to explain
        return 1

    def error(step: int) -> float:
        return sum(
            (t - first - (last - first) * min(PROBES[-1], math.ceil(k / step) * step) / PROBES[-1]) ** 2
            for k, t in zip(PROBES[1:-1], times[1:-1])
        )

    best = min(STEPS, key=lambda s: (error(s), s))
    return best if error(1) - error(best) > (0.05 * first) ** 2 else 1


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
    module: nn.Module, shape: tuple[int, ...], kind: str, axes: set[str], batch: int, device: torch.device, timing
) -> LayerLatency:
    """Time ``module`` alone at its grid's widths and its probes' (``timing``: runtime and
    threads), less what the runtime spends on any call (:func:`overhead_call`)."""
    if isinstance(module, nn.Linear):
        cin0, cout0, channel_dim = module.in_features, module.out_features, len(shape) - 1
    elif isinstance(module, NORM_TYPES):
        cin0 = cout0 = module.num_features
        channel_dim = 0
    else:
        cin0, cout0, channel_dim = module.in_channels, module.out_channels, 0
    probes: list[tuple[int, int, int]] = []  # (axis, cin, cout)
    if kind == "channels":
        cins, couts = [cin0], _widths(cout0, GRID_1D) if axes else [cout0]
        grid = [(c, c) for c in couts]
        norm = isinstance(module, NORM_TYPES)  # element-wise: no kernel pads its width
        probes = [(1, w, w) for w in _probe_widths(cout0)] if axes and not norm else []
    elif kind == "scaled":
        cins, couts = [cin0], [cout0]
        grid = [(cin0, cout0)]
    else:
        cins = _widths(cin0, GRID_2D) if "in" in axes else [cin0]
        couts = _widths(cout0, GRID_2D) if "out" in axes else [cout0]
        grid = [(a, b) for a in cins for b in couts]
        probes = [(0, w, cout0) for w in (_probe_widths(cin0) if "in" in axes else [])]
        probes += [(1, cin0, w) for w in (_probe_widths(cout0) if "out" in axes else [])]
    configs = list(dict.fromkeys([*grid, *((a, b) for _, a, b in probes)]))
    inputs: dict[int, torch.Tensor] = {}
    for cin, _ in configs:
        if cin not in inputs:
            s = list(shape)
            s[channel_dim] = cin
            inputs[cin] = torch.randn(batch, *s, device=device)
    calls = layer_calls(
        [_layer(module, a, b).to(device).eval() for a, b in configs], [inputs[a] for a, _ in configs], *timing
    )
    overhead = overhead_call(inputs[max(inputs)], *timing)  # on the widest (dense) input
    samples = time_interleaved([*calls, overhead] if overhead else calls, device, WARMUP, ROUNDS)
    spent = statistics.median(samples.pop()) if overhead else 0.0
    at = {c: max(0.0, statistics.median(s) - spent) for c, s in zip(configs, samples)}
    if kind == "channels":
        ms = [[at[c] for c in grid]]
    else:
        ms = [[at[(a, b)] for b in couts] for a in cins]
    layer = LayerLatency(kind, cins, couts, ms)
    for axis in (0, 1):
        mine = [(a, b) for x, a, b in probes if x == axis]
        if mine:
            layer.steps[axis] = learn_step([at[c] for c in mine])
            layer.probes += [[axis, c[axis], at[c]] for c in mine]
    return layer


CALIBRATION = (0.75, 0.5, 0.3)  # kept channel shares of the uniform whole-model variants the rest is fitted on
RANDOM_VARIANTS = 5  # and this many variants whose groups keep random shares (10% to 100%)


def build_table(
    model: nn.Module, input_shape: tuple[int, ...], batch: int, threads: int, key: dict, runtime: str = "torch"
) -> LatencyTable:
    """Time every conv, linear and norm layer of ``model`` at its prunable widths; then time
    the dense model side by side with channel-pruned variants of it (:func:`_variants`) and fit
    the rest, the time the isolated layers do not account for, as a fixed part plus parts
    proportional to the kept activations and to the kept parameters (:func:`_fit`).
    Timed alone, a layer finds its weights in cache; inside the model they come from memory,
    which is why the parameter term matters on small inputs."""

    t0 = time.perf_counter()
    device = model_device(model)
    was_training = model.training
    model.eval()
    try:
        example = model_input(input_shape, 1, device, zeros=True)
        graph = _graph(model, example)
        axes = _pruned_axes(graph)
        layers = {}
        timing = (runtime, threads)
        with timing_threads(device, threads):
            for name, (shape, out_elements) in _shapes(model, example).items():
                m = model.get_submodule(name)
                layers[name] = _time_layer(m, shape, _kind(m), axes.get(name, set()), batch, device, timing)
                layers[name].out_elements = out_elements
                layers[name].weights = sum(p.numel() for p in m.parameters(recurse=False))
            variants = [model, *_variants(model, example, graph, best_step(layers.values()))]
            x = model_input(input_shape, batch, device)
            samples = time_interleaved(forward_calls(variants, x, runtime, threads), device, WARMUP, 2 * ROUNDS)
    finally:
        model.train(was_training)
    table = LatencyTable(key, statistics.median(samples[0]), list(quartiles(samples[0])), [1.0, 0.0, 0.0, 0.0], layers)
    for v, s in zip(variants, samples):
        widths = module_widths(v)
        table.calibration.append([*table._shares(widths), table._layers_ms(widths), statistics.median(s)])
    table.fit = _fit(table.calibration, 1.0 if runtime == "torch" else 0.0)
    table.build_s = time.perf_counter() - t0
    return table


def _variants(model: nn.Module, example: torch.Tensor, graph: PrunableGraph | None, step: int) -> list[nn.Module]:
    """Channel-pruned copies of ``model`` to calibrate on: every group keeping the shares of
    :data:`CALIBRATION`, then :data:`RANDOM_VARIANTS` random allocations, kept widths
    rounded to multiples of ``step`` (the widths a ``round_to`` ``auto`` solve keeps: a
    runtime that runs other widths far slower would otherwise teach the fit that pruning
    barely pays)."""
    from .prune import prune_channels
    from .solver import snap

    if graph is None:
        return []
    rng = np.random.default_rng(0)
    out = []
    for i in range(len(CALIBRATION) + RANDOM_VARIANTS):
        plan = {}
        for g in graph.groups:
            keep = CALIBRATION[i] if i < len(CALIBRATION) else rng.uniform(0.1, 1.0)
            kept = snap(max(1, int(round(keep * g.size))), g.size, 1, step)
            plan[g.name] = rng.permutation(g.size)[: g.size - kept]
        out.append(prune_channels(model, example, plan)[0].eval())
    return out


def _fit(points: list[list[float]], least: float = 1.0) -> list[float]:
    """[scale, fixed, a, w] minimising the squared error of measured = scale * layers + fixed
    + a * activation share + w * parameter share over the calibration points, with scale >=
    ``least`` and the rest >= 0: the best least-squares fit of measured - least * layers over
    the subsets of the terms (scale - least, fixed, a, w) whose coefficients all come out >= 0.
    In torch ``least`` is 1: inside the model a layer is never faster than timed alone, with
    its weights in cache. ONNX Runtime fuses layers inside the model (a batch norm into the
    conv before it), so there the layers may count for less than their sum (``least`` 0)."""
    x = np.array([[p[2], 1.0, p[0], p[1]] for p in points])
    y = np.array([p[3] - least * p[2] for p in points])
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
    return [least + float(best[0]), *(float(c) for c in best[1:])]
