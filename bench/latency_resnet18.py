"""Measured CPU latency speed-up against FLOPs reduction for a pruned torchvision resnet18.

What is measured: an untrained ``torchvision.models.resnet18(weights=None, num_classes=1000)``
(seed 0) is pruned with the magnitude criterion, local scope, no fine-tuning, to FLOPs budgets
0.5 and 0.25, once with ``channel`` pruning (channels physically removed: smaller dense
tensors) and once with ``unstructured`` pruning (weight masks folded into plain zeros in
tensors of the dense shape). For the dense model and each pruned model the script reports

* FLOPs ratio: fvcore FLOPs of one forward pass over the dense FLOPs, where masked layers
  count their effective FLOPs (dense FLOPs times weight density), as ``autoprune.engine.measure`` does;
* params ratio: parameters (masked weights not counted) over the dense count;
* latency: the median wall time (ms) of ``--repeats`` timed forward passes on CPU (after
  ``--warmup`` untimed ones), each timed by ``autoprune.measure.latency_ms`` with torch's
  intra-op threads fixed to ``--threads`` and a random input of the given batch size;
* speed-up: dense latency over pruned latency, against the ideal ``1 / FLOPs ratio``.

Dense and pruned models are timed side by side in one process, interleaved pass by pass:
for each batch size, every model is warmed up, then each repeat times one forward pass of
every model in turn (the order alternates: dense, pruned..., then pruned..., dense), so drift
and load from other processes hit all models alike. Each model's latency is the median of
its passes; the spread (max/min of the passes) is printed as a noise indication.

Run: ``python bench/latency_resnet18.py`` (``--quick`` for a smoke run at 64x64).
"""

from __future__ import annotations

import argparse
import os
import statistics

import _page
import torch
import torchvision
from torch import nn
from torch.utils.data import TensorDataset

from autoprune import engine
from autoprune.config import Budget, MeasureConfig, Policy
from autoprune.engine import measure
from autoprune.engine.prune import fold_masks
from autoprune.engine.tasks import Task

BUDGETS = (0.5, 0.25)
STRUCTURES = ("channel", "unstructured")


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None, num_classes=1000).eval()


def make_task(size: int) -> Task:
    """A real Task around resnet18; magnitude pruning needs no data, so the splits are dummies."""
    dummy = TensorDataset(torch.zeros(1, 3, size, size), torch.zeros(1, dtype=torch.long))
    return Task(
        name="bench",
        model_name="resnet18",
        model_factory=make_model,
        train=dummy,
        val=dummy,
        test=dummy,
        input_shape=(3, size, size),
        num_classes=1000,
    )


def build_models(task: Task, dense: nn.Module) -> list[tuple[str, str, nn.Module]]:
    """(structure, budget label, model) for the dense model and every pruned variant."""
    dense_cost = measure.measure(dense, task.input_shape, MeasureConfig(), latency=False)
    models = [("dense", "1.0", dense)]
    for structure in STRUCTURES:
        policy = Policy(structure=structure, criterion="magnitude", scope="local")
        scores = engine.score(dense, policy, data=None, seed=0)
        for fraction in BUDGETS:
            budget = Budget("flops", fraction)
            pruned = engine.prune_to_budget(dense, task, policy, budget, scores, dense_cost)
            fold_masks(pruned.model)  # unstructured: masked weights become zeros, dense shape
            models.append((structure, f"{fraction:g}", pruned.model.eval()))
    return models


def time_interleaved(
    models: list[nn.Module], shape: tuple[int, ...], batch: int, args: argparse.Namespace
) -> list[list[float]]:
    """Per model, the wall time (ms) of each of its ``args.repeats`` passes, timed one pass
    of every model after another (alternating order), after the warm-up passes."""
    warm = MeasureConfig((batch,), warmup=max(args.warmup - 1, 0), repeats=1, threads=args.threads)
    one = MeasureConfig((batch,), warmup=0, repeats=1, threads=args.threads)
    for m in models:  # max(warmup, 1) untimed passes: measure.latency_ms always times one
        measure.latency_ms(m, shape, batch, warm)
    times: list[list[float]] = [[] for _ in models]
    for r in range(args.repeats):
        for i in range(len(models)) if r % 2 == 0 else reversed(range(len(models))):
            times[i].append(measure.latency_ms(models[i], shape, batch, one))
    return times


def _protocol(args) -> str:
    return (
        f"An untrained torchvision `resnet18` (`weights=None`, 1000 classes, seed 0) at {args.image_size}x"
        f"{args.image_size} input is pruned with the magnitude criterion, local scope, no fine-tuning, to FLOPs "
        f"budgets {_page.listing(f'{b:g}' for b in BUDGETS)}, once with `channel` pruning (channels removed: smaller "
        "dense tensors) and once with `unstructured` pruning (masks folded into zeros in tensors of the dense shape). "
        "FLOPs ratio: fvcore FLOPs over the dense model's, masked layers counting their effective FLOPs; params "
        "ratio: parameters, masked weights not counted, over the dense count. Latency: the median of "
        f"{args.repeats} timed forward passes per model and batch size ({_page.listing(args.batches)}), after "
        f"{args.warmup} untimed ones, {args.threads} torch intra-op thread(s), MKLDNN "
        f"{'available' if torch.backends.mkldnn.is_available() else 'unavailable'}; all models timed side by side "
        "in one process, one pass of each in turn, the order alternating. Speed-up: dense latency over pruned "
        "latency, beside the ideal 1 / FLOPs ratio."
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--threads", type=int, default=os.cpu_count() or 1, help="torch intra-op threads (default: all cores)"
    )
    parser.add_argument("--repeats", type=int, default=10, help="timed passes per model and batch")
    parser.add_argument("--warmup", type=int, default=2, help="untimed passes per model and batch")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--quick", action="store_true", help="smoke run: image size 64, repeats 3")
    _page.add_arguments(parser)
    args = parser.parse_args()
    if args.quick:
        args.image_size, args.repeats = 64, 3
    page = _page.Page(__file__, "Measured CPU speed-up against FLOPs reduction for a pruned resnet18", args)

    torch.set_num_threads(args.threads)
    print(f"machine: {_page.machine()}")
    print(f"torch threads used for timing: {args.threads}; MKLDNN available: {torch.backends.mkldnn.is_available()}")
    print(
        f"input {args.image_size}x{args.image_size}; batches {args.batches}; warm-up "
        f"{args.warmup}, repeats {args.repeats} (median), interleaved pass by pass\n"
    )

    task = make_task(args.image_size)
    models = build_models(task, make_model())
    shape = task.input_shape
    costs = [measure.measure(m, shape, MeasureConfig(), latency=False) for _, _, m in models]
    latency: dict[int, list[float]] = {}
    noise = []
    for b in args.batches:
        passes = time_interleaved([m for _, _, m in models], shape, b, args)
        latency[b] = [statistics.median(t) for t in passes]
        pairs = zip(models, passes, strict=True)
        noise.append(f"batch {b}: {', '.join(f'{s} {f} {max(t) / min(t):.2f}' for (s, f, _), t in pairs)}")
        print(noise[-1])

    head = ["structure", "budget", "FLOPs ratio (fvcore, effective for masks)", "params ratio"]
    for b in args.batches:
        head += [f"latency batch {b} (ms)", f"speed-up batch {b}"]
    head.append("ideal speed-up (1/flops_ratio)")
    rows, share = [], {s: [] for s in STRUCTURES}
    base = costs[0]
    for i, ((structure, budget, _), cost) in enumerate(zip(models, costs, strict=True)):
        flops_ratio = cost.flops / base.flops
        row = [structure, budget, f"{flops_ratio:.4f}", f"{cost.params / base.params:.4f}"]
        for b in args.batches:
            row += [f"{latency[b][i]:.2f}", f"{latency[b][0] / latency[b][i]:.2f}x"]
            if structure in share:
                share[structure].append(latency[b][0] / latency[b][i] * flops_ratio)
        row.append(f"{1 / flops_ratio:.2f}x")
        rows.append(row)
    page.show("", _page.table(head, rows, "ll" + "r" * (len(head) - 2)))
    page.show(
        f"\ndense: {base.flops / 1e9:.3f} GFLOPs per sample (fvcore), {base.params / 1e6:.2f} M params. "
        "Measured speed-up as a share of the ideal, over the budgets and batch sizes: "
        + "; ".join(f"{s} {100 * min(v):.0f}-{100 * max(v):.0f}%" for s, v in share.items())
        + ".",
        "Max/min of each model's timed passes (a noise indication), " + "; ".join(noise) + ".",
    )
    page.write(_protocol(args))


if __name__ == "__main__":
    main()
