"""Measured CPU latency speed-up against FLOPs reduction for a pruned torchvision resnet18.

What is measured: an untrained ``torchvision.models.resnet18(weights=None, num_classes=1000)``
(seed 0) is pruned with the magnitude criterion, local scope, no fine-tuning, to FLOPs budgets
0.5 and 0.25, once with ``channel`` pruning (channels physically removed: smaller dense
tensors) and once with ``unstructured`` pruning (weight masks folded into plain zeros in
tensors of the dense shape). For the dense model and each pruned model the script reports

* FLOPs ratio: fvcore FLOPs of one forward pass over the dense FLOPs, where masked layers
  count their effective FLOPs (dense FLOPs times weight density), as ``autoprune.measure`` does;
* params ratio: parameters (masked weights not counted) over the dense count;
* latency: ``autoprune.measure.latency_ms`` on CPU, i.e. the median wall time of ``--repeats``
  timed forward passes (after warm-up) with torch's intra-op threads fixed to ``--threads``;
* speed-up: dense latency over pruned latency, against the ideal ``1 / FLOPs ratio``.

Dense and pruned models are timed side by side in one process. For each batch size the
models are timed in ``--rounds`` rounds whose order alternates (dense, pruned..., then
pruned..., dense, ...), so slow drift and noise hit all models alike; each model's reported
latency is the lowest of its per-round medians (the same rule for every model). The spread
of the dense model's round medians is printed as a noise indication.

Run: ``python bench/latency_resnet18.py`` (``--quick`` for a smoke run at 64x64).
"""

from __future__ import annotations

import argparse
import os
import platform

import torch
import torchvision
from torch import nn
from torch.utils.data import TensorDataset

from autoprune import engine, measure
from autoprune.config import Budget, MeasureConfig, Policy
from autoprune.prune import fold_masks
from autoprune.tasks import Task

BUDGETS = (0.5, 0.25)
STRUCTURES = ("channel", "unstructured")


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None, num_classes=1000).eval()


def make_task(size: int) -> Task:
    """A real Task around resnet18; magnitude pruning needs no data, so the splits are dummies."""
    dummy = TensorDataset(torch.zeros(1, 3, size, size), torch.zeros(1, dtype=torch.long))
    return Task(name="bench", model_name="resnet18", model_factory=make_model, train=dummy,
                val=dummy, test=dummy, input_shape=(3, size, size), num_classes=1000)  # fmt: skip


def build_models(task: Task, dense: nn.Module) -> list[tuple[str, str, nn.Module]]:
    """(structure, budget label, model) for the dense model and every pruned variant."""
    dense_cost = measure.measure(dense, task.input_shape, MeasureConfig(), latency=False)
    models = [("dense", "1.0", dense)]
    for structure in STRUCTURES:
        policy = Policy(structure=structure, criterion="magnitude", scope="local")
        scores = engine.score(dense, policy, data=None, seed=0)
        for fraction in BUDGETS:
            pruned = engine.prune_to_budget(dense, task, policy, Budget("flops", fraction), scores, dense_cost)
            fold_masks(pruned.model)  # unstructured: masked weights become zeros in dense tensors
            models.append((structure, f"{fraction:g}", pruned.model.eval()))
    return models


def time_interleaved(
    models: list[nn.Module], shape: tuple[int, ...], batch: int, cfg: MeasureConfig, rounds: int
) -> list[list[float]]:
    """Per model, its median latency (ms) in each round; the round order alternates."""
    times: list[list[float]] = [[] for _ in models]
    for r in range(rounds):
        order = range(len(models)) if r % 2 == 0 else reversed(range(len(models)))
        for i in order:
            times[i].append(measure.latency_ms(models[i], shape, batch, cfg))
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch intra-op threads")
    parser.add_argument("--repeats", type=int, default=10, help="timed passes per model per round")
    parser.add_argument("--warmup", type=int, default=2, help="untimed passes before each timing")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--quick", action="store_true", help="smoke run: image size 64, repeats 3")
    args = parser.parse_args()
    if args.quick:
        args.image_size, args.repeats = 64, 3

    torch.set_num_threads(args.threads)
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else "n/a"
    print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, Python {platform.python_version()}")
    print(f"CPU: {platform.machine()} {platform.processor() or ''}".rstrip()
          + f"; os.cpu_count() = {os.cpu_count()}, usable by this process = {affinity}")  # fmt: skip
    print(f"torch threads used for timing: {args.threads}; MKLDNN: {torch.backends.mkldnn.is_available()}")
    print(f"input {args.image_size}x{args.image_size}; batches {args.batches}; warm-up {args.warmup}, "
          f"repeats {args.repeats} (median), rounds {args.rounds} (best round median per model)\n")  # fmt: skip

    task = make_task(args.image_size)
    dense = make_model()
    models = build_models(task, dense)
    shape = task.input_shape
    costs = [measure.measure(m, shape, MeasureConfig(), latency=False) for _, _, m in models]
    cfg = MeasureConfig(batch_sizes=tuple(args.batches), warmup=args.warmup, repeats=args.repeats,
                        threads=args.threads)  # fmt: skip
    latency: dict[int, list[float]] = {}
    for b in args.batches:
        rounds = time_interleaved([m for _, _, m in models], shape, b, cfg, args.rounds)
        latency[b] = [min(t) for t in rounds]
        d = rounds[0]
        print(f"dense batch {b} round medians (ms): {', '.join(f'{t:.2f}' for t in d)} "
              f"(max/min {max(d) / min(d):.3f})")  # fmt: skip

    head = ["structure", "budget", "FLOPs ratio (fvcore, effective for masks)", "params ratio"]
    for b in args.batches:
        head += [f"latency batch {b} (ms)", f"speed-up batch {b}"]
    head.append("ideal speed-up (1/flops_ratio)")
    print("\n| " + " | ".join(head) + " |")
    print("|" + "|".join("---" for _ in head) + "|")
    base = costs[0]
    for i, ((structure, budget, _), cost) in enumerate(zip(models, costs)):
        flops_ratio = cost.flops / base.flops
        row = [structure, budget, f"{flops_ratio:.4f}", f"{cost.params / base.params:.4f}"]
        for b in args.batches:
            row += [f"{latency[b][i]:.2f}", f"{latency[b][0] / latency[b][i]:.2f}x"]
        row.append(f"{1 / flops_ratio:.2f}x")
        print("| " + " | ".join(row) + " |")
    print(f"\ndense: {base.flops / 1e9:.3f} GFLOPs (fvcore, per sample), {base.params / 1e6:.2f} M params")


if __name__ == "__main__":
    main()
