"""How close channel pruning gets to its ideal speed-up: widths the hardware likes
(``round_to``) and latency in the runtime the model is deployed with.

What is measured, per model (``--models``: torchvision ``resnet18`` and ``mobilenet_v2``,
untrained, ``weights=None``, 1000 classes, seed 0, at 3x224x224, 3x64x64 with ``--quick``;
and ``default``, the default task's model on its handwritten digits, trained as
``autoprune prune`` trains it), per FLOPs budget (``--budgets``: 0.5, 0.25) and per
``round_to`` (``--round-to``: 1, 8, 16, auto):

* the model is pruned by channels (magnitude criterion, local scope, the engine's budget
  solver, kept widths rounded to multiples of ``round_to``; ``auto``: the multiple the
  runtime's latency table finds fastest, :meth:`autoprune.engine.LatencyTable.best_step`,
  so ``auto`` may prune differently per runtime). The torchvision models are not
  fine-tuned (latency does not depend on the weights); the default model is fine-tuned as
  ``autoprune prune`` does (5 epochs) and its test accuracy reported: rounding removes some
  channels the criterion would keep, at equal FLOPs;
* each pruned model is timed against its dense model, side by side in one interleaved run
  (:func:`autoprune.engine.measure.speedup`: ``--warmup`` untimed and ``--repeats`` timed
  rounds, each round one pass of each model, the order alternating), per runtime
  (``--runtimes``: PyTorch eager and ONNX Runtime on the exported ONNX model, as
  ``--latency-runtime`` times it) and per batch (``--batches``: 1 and 32), with
  ``--threads`` intra-op threads. One pair per run: many models in one loop overflow
  oneDNN's primitive cache and distort the times;
* speed-up = dense median / pruned median; the per-round ratios' quartiles show the noise;
  share of ideal = speed-up x FLOPs ratio (1.0: the speed-up FLOPs promise);
* where the dense time goes, from each runtime's latency table: its conv and linear layers
  timed alone, its norm layers timed alone, and the rest of the whole model's time. A
  conv's FLOPs fall with the square of the kept width, a norm's, an activation's or an
  addition's only with the width, so what those hold caps the speed-up below the ideal. In
  ONNX Runtime the layers timed alone add up to more than the whole model (it fuses the
  norm and the activation into the conv before them): the rest comes out negative;
* latency budgets (``--latency-budgets``: 0.6) as ``autoprune prune --budget-latency 0.6
  --latency-runtime RT --round-to R`` runs them (``--latency-round-to``: 1 and auto; the
  default model fine-tuned 5 epochs, the others not): the table's predicted fraction, the
  fraction measured side by side in the runtime (one over the median per-round speed-up,
  as the budget is judged), how far it landed from the budget and how many timings it took.

Run: ``python bench/limit.py`` (``--quick`` for a smoke run; ``--gpu`` times on CUDA when
torch sees one, with ONNX Runtime's CUDA provider where installed).
"""

from __future__ import annotations

import argparse
import itertools
import os
import time

import _page
import torch
from latency_budget import make_task
from torch import nn

from autoprune import engine
from autoprune.config import Budget, EngineConfig, MeasureConfig, Policy
from autoprune.engine import measure
from autoprune.engine.tasks import get_task
from autoprune.errors import AutopruneError


def time_shares(name: str, dense: nn.Module, tables: dict[str, engine.LatencyTable]) -> list[str]:
    """Per runtime, where the dense model's time goes as its latency table timed it: the
    conv and linear layers (timed alone), the norm layers, and the rest of the whole model's
    time (activations, additions, pooling, the runtime's own calls). Conv FLOPs fall with
    the square of the kept width, the rest only with the width: what the rest holds caps the
    speed-up below 1 / FLOPs ratio."""
    from autoprune.engine.graph import NORM_TYPES

    norms = {n for n, m in dense.named_modules() if isinstance(m, NORM_TYPES)}
    out = []
    for rt, table in tables.items():
        conv = sum(layer.dense_ms for n, layer in table.layers.items() if n not in norms)
        norm = sum(layer.dense_ms for n, layer in table.layers.items() if n in norms)
        whole = table.dense_ms
        out.append(
            f"{name} in {rt}: dense {whole:.2f} ms; conv and linear layers timed alone {conv / whole:.0%}, "
            f"norm layers {norm / whole:.0%}, the rest {(whole - conv - norm) / whole:.0%}"
        )
    return out


def steps_for(args, tables: dict[str, engine.LatencyTable]) -> dict[str, int]:
    """round_to label -> the step it prunes with ("auto@runtime" per runtime)."""
    out = {str(r): int(r) for r in args.round_to if r != "auto"}
    if "auto" in args.round_to:
        out.update({f"auto@{rt}": t.best_step() for rt, t in tables.items()})
    return out


def prune_variants(name, task, dense, args):
    """(budget, label, step, pruned model, its FLOPs ratio, test accuracy or None) per budget
    and round_to."""
    cfg = EngineConfig(seed=0)
    tables = {}
    for rt in args.runtimes:
        t0 = time.perf_counter()
        tables[rt] = engine.latency_table(dense, task.input_shape, 1, args.threads, runtime=rt)
        print(
            f"{name}: {rt} latency table built in {time.perf_counter() - t0:.0f} s, best step {tables[rt].best_step()}",
            flush=True,
        )
    steps = steps_for(args, tables)
    dense_cost = measure.measure(dense, task.input_shape, MeasureConfig(), latency=False)
    out, made = [], {}
    for fraction in args.budgets:
        for label, step in steps.items():
            key = (fraction, step)
            if key not in made:
                policy = Policy(criterion="magnitude", scope="local", round_to=step)
                budget = Budget("flops", fraction)
                if name == "default":
                    result = engine.run(task, dense, policy, budget, cfg, test=True, measure_latency=False)
                    model, acc = result.model.eval(), result.pruned[task.metric_key("test")]
                else:
                    scores = engine.score(dense, policy, data=None, seed=0)
                    model = engine.prune_to_budget(dense, task, policy, budget, scores, dense_cost).model.eval()
                    acc = None
                flops = measure.measure(model, task.input_shape, MeasureConfig(), latency=False).flops
                made[key] = (model, flops / dense_cost.flops, acc)
            out.append((fraction, label, step, *made[key]))
    return out, tables


def time_pairs(name, task, dense, variants, args) -> list[list[str]]:
    rows = []
    for rt in args.runtimes:
        config = MeasureConfig(
            warmup=args.warmup, repeats=args.repeats, seconds=args.seconds, threads=args.threads, runtime=rt
        )
        for batch in args.batches:
            for fraction, label, step, model, flops, acc in variants:
                if label.startswith("auto@") and label != f"auto@{rt}":
                    continue
                timed = measure.speedup(dense, model, task.input_shape, batch, config)
                speed = timed["dense_ms"] / timed["pruned_ms"]
                q1, q3 = timed["spread"]
                rows.append(
                    [
                        name,
                        rt,
                        batch,
                        f"{fraction:g}",
                        label.split("@")[0] + (f" ({step})" if "@" in label else ""),
                        f"{flops:.3f}",
                        f"{timed['dense_ms']:.2f}",
                        f"{timed['pruned_ms']:.2f}",
                        f"{speed:.2f}x [{q1:.2f}-{q3:.2f}]",
                        f"{1 / flops:.2f}x",
                        f"{speed * flops:.2f}",
                        "" if acc is None else f"{acc:.4f}",
                    ]
                )
                print(" | ".join(map(str, rows[-1])), flush=True)
    return rows


def latency_budget_rows(name, task, dense, tables, args) -> list[list[str]]:
    """Per runtime: ``autoprune prune --budget-latency F --round-to R --latency-runtime RT``
    as the engine runs it (solve on the runtime's table, time side by side in the runtime,
    re-solve while the timing misses), and where the measured latency fraction landed."""
    rows = []
    epochs = 5 if name == "default" else 0  # the torchvision models have no data to fine-tune on
    for rt, table in tables.items():
        measure_cfg = MeasureConfig(
            batch_sizes=(1,),
            warmup=args.warmup,
            repeats=args.repeats,
            seconds=args.seconds,
            threads=args.threads,
            runtime=rt,
        )
        cfg = EngineConfig(seed=0, measure=measure_cfg)
        for fraction, round_to in itertools.product(args.latency_budgets, args.latency_round_to):
            policy = Policy(criterion="magnitude", scope="local", round_to=round_to, finetune={"epochs": epochs})
            try:
                result = engine.run(task, dense, policy, Budget("latency", fraction), cfg, latency=table)
            except AutopruneError as exc:  # below what this runtime's table says channel pruning reaches
                rows.append([name, rt, f"{fraction:g}", round_to, "", "", str(exc).split(": ", 1)[-1], "", ""])
                print(" | ".join(map(str, rows[-1])), flush=True)
                continue
            p = result.pruned
            measured = p["latency_measured_ratio"]
            rows.append(
                [
                    name,
                    rt,
                    f"{fraction:g}",
                    f"auto ({p['round_to']})" if round_to == "auto" else round_to,
                    f"{p['latency_ratio']:.3f}",
                    f"{measured:.3f}",
                    f"{abs(measured - fraction) / fraction:.1%}",
                    len(result.latency_checks),
                    f"{p['flops_ratio']:.3f}",
                ]
            )
            print(" | ".join(map(str, rows[-1])), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet18", "mobilenet_v2", "default"])
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.5, 0.25])
    parser.add_argument("--round-to", nargs="+", default=["1", "8", "16", "auto"])
    parser.add_argument("--runtimes", nargs="+", default=["torch", "onnxruntime"])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=30.0, help="time cap per pair's timing")
    parser.add_argument("--latency-budgets", type=float, nargs="+", default=[0.6])
    parser.add_argument("--latency-round-to", nargs="+", default=["1", "auto"], help="round_to of the budget runs")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--gpu", action="store_true", help="time on CUDA (when torch sees a GPU)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 64x64, batch 1, 5 repeats")
    _page.add_arguments(parser)
    args = parser.parse_args()
    args.round_to = [r if r == "auto" else int(r) for r in args.round_to]
    args.latency_round_to = [r if r == "auto" else int(r) for r in args.latency_round_to]
    if args.quick:
        args.image_size, args.repeats, args.batches = 64, 5, [1]
    device = torch.device("cuda" if args.gpu and torch.cuda.is_available() else "cpu")
    page = _page.Page(__file__, "Closer to the physical limit: round_to and the deployment runtime", args)
    print(f"machine: {_page.machine()}; device {measure.device_name(device)}; threads {args.threads}", flush=True)
    rows, steps, budget_rows, shares = [], [], [], []
    for name in args.models:
        if name == "default":
            cfg = EngineConfig(seed=0)
            task = get_task(cfg.task)
            dense = engine.dense_model(task, cfg).to(device).eval()
        else:
            task = make_task(name, args.image_size)
            dense = task.model_factory().to(device)
        variants, tables = prune_variants(name, task, dense, args)
        steps.append(f"{name}: " + ", ".join(f"{rt} {t.best_step()}" for rt, t in tables.items()))
        shares += time_shares(name, dense, tables)
        print(shares[-1], flush=True)
        rows += time_pairs(name, task, dense, variants, args)
        budget_rows += latency_budget_rows(name, task, dense, tables, args)
    head = [
        "model",
        "runtime",
        "batch",
        "FLOPs budget",
        "round_to",
        "FLOPs ratio",
        "dense ms",
        "pruned ms",
        "speed-up [quartiles]",
        "ideal",
        "share of ideal",
        "test acc",
    ]
    page.show(_page.table(head, rows, "lllll" + "r" * 7), "auto's step per runtime: " + "; ".join(steps) + ".")
    page.show("Where the dense time goes (the latency tables' timings):", "\n".join(f"- {s}" for s in shares))
    head = [
        "model",
        "runtime",
        "latency budget",
        "round_to (auto)",
        "predicted",
        "measured",
        "off by",
        "timings",
        "FLOPs ratio",
    ]
    page.show("Latency budgets timed in the runtime:", _page.table(head, budget_rows, "ll" + "r" * 7))
    page.write(__doc__.split("\n\n", 1)[1].split("\nRun:")[0])


if __name__ == "__main__":
    main()
