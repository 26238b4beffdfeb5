"""Measured CPU speed-up of vision transformers pruned by heads and MLP width, beside the ideal.

What is measured: untrained torchvision ``vit_b_16`` and ``swin_t`` (seed 0, 1000 classes,
``--image-size`` input, built as autoprune builds them: attention in head-prunable form) are
pruned with the magnitude criterion, global scope, channel structure, no fine-tuning, to
0.5 FLOPs. Their groups are the attention heads of every block and the MLP hidden widths;
the embedding width is left alone. For each model the script prints

* FLOPs ratio: fvcore FLOPs of the pruned model over the dense one, attention products
  counted by autoprune's handle for ``scaled_dot_product_attention``;
* heads and MLP width kept, over all blocks;
* speed-up: dense against pruned timed side by side in one process (interleaved rounds
  after warm-up, ``autoprune.engine.measure.speedup``): the median of the per-round ratios
  with their quartiles, beside the ideal ``1 / FLOPs ratio``.

Run: ``python bench/transformers.py`` (``--quick``: 64x64 inputs, 5 rounds).
"""

from __future__ import annotations

import argparse
import os
import time

import _page
import torch
from torch.utils.data import TensorDataset

from autoprune import engine
from autoprune.config import Budget, MeasureConfig, Policy
from autoprune.engine import measure
from autoprune.engine.attention import ATTENTION_TYPES
from autoprune.engine.models import torchvision_model
from autoprune.engine.tasks import Task

MODELS = ("vit_b_16", "swin_t")
BUDGET = 0.5
HEAD = [
    "model",
    "dense FLOPs",
    "FLOPs ratio",
    "heads kept",
    "MLP width kept",
    "params ratio",
    "latency dense / pruned (ms)",
    "speed-up (quartiles)",
    "ideal",
    "pruning time",
]


def make_task(name: str, size: int) -> Task:
    """A real Task around the model; magnitude pruning needs no data, so the splits are dummies."""
    dummy = TensorDataset(torch.zeros(1, 3, size, size), torch.zeros(1, dtype=torch.long))

    def build():
        torch.manual_seed(0)
        return torchvision_model(name, 1000, size).eval()

    return Task("bench", name, build, dummy, dummy, dummy, (3, size, size), 1000)


def widths(model) -> tuple[int, int]:
    """(heads, MLP hidden units) over all blocks."""
    heads = sum(m.num_heads for m in model.modules() if isinstance(m, ATTENTION_TYPES))
    mlp = sum(m.out_features for n, m in model.named_modules() if n.endswith("mlp.0"))
    return heads, mlp


def one_model(name: str, args, timing: MeasureConfig) -> tuple[list[str], float]:
    """The table row of one model, and its measured speed-up's share of the ideal."""
    task = make_task(name, args.image_size)
    dense = task.model_factory()
    dense_cost = measure.measure(dense, task.input_shape, None, latency=False)
    policy = Policy(structure="channel", criterion="magnitude", scope="global")
    began = time.perf_counter()
    scores = engine.score(dense, policy, data=None, seed=0)
    pruned = engine.prune_to_budget(dense, task, policy, Budget("flops", BUDGET), scores, dense_cost)
    pruning_s = time.perf_counter() - began
    cost = measure.measure(pruned.model, task.input_shape, None, latency=False)
    timed = measure.speedup(dense, pruned.model.eval(), task.input_shape, args.batch, timing)
    ratio = cost.flops / dense_cost.flops
    (h0, m0), (h1, m1) = widths(dense), widths(pruned.model)
    row = [
        name,
        f"{dense_cost.flops / 1e9:.2f} G",
        f"{ratio:.3f}",
        f"{h1}/{h0}",
        f"{m1}/{m0}",
        f"{cost.params / dense_cost.params:.3f}",
        f"{timed['dense_ms']:.1f} / {timed['pruned_ms']:.1f}",
        f"{timed['speedup']:.2f}x ({timed['spread'][0]:.2f}-{timed['spread'][1]:.2f})",
        f"{1 / ratio:.2f}x",
        f"{pruning_s:.0f} s",
    ]
    return row, timed["speedup"] * ratio


def _protocol(args) -> str:
    return (
        f"Each of the untrained torchvision models {_page.listing(f'`{m}`' for m in args.models)} (seed 0, 1000 classes, "
        f"{args.image_size}x{args.image_size} input, attention in autoprune's head-prunable form) is pruned with "
        f"the magnitude criterion, global scope, channel structure, no fine-tuning, to {BUDGET:g} of its FLOPs: "
        "the groups are every block's attention heads and MLP hidden widths; the embedding width is left alone. "
        "FLOPs: fvcore, attention products counted by autoprune's handle for `scaled_dot_product_attention`. "
        f"Speed-up: dense and pruned timed side by side in one process at batch {args.batch}, {args.threads} torch "
        f"thread(s), {args.warmup} warm-up passes then {args.rounds} interleaved rounds; the median of the per-round "
        "ratios with their quartiles, beside the ideal 1 / FLOPs ratio. Pruning time: scoring, solving and removal."
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), help="torchvision transformer names")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads (default: all)")
    parser.add_argument("--rounds", type=int, default=20, help="timed rounds (default 20)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--quick", action="store_true", help="smoke run: image size 64, 5 rounds")
    _page.add_arguments(parser)
    args = parser.parse_args()
    if args.quick:
        args.image_size, args.rounds = 64, 5
    page = _page.Page(__file__, "Measured CPU speed-up of vision transformers pruned by heads and MLP width", args)
    print(f"machine: {_page.machine()}")
    print(f"torch threads {args.threads}; input {args.image_size}x{args.image_size}, batch {args.batch}")
    print(f"timing: {args.warmup} warm-up passes, {args.rounds} interleaved rounds, median of per-round ratios\n")
    timing = MeasureConfig(
        (args.batch,), warmup=args.warmup, repeats=args.rounds, threads=args.threads, seconds=86400
    )  # no time cap: every round runs
    rows, shares = [], []
    for name in args.models:
        row, share = one_model(name, args, timing)
        rows.append(row)
        shares.append(f"{name} {100 * share:.0f}%")
        print(f"{name}: done", flush=True)
    page.show("", _page.table(HEAD, rows, "l" + "r" * (len(HEAD) - 1)))
    page.show(f"\nMeasured speed-up as a share of the ideal: {', '.join(shares)}.")
    page.write(_protocol(args))


if __name__ == "__main__":
    main()
