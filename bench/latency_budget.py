"""How well the latency table predicts, and what a latency budget delivers, for pruned torchvision CNNs.

What is measured, per device (``--device``: the CPU, and CUDA when torch sees a GPU) and per
model (``--models``: torchvision ``resnet18`` and ``mobilenet_v2``, untrained,
``weights=None``, ``num_classes=1000``, seed 0), at one input shape (3x224x224; 3x64x64 with
``--quick``), one batch size (``--batch``, 1) and, on the CPU, a fixed number of torch
intra-op threads (``--threads``, 1):

0. The latency table. :func:`autoprune.engine.latency_table` is built for the dense model on
   the device (no cache: every run builds it, so its build time is printed). It times every
   conv, linear and norm layer at a grid of widths and fits the rest of the model on a few
   pruned variants (see :mod:`autoprune.engine.latency`).

1. Predictor error. ``--allocations`` (50) random channel allocations: every channel group
   of :class:`autoprune.engine.graph.PrunableGraph` keeps a share drawn uniformly from
   [0.1, 1.0] of its channels (at least one; which channels go is drawn at random too;
   ``numpy.random.default_rng(seed)`` per model), and the channels are removed with
   :func:`autoprune.engine.prune.prune_channels`. For each pruned model

   * predicted ratio = ``table.predict_model(pruned) / table.predict()``;
   * measured ratio = ``1 / speedup`` from :func:`autoprune.engine.measure.speedup`: the
     pruned model timed side by side with the dense model and nothing else (interleaved pass
     by pass, alternating order, ``--warmup`` untimed and ``--repeats`` timed passes each),
     the speed-up being the median over rounds of dense time / pruned time in the same
     round. Each allocation gets its own two-model run: timing many different models in one
     interleaved loop overflows oneDNN's primitive cache on the CPU and distorts the times;
   * relative error = (predicted - measured) / measured.

   Printed: the median and the worst absolute relative error, the 90th percentile, the mean
   signed error (positive: the table predicts too slow), the range of measured ratios and
   the median measurement noise (half the interquartile range of the per-round 1/speed-up).

2. Latency budgets (``--budgets``: 0.7, 0.5, 0.3). The dense model is scored with the
   magnitude criterion (global scope, data-free, ``max_ratio`` 0.95 so that 0.3 is reachable) and pruned with
   :func:`autoprune.engine.prune_to_budget` to ``Budget("latency", f)`` with the table (a
   budget below the smallest latency fraction the solver can reach, with every group at
   ``max_ratio`` 0.95, is printed as not solved, with the solver's message).
   This is the engine's own prune step (``MethodContext.prune``, as ``autoprune prune
   --budget-latency`` runs it): solve on the table, then time the pruned model against the
   dense one (``speedup``) and, while the measured ratio misses the budget by more than its
   noise (above; below, by more than the noise and 5% of the budget), solve again for a
   corrected target, at most ``LATENCY_CHECKS`` timings (5); the model closest to the budget without exceeding
   it is kept (marked * among the checks). Then:

   * its FLOPs ratio: fvcore FLOPs (``measure(..., latency=False).flops``) over the dense;
   * the FLOPs-only allocation at the same FLOPs: the dense model pruned to
     ``Budget("flops", <that FLOPs ratio>)`` with the same scores (the solver lands within
     its tolerance, 0.01, below; its own FLOPs ratio is printed too);
   * "channels differing": the size of the symmetric difference of the two channel plans
     (removed channels, summed over groups), out of all channels of the groups. With the
     global scope both solvers walk the same score ranking and differ only in where they
     stop and in the solver's final give-back step, so at equal FLOPs the two plans are
     (nearly) the same: this comparison can only show a difference for a policy whose
     allocation depends on the cost model;
   * both timed side by side with the dense model, three models to a run
     (:func:`autoprune.engine.measure.side_by_side`), in TWO runs of ``ceil(repeats / 2)``
     rounds each: [dense, latency-aware, FLOPs-only] and [dense, FLOPs-only,
     latency-aware]. :func:`~autoprune.engine.measure.time_interleaved` alternates the
     order 0,1,2 / 2,1,0, so the second slot is always timed between the other two; on
     this machine a model there measured 1-5% slower than the same model in the third
     slot, so the slots are swapped and the rounds pooled. Each pruned model's measured
     ratio is the median over the pooled rounds of its time / dense time in the same round,
     with the quartiles; "lat/flops" is the median over the pooled rounds of latency-aware
     time / FLOPs-only time, with its quartiles, and next to it the median of each run
     alone (latency-aware in the middle slot / FLOPs-only in the middle slot), which shows
     the slot bias;
   * "as fast": whether that lat/flops median is <= 1 ("tie" when its quartiles straddle 1
     either way, i.e. the difference is within the noise); "within 10%": whether
     |measured - f| <= 0.1 f for the latency-aware model's ratio from the three-way run.

   The predicted ratio and the ratio measured in the last check (two-model run) are printed
   beside it.

Pruning, scoring and FLOPs counting run on the CPU; the dense and pruned models are copied to
the device for the table and the timings. The table's and the checks' timings use torch's
``--threads`` on the CPU (other work uses torch's default). Run:
``python bench/latency_budget.py`` (``--quick``: 64x64 inputs, 8 allocations, 7 repeats).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import statistics
import time
from functools import partial

import _page
import numpy as np
import torch
import torchvision
from torch import nn
from torch.utils.data import TensorDataset

from autoprune import engine
from autoprune.config import Budget, EngineConfig, MeasureConfig, Policy
from autoprune.engine.graph import PrunableGraph, clone
from autoprune.engine.measure import measure, quartiles, side_by_side, speedup
from autoprune.engine.methods import LATENCY_CHECKS, MethodContext
from autoprune.engine.prune import prune_channels
from autoprune.engine.tasks import Task
from autoprune.errors import AutopruneError

MODELS = ("resnet18", "mobilenet_v2")
BUDGETS = (0.7, 0.5, 0.3)
POLICY = Policy(structure="channel", criterion="magnitude", scope="global", max_ratio=0.95)
ERROR_HEAD = [
    "median abs rel error",
    "90th pct abs",
    "worst abs (predicted / measured)",
    "mean signed error",
    "measured ratios",
    "median noise",
]
BUDGET_HEAD = [
    "latency budget",
    "predicted",
    "measured [quartiles]",
    "checks (2-way runs)",
    "FLOPs ratio",
    "re-solves",
    "FLOPs-only: FLOPs",
    "FLOPs-only: measured [quartiles]",
    "channels differing",
    "lat/flops time [quartiles]",
    "lat/flops: lat mid / flops mid",
    "latency-aware as fast",
    "within 10% of budget",
]


def make_model(name: str) -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.get_model(name, weights=None, num_classes=1000).eval()


def make_task(name: str, size: int) -> Task:
    """A real Task around the model; magnitude pruning needs no data, so the splits are dummies."""
    dummy = TensorDataset(torch.zeros(1, 3, size, size), torch.zeros(1, dtype=torch.long))
    return Task(
        name="bench",
        model_name=name,
        model_factory=partial(make_model, name),
        train=dummy,
        val=dummy,
        test=dummy,
        input_shape=(3, size, size),
        num_classes=1000,
    )


def on(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` on ``device`` (a copy unless it is there already), in eval mode."""
    if next(model.parameters()).device == device:
        return model.eval()
    return copy.deepcopy(model).to(device).eval()


def measured_ratio(timed: dict) -> tuple[float, float]:
    """(pruned / dense latency, noise) from :func:`speedup`: 1 / the median per-round
    speed-up, and half the spread of 1 / its quartiles (as the engine's latency check)."""
    lo, hi = timed["spread"]
    return 1.0 / timed["speedup"], (1.0 / lo - 1.0 / hi) / 2


def random_allocations(dense: nn.Module, example: torch.Tensor, n: int, seed: int):
    """``n`` channel-pruned copies of ``dense``: each group keeps a uniform [0.1, 1.0] share."""
    graph = PrunableGraph(clone(dense), example)
    rng = np.random.default_rng(seed)
    for _ in range(n):
        plan = {}
        for g in graph.groups:
            keep = max(1, int(round(rng.uniform(0.1, 1.0) * g.size)))
            plan[g.name] = np.sort(rng.choice(g.size, g.size - keep, replace=False))
        yield prune_channels(dense, example, plan)[0].eval()


def predictor_error(dense, dense_dev, table, task, device, cfg, n, seed) -> dict:
    example = task.example_input()
    dense_pred = table.predict()
    pred, meas, noise = [], [], []
    for pruned in random_allocations(dense, example, n, seed):
        pred.append(table.predict_model(pruned) / dense_pred)
        ratio, nz = measured_ratio(speedup(dense_dev, on(pruned, device), task.input_shape, cfg.latency_batch, cfg))
        meas.append(ratio)
        noise.append(nz)
    err = (np.array(pred) - np.array(meas)) / np.array(meas)
    worst = int(np.argmax(np.abs(err)))
    return {
        "n": n,
        "median_abs": float(np.median(np.abs(err))),
        "p90_abs": float(np.percentile(np.abs(err), 90)),
        "worst_abs": float(abs(err[worst])),
        "worst_at": (pred[worst], meas[worst]),
        "mean_signed": float(err.mean()),
        "measured_range": (min(meas), max(meas)),
        "noise": float(np.median(noise)),
    }


def round_ratios(a: list[float], b: list[float]) -> tuple[float, tuple[float, float]]:
    """Median and quartiles over rounds of a[i] / b[i]."""
    r = [x / y for x, y in zip(a, b, strict=True)]
    return statistics.median(r), quartiles(r)


def budget_row(dense, dense_dev, dense_cost, scores, table, task, device, cfg, fraction) -> dict:
    budget = Budget("latency", fraction)
    ecfg = EngineConfig(device=str(device), progress=False, measure=cfg)
    ctx = MethodContext(task, dense_dev, POLICY, budget, ecfg, dense_cost, device, latency=table)
    try:  # the engine's own prune: solve on the table, time beside the dense model, correct
        lat_p = ctx.prune(on(dense, device), budget)
    except AutopruneError as exc:  # the budget itself is below what the solver can reach
        return {"budget": fraction, "error": str(exc)}
    checks = [f"{c['measured']:.3f}" + ("*" if c["kept"] else "") for c in ctx.latency_checks]
    resolves = len(checks) - 1
    unreachable = " (a corrected target was out of reach)" if ctx.latency_checks[-1].get("unreachable") else ""
    lat_p.model = lat_p.model.cpu()
    predicted = table.predict_model(lat_p.model) / table.predict()
    flops_ratio = measure(lat_p.model, task.input_shape, None, latency=False).flops / dense_cost.flops
    lat = lat_p.model.eval()
    fl_p = engine.prune_to_budget(dense, task, POLICY, Budget("flops", flops_ratio), scores, dense_cost)
    fl = fl_p.model.eval()
    fl_flops = measure(fl, task.input_shape, None, latency=False).flops / dense_cost.flops
    differ = sum(len(np.setxor1d(lat_p.plan[g], fl_p.plan[g])) for g in lat_p.plan)
    # two 3-way runs, the pruned models swapping slots, so the slot's bias cancels (see docstring)
    half = dataclasses.replace(cfg, repeats=max(1, math.ceil(cfg.repeats / 2)))
    lat_dev, fl_dev = on(lat, device), on(fl, device)
    d1, a1, b1 = side_by_side([dense_dev, lat_dev, fl_dev], task.input_shape, cfg.latency_batch, half)
    d2, b2, a2 = side_by_side([dense_dev, fl_dev, lat_dev], task.input_shape, cfg.latency_batch, half)
    d, a, b = d1.samples + d2.samples, a1.samples + a2.samples, b1.samples + b2.samples
    lat_r, lat_q = round_ratios(a, d)
    fl_r, fl_q = round_ratios(b, d)
    vs, vs_q = round_ratios(a, b)
    by_slot = (round_ratios(a1.samples, b1.samples)[0], round_ratios(a2.samples, b2.samples)[0])
    if vs_q[0] <= 1.0 <= vs_q[1]:
        faster = "tie" + (" (yes)" if vs <= 1.0 else " (no)")
    else:
        faster = "yes" if vs <= 1.0 else "NO"
    return {
        "budget": fraction,
        "predicted": predicted,
        "checks": checks,
        "unreachable": unreachable,
        "measured": lat_r,
        "spread": lat_q,
        "flops": flops_ratio,
        "resolves": resolves,
        "fl_flops": fl_flops,
        "fl_measured": fl_r,
        "fl_spread": fl_q,
        "vs": vs,
        "vs_spread": vs_q,
        "by_slot": by_slot,
        "differ": differ,
        "channels": sum(lat_p.sizes.values()),
        "faster": faster,
        "within": abs(lat_r - fraction) <= 0.1 * fraction,
        "dense_ms": statistics.median(d),
    }


def error_row(e: dict) -> list[str]:
    return [
        f"{e['median_abs']:.1%}",
        f"{e['p90_abs']:.1%}",
        f"{e['worst_abs']:.1%} ({e['worst_at'][0]:.3f} / {e['worst_at'][1]:.3f})",
        f"{e['mean_signed']:+.1%}",
        f"{e['measured_range'][0]:.3f} .. {e['measured_range'][1]:.3f}",
        f"{e['noise']:.3f}",
    ]


def budget_cells(r: dict) -> list[str]:
    if "error" in r:
        return [f"{r['budget']:g}", "not solved (below)"]
    return [
        f"{r['budget']:g}",
        f"{r['predicted']:.3f}",
        f"{r['measured']:.3f} [{r['spread'][0]:.3f}, {r['spread'][1]:.3f}]",
        " -> ".join(r["checks"]),
        f"{r['flops']:.3f}",
        f"{r['resolves']}{r['unreachable']}",
        f"{r['fl_flops']:.3f}",
        f"{r['fl_measured']:.3f} [{r['fl_spread'][0]:.3f}, {r['fl_spread'][1]:.3f}]",
        f"{r['differ']} of {r['channels']}",
        f"{r['vs']:.3f} [{r['vs_spread'][0]:.3f}, {r['vs_spread'][1]:.3f}]",
        f"{r['by_slot'][0]:.3f} / {r['by_slot'][1]:.3f}",
        r["faster"],
        "yes" if r["within"] else "NO",
    ]


def run_model(name: str, device: torch.device, args, cfg: MeasureConfig, page: _page.Page) -> None:
    task = make_task(name, args.image_size)
    dense = make_model(name)
    dense_dev = on(dense, device)
    t0 = time.perf_counter()
    table = engine.latency_table(dense_dev, task.input_shape, args.batch, args.threads)
    page.show(
        f"\n### {name} on {device.type}\n",
        f"Latency table: built in {table.build_s:.1f} s ({time.perf_counter() - t0:.1f} s wall), "
        f"{len(table.layers)} layers timed; dense measured {table.dense_ms:.2f} ms, predicted "
        f"{table.predict():.2f} ms; fit (layers' scale, fixed ms, ms per activation share, per parameter share) "
        f"{', '.join(f'{c:.2f}' for c in table.fit)}.",
    )

    t0 = time.perf_counter()
    e = predictor_error(dense, dense_dev, table, task, device, cfg, args.allocations, args.seed)
    page.show(
        f"\nPredictor error over {e['n']} random allocations (each timed side by side with the dense model only; "
        f"{time.perf_counter() - t0:.0f} s):\n",
        _page.table(ERROR_HEAD, [error_row(e)], "r" * len(ERROR_HEAD)),
    )

    t0 = time.perf_counter()
    dense_cost = measure(dense, task.input_shape, None, latency=False)
    scores = engine.score(dense, POLICY, data=None, seed=args.seed)
    rows = [budget_row(dense, dense_dev, dense_cost, scores, table, task, device, cfg, f) for f in args.budgets]
    dense_ms = next((f"{r['dense_ms']:.2f} ms" for r in rows if "dense_ms" in r), "not timed")
    page.show(
        f"\nLatency budgets, global magnitude (measured: one 3-way side-by-side run of dense, latency-aware, "
        f"FLOPs-only, twice with the pruned models' slots swapped, rounds pooled; {time.perf_counter() - t0:.0f} s):\n",
        _page.table(BUDGET_HEAD, [budget_cells(r) for r in rows]),
        f"\nDense: {dense_cost.flops / 1e9:.3f} GFLOPs (fvcore), {dense_ms} in the first budget's 3-way runs.",
        *(f"\nBudget {r['budget']:g} not solved: {r['error']}" for r in rows if "error" in r),
    )


def _protocol(args) -> str:
    return (
        f"Untrained torchvision {_page.listing(f'`{m}`' for m in args.models)} (`weights=None`, 1000 classes, seed "
        f"0), input 3x{args.image_size}x{args.image_size}, batch {args.batch}, on {_page.listing(args.device)}; "
        f"{args.threads} torch thread(s) for CPU timing. Every side-by-side timing runs {args.warmup} untimed passes "
        f"per model, then {args.repeats} interleaved rounds (median).\n\n"
        "The latency table is built for the dense model on the device (no cache), then checked on "
        f"{args.allocations} random channel allocations (every group keeps a uniform 10-100% share of its channels, "
        f"seed {args.seed}): predicted latency ratio (the table) against the measured one (1 / the speed-up, each "
        "pruned model timed side by side with the dense model alone); error = (predicted - measured) / measured.\n\n"
        f"Then the dense model is pruned to latency budgets {_page.listing(f'{b:g}' for b in args.budgets)} "
        "(magnitude criterion, global scope, `max_ratio` 0.95) by the engine's own prune step: solve on the table, "
        "time against the dense model, solve again for a corrected target while the measured ratio misses the "
        f"budget (at most {LATENCY_CHECKS} timings; the kept one is starred among the checks). It is compared with "
        "the FLOPs-only "
        "allocation at the same FLOPs, the three models timed side by side twice with the pruned models' slots "
        f'swapped ({math.ceil(args.repeats / 2)} rounds each, pooled). "as fast": the latency-aware / FLOPs-only '
        'time ratio\'s median at most 1 (a tie when its quartiles straddle 1); "within 10%": the measured ratio '
        "within 10% of the budget."
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), help="torchvision classifier names")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads for CPU timing")
    parser.add_argument("--batch", type=int, default=1)
    default_devices = ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]
    parser.add_argument("--device", nargs="+", default=default_devices, help=f"default: {' '.join(default_devices)}")
    parser.add_argument("--allocations", type=int, default=50, help="random channel allocations per model")
    parser.add_argument("--budgets", type=float, nargs="+", default=list(BUDGETS))
    parser.add_argument("--repeats", type=int, default=15, help="timed rounds of every side-by-side run")
    parser.add_argument("--warmup", type=int, default=3, help="untimed passes per model of every run")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="smoke run: 64x64, 8 allocations, 7 repeats")
    _page.add_arguments(parser)
    args = parser.parse_args()
    if args.quick:
        args.image_size, args.allocations, args.repeats, args.warmup = 64, 8, 7, 2
    page = _page.Page(__file__, "How well the latency table predicts, and what a latency budget delivers", args)
    cfg = MeasureConfig(
        (args.batch,), warmup=args.warmup, repeats=args.repeats, threads=args.threads, latency_batch=args.batch
    )

    start = time.perf_counter()
    print(f"machine: {_page.machine()}; torchvision {torchvision.__version__}")
    print(f"torch threads for CPU timing: {args.threads}; devices: {', '.join(args.device)}")
    print(
        f"input 3x{args.image_size}x{args.image_size}, batch {args.batch}; every side-by-side run: warm-up "
        f"{args.warmup}, {args.repeats} rounds (median); {args.allocations} allocations; budgets {args.budgets}"
    )
    for dev in args.device:
        device = torch.device(dev)
        for name in args.models:
            run_model(name, device, args, cfg, page)
    print(f"\ntotal wall time {time.perf_counter() - start:.0f} s")
    page.write(_protocol(args))


if __name__ == "__main__":
    main()
