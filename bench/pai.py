"""Pruning at initialisation: which criterion keeps a trainable network?

What is measured: for each criterion (random, magnitude, snip, grasp, synflow, fisher,
hutchinson), each unstructured sparsity (90%, 95%, 98% of the maskable weights masked),
with and without BN warm-up, and each seed, autoprune's ``init`` method prunes the
untrained network (scope ``global``, ``max_ratio`` 1.0, so layers may collapse) and trains
it from scratch with the task's dense recipe (SGD, cosine from 0.1). The table gives test
accuracy, mean ± std over seeds, how many runs emptied a layer (layer collapse) and how
many of those emptied the classifier (the model's last ``nn.Linear``; its output is then
its bias alone, chance accuracy). The dense network trained with the same recipe and seeds
is the reference. Every run is a full ``autoprune.engine.run``: the same scoring subset (10
per class), the same budget solver and the same training loop as ``autoprune prune``.

Tasks (``--task``):

- ``digits`` (default): scikit-learn's 8x8 digits, the ``digits_resnet`` (Conv2d), 30 epochs.
- ``seq1d``: the held-out synthetic 1-D task in ``bench/seq1d.py`` (ten classes of
  waveform + motif sequences of length 64, a small Conv1d ResNet), 20 epochs. It is also a
  user task for the CLI: ``PYTHONPATH=bench autoprune prune --task seq1d:task ...``.

Protocols (``--protocol``, several comma-separated give one table each):

- ``autoprune`` (default): autoprune's own setting. Every conv and linear weight may be
  masked, the classifier included; BN warm-up (when on) resets the BN statistics and
  averages them over the scoring subset (``bn_warmup_mode="scoring"``).
- ``study``: the second-order pruning-at-initialisation study's setting. Only convolution
  weights are masked (linear layers including the classifier, biases and BN parameters
  never: ``keep_types=["linear"]``); BN warm-up (when on) is one pass over the training
  split in train mode with BN's default momentum, before scoring
  (``bn_warmup_mode="train"``).

Sparsity counts only the weights the protocol may mask (study: conv weights; autoprune:
conv and linear weights) and is turned into the equivalent ``params`` budget (BN
parameters and biases are never masked); the header gives the budget per sparsity.

Runs are independent processes (``--workers``, one torch thread each), so the figures do
not depend on the worker count. Run: ``python bench/pai.py [--task seq1d] [--protocol
study|autoprune|study,autoprune]``; ``--quick`` is a smoke run (one seed, 3 epochs, random
and snip at 90%).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

BENCH = Path(__file__).resolve().parent
if str(BENCH) not in sys.path:  # seq1d and _page, also in spawned workers
    sys.path.insert(0, str(BENCH))

import _page  # noqa: E402

CRITERIA = ("random", "magnitude", "snip", "grasp", "synflow", "fisher", "hutchinson")
SPARSITIES = (0.90, 0.95, 0.98)
TASKS = ("digits", "seq1d")
PROTOCOLS = ("study", "autoprune")


def build_task(name: str):
    """The task by bench name, built as ``autoprune prune --task`` would."""
    from autoprune.config import TaskConfig
    from autoprune.engine.tasks import get_task

    if name == "seq1d":
        import seq1d

        return seq1d.task(TaskConfig())
    return get_task(TaskConfig(name=name))


def maskable_types(protocol: str) -> tuple[type, ...]:
    """The layer types whose weights the protocol may mask."""
    from torch import nn

    from autoprune.engine.graph import PRUNABLE_TYPES

    return (nn.Conv1d, nn.Conv2d, nn.Conv3d) if protocol == "study" else PRUNABLE_TYPES


def maskable_weights(model, protocol: str) -> list:
    types = maskable_types(protocol)
    return [m.weight for m in model.modules() if isinstance(m, types)]


def budget_fraction(model, sparsity: float, protocol: str) -> float:
    """The params fraction that masks ``sparsity`` of the protocol's maskable weights."""
    total = sum(p.numel() for p in model.parameters())
    maskable = sum(w.numel() for w in maskable_weights(model, protocol))
    return (total - sparsity * maskable) / total


def classifier_name(model) -> str:
    """The classifier: the model's last ``nn.Linear`` (true of both bench models)."""
    from torch import nn

    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1]


def policy_for(protocol: str, criterion: str, warmup: bool):
    from autoprune.config import FinetuneConfig, Policy

    common = dict(
        structure="unstructured",
        criterion=criterion,
        scope="global",
        method="init",
        max_ratio=1.0,
        bn_warmup=warmup,
        finetune=FinetuneConfig(epochs=0),
    )
    if protocol == "study":
        return Policy(**common, keep_types=["linear"], bn_warmup_mode="train")
    return Policy(**common, bn_warmup_mode="scoring")


def one_run(job: dict) -> dict:
    import torch

    torch.set_num_threads(1)
    from autoprune import engine
    from autoprune.config import Budget, EngineConfig, FinetuneConfig, MeasureConfig

    cfg = EngineConfig(
        seed=job["seed"],
        train_epochs=job["epochs"],
        progress=False,
        device="cpu",
        measure=MeasureConfig(batch_sizes=(1,), warmup=1, repeats=1),
    )
    task = build_task(job["task"])
    t0 = time.perf_counter()
    if job["criterion"] == "dense":
        engine.seed_everything(job["seed"])
        model = task.model_factory()
        engine.train(
            model, task, FinetuneConfig(epochs=job["epochs"], lr=task.train_lr), job["seed"], torch.device("cpu")
        )
        return {
            **job,
            "test_acc": engine.evaluate(model, task.loader("test")),
            "empty": [],
            "classifier_empty": False,
            "reached": 0.0,
            "seconds": time.perf_counter() - t0,
        }
    fresh = task.model_factory()
    budget = Budget("params", budget_fraction(fresh, job["sparsity"], job["protocol"]), tolerance=0.002)
    policy = policy_for(job["protocol"], job["criterion"], job["warmup"])
    result = engine.run(task, fresh, policy, budget, cfg, test=True)
    weights = maskable_weights(result.model, job["protocol"])
    zeros = sum(int((w == 0).sum()) for w in weights)
    fc = classifier_name(result.model)
    fc_empty = fc in result.collapse["empty"] or not result.model.get_submodule(fc).weight.any()
    return {
        **job,
        "test_acc": result.pruned["test_acc"],
        "empty": list(result.collapse["empty"]),
        "classifier_empty": bool(fc_empty),
        "reached": zeros / sum(w.numel() for w in weights),
        "params_ratio": result.pruned["params_ratio"],
        "seconds": time.perf_counter() - t0,
    }


def _fmt(values: list[float]) -> str:
    if not values:
        return "-"
    mean = 100 * statistics.fmean(values)
    std = 100 * statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.1f} ± {std:.1f}"


def _cell(runs: list[dict]) -> str:
    notes = []
    collapsed = sum(1 for r in runs if r["empty"] or r["classifier_empty"])
    if collapsed:
        notes.append(f"{collapsed} collapsed")
    emptied = sum(1 for r in runs if r["classifier_empty"])
    if emptied:
        notes.append(f"{emptied} classifier emptied")
    return _fmt([r["test_acc"] for r in runs]) + (f" ({', '.join(notes)})" if notes else "")


def _pct(s: float) -> str:
    return f"{100 * s:g}%"


def table_blocks(results: list[dict], protocol: str, criteria: list[str], sparsities: list[float]) -> list[str]:
    """One protocol's heading, table and notes."""
    mine = [r for r in results if r["protocol"] == protocol]
    masks = "conv weights only" if protocol == "study" else "conv and linear weights, classifier included"
    mode = "one pass over the training split, default momentum" if protocol == "study" else "scoring subset"
    head = ["criterion"] + [f"{_pct(s)} {w}" for s in sparsities for w in ("no warm-up", "BN warm-up")]
    rows = [
        [c]
        + [
            _cell([r for r in mine if r["criterion"] == c and r["sparsity"] == sp and r["warmup"] == w])
            for sp in sparsities
            for w in (False, True)
        ]
        for c in criteria
    ]
    notes = []
    for sp in sparsities:
        reached = [r["reached"] for r in mine if r["sparsity"] == sp]
        notes.append(f"{_pct(sp)}: {100 * min(reached):.2f}-{100 * max(reached):.2f}%")
    emptied = sorted({name for r in mine for name in r["empty"]})
    said = f" Layers emptied in some run: {', '.join(f'`{n}`' for n in emptied)}." if emptied else ""
    return [
        f"\n### protocol {protocol}: masks {masks}; BN warm-up: {mode}\n",
        _page.table(head, rows, "l" + "r" * (len(head) - 1)),
        f"\nReached sparsity of the maskable weights: {'; '.join(notes)}.{said}",
    ]


def make_jobs(task: str, protocols: list[str], criteria: list[str], sparsities: list[float], seeds: int, epochs: int):
    base = {"task": task, "epochs": epochs}
    jobs = [
        {**base, "protocol": None, "criterion": "dense", "sparsity": 0.0, "warmup": False, "seed": s}
        for s in range(seeds)
    ]
    return jobs + [
        {**base, "protocol": pr, "criterion": c, "sparsity": sp, "warmup": w, "seed": s}
        for pr in protocols
        for c in criteria
        for sp in sparsities
        for w in (False, True)
        for s in range(seeds)
    ]


def describe(args, task, protocols, criteria, sparsities, seeds: int, epochs: int, runs: int) -> str:
    """What was run, for the printout (each line after '# ') and the page."""
    model = task.model_factory()
    total = sum(p.numel() for p in model.parameters())
    lines = [
        f"Task `{args.task}` ({task.model_name}, {total:,} parameters), protocol(s) {_page.listing(protocols)}; "
        f"criteria {_page.listing(criteria)}; sparsities {_page.listing(_pct(s) for s in sparsities)} of the "
        f"maskable weights, each without and with BN warm-up; {f'seeds 0..{seeds - 1}' if seeds > 1 else 'seed 0'}; every run prunes the untrained "
        f"network (method `init`, unstructured, global scope, `max_ratio` 1.0) and trains it {epochs} epochs from "
        f"scratch with the task's dense recipe; the dense network trained the same way is the reference. {runs} runs "
        f"in {args.workers} worker process(es) of one torch thread."
    ]
    for pr in protocols:
        maskable = sum(w.numel() for w in maskable_weights(model, pr))
        budgets = ", ".join(f"{_pct(sp)} -> {budget_fraction(model, sp, pr):.4f}" for sp in sparsities)
        lines.append(
            f"Protocol {pr}: {maskable:,} maskable weights ({100 * maskable / total:.1f}% of the parameters); "
            f"params budget {budgets}."
        )
    lines.append(
        "Cells: test accuracy %, mean ± std over seeds; '(n collapsed)': runs in which a layer was emptied, "
        "'(m classifier emptied)': of those, runs in which the classifier (last Linear) was."
    )
    return "\n\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", choices=TASKS, default="digits")
    p.add_argument(
        "--protocol",
        "--protocols",
        dest="protocols",
        default="autoprune",
        help="study, autoprune, or both comma-separated (one table each)",
    )
    p.add_argument("--criteria", default=",".join(CRITERIA))
    p.add_argument("--sparsities", default=",".join(str(s) for s in SPARSITIES))
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=None, help="training epochs from scratch (task default)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--quick", action="store_true", help="smoke run: 1 seed, 3 epochs, random and snip at 0.9")
    _page.add_arguments(p)
    args = p.parse_args()
    protocols = [s.strip() for s in args.protocols.split(",") if s.strip()]
    bad = [s for s in protocols if s not in PROTOCOLS]
    if bad or not protocols:
        p.error(f"--protocol: choose among {', '.join(PROTOCOLS)} (comma-separated), got {args.protocols!r}")
    page = _page.Page(
        __file__, f"Pruning at initialisation on {args.task}: which criterion keeps a trainable network?", args
    )
    criteria = args.criteria.split(",")
    sparsities = [float(s) for s in args.sparsities.split(",")]
    seeds, epochs = args.seeds, args.epochs
    if args.quick:
        criteria, sparsities, seeds, epochs = ["random", "snip"], [0.9], 1, 3
    task = build_task(args.task)
    if epochs is None:
        epochs = task.train_epochs
    jobs = make_jobs(args.task, protocols, criteria, sparsities, seeds, epochs)
    protocol = describe(args, task, protocols, criteria, sparsities, seeds, epochs, len(jobs))
    print("\n".join(f"# {line}" for line in protocol.split("\n\n")))
    print(f"# {_page.machine()}")
    t0 = time.perf_counter()
    results = []
    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        for i, r in enumerate(pool.map(one_run, jobs), start=1):
            results.append(r)
            if i % max(1, len(jobs) // 10) == 0 or i == len(jobs):
                print(f"# {i}/{len(jobs)} runs done, {time.perf_counter() - t0:.0f} s", flush=True)

    dense = [r["test_acc"] for r in results if r["criterion"] == "dense"]
    page.show(f"\nDense (no pruning), test accuracy %: {_fmt(dense)}.")
    for pr in protocols:
        page.show(*table_blocks(results, pr, criteria, sparsities))
    secs = [r["seconds"] for r in results]
    page.show(
        f"\nRuns: {len(results)}, {time.perf_counter() - t0:.0f} s in all; median run {statistics.median(secs):.1f} s."
    )
    page.write(protocol)


if __name__ == "__main__":
    main()
