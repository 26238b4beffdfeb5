"""Pruning methods compared at matched training compute (ShrinkBench's protocol).

What is measured: every registered method (``autoprune list methods``) prunes the same
dense network, trained once per seed with the task's recipe, to several operating points,
and the table gives test accuracy, mean ± std over seeds. Channel pruning is taken to 50%,
30% and 15% of the dense FLOPs; weight masks to 10% and 5% of the density of the conv and
linear weights (turned into the equivalent ``params`` budget, as BN parameters and biases
are never masked). Each method trains for the same number of epochs after the dense model
(``--epochs``, default 6): fine-tuning, sparsifying, regrowing, retraining and, for ``init``,
training from scratch all come out of that one allowance; dense training is excluded.

Every method uses its natural criterion (``init``: snip, ``slimming``: bn_scale, the rest:
magnitude), global scope and its default options. The baseline row is one-shot magnitude
pruning with a uniform ratio per layer (``oneshot``, scope ``local``). Every run is a full
``autoprune.engine.run``, as ``autoprune prune`` runs it.

Tasks: ``digits`` (scikit-learn's 8x8 digits, ``digits_resnet``) and ``seq1d`` (the
synthetic 1-D task of ``bench/seq1d.py``, a Conv1d ResNet). Runs are independent processes
(``--workers``, one torch thread each). Run: ``python bench/methods.py --task digits``
(its page: ``docs/src/results/methods-digits.md``); ``--quick`` is a smoke run (one seed, 1
epoch, one operating point each).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

BENCH = Path(__file__).resolve().parent
if str(BENCH) not in sys.path:  # seq1d and _page, also in spawned workers
    sys.path.insert(0, str(BENCH))

import _page  # noqa: E402
from pai import TASKS, build_task  # noqa: E402

FLOPS = (0.5, 0.3, 0.15)  # channel pruning: kept FLOPs fraction
DENSITY = (0.1, 0.05)  # weight masks: kept fraction of the conv and linear weights
CRITERION = {"init": "snip", "slimming": "bn_scale"}  # a method's natural criterion; the rest magnitude
BASELINE = "uniform magnitude (oneshot, local)"


def rows() -> list[tuple[str, str, str, tuple[str, ...]]]:
    """(label, method, scope, structures) per table row, the baseline first."""
    from autoprune.engine.methods import METHODS

    out = [(BASELINE, "oneshot", "local", ("channel", "unstructured"))]
    return out + [(name, name, "global", METHODS.get(name).structures) for name in METHODS.names()]


def params_fraction(model, density: float) -> float:
    """The params budget that keeps ``density`` of the conv and linear weights."""
    from autoprune.engine.graph import PRUNABLE_TYPES

    total = sum(p.numel() for p in model.parameters())
    maskable = sum(m.weight.numel() for m in model.modules() if isinstance(m, PRUNABLE_TYPES))
    return (total - (1.0 - density) * maskable) / total


def one_run(job: dict) -> dict:
    import dataclasses

    import torch

    torch.set_num_threads(1)
    from autoprune import engine
    from autoprune.config import Budget, EngineConfig, FinetuneConfig, MeasureConfig, Policy

    cfg = EngineConfig(
        seed=job["seed"], progress=False, device="cpu", measure=MeasureConfig(batch_sizes=(1,), warmup=1, repeats=1)
    )
    task = build_task(job["task"])
    dense = engine.dense_model(task, cfg, log=lambda _: None)
    t0 = time.perf_counter()
    if job["method"] == "dense":
        return {**job, "test_acc": engine.evaluate(dense, task.loader("test")), "seconds": 0.0}
    if job["structure"] == "channel":
        budget = Budget("flops", job["point"])
    else:
        budget = Budget("params", params_fraction(dense, job["point"]), tolerance=0.002)
    policy = Policy(
        structure=job["structure"],
        criterion=CRITERION.get(job["method"], "magnitude"),
        scope=job["scope"],
        method=job["method"],
        max_ratio=0.9 if job["structure"] == "channel" else 0.99,  # masks: a layer may keep 1% at 5% density
        finetune=FinetuneConfig(epochs=job["epochs"]),
    )
    if job["method"] == "init":  # training from scratch is its whole allowance
        cfg = dataclasses.replace(cfg, train_epochs=job["epochs"])
    try:
        result = engine.run(task, dense, policy, budget, cfg, test=True)
    except Exception as exc:  # noqa: BLE001 - a method that cannot prune this model is a cell, not a crash
        return {**job, "error": f"{type(exc).__name__}: {exc}", "seconds": time.perf_counter() - t0}
    return {
        **job,
        "test_acc": result.pruned["test_acc"],
        "flops_ratio": result.pruned["flops_ratio"],
        "params_ratio": result.pruned["params_ratio"],
        "seconds": time.perf_counter() - t0,
    }


def make_jobs(task: str, seeds: int, epochs: int, flops: list[float], density: list[float]) -> list[dict]:
    base = {"task": task, "epochs": epochs}
    jobs = [
        {**base, "label": "dense", "method": "dense", "structure": "-", "point": 1.0, "seed": s} for s in range(seeds)
    ]
    for label, method, scope, structures in rows():
        for structure, points in (("channel", flops), ("unstructured", density)):
            if structure not in structures:
                continue
            jobs += [
                {
                    **base,
                    "label": label,
                    "method": method,
                    "scope": scope,
                    "structure": structure,
                    "point": p,
                    "seed": s,
                }
                for p in points
                for s in range(seeds)
            ]
    return jobs


def _cell(runs: list[dict]) -> str:
    if not runs:
        return "-"
    failed = [r for r in runs if "error" in r]
    accs = [r["test_acc"] for r in runs if "error" not in r]
    text = _page.pm(accs, digits=1, scale=100.0) if accs else "failed"
    return text + (f" ({len(failed)} failed)" if failed and accs else "")


def table(results: list[dict], structure: str, points: list[float]) -> str:
    unit = "FLOPs" if structure == "channel" else "density"
    labels = [label for label, _, _, structures in rows() if structure in structures]
    body = [
        [label]
        + [
            _cell([r for r in results if r["label"] == label and r["structure"] == structure and r["point"] == p])
            for p in points
        ]
        for label in labels
    ]
    return _page.table(["method"] + [f"{unit} {p:g}" for p in points], body, "l" + "r" * len(points))


def describe(args, task, seeds: int, epochs: int, runs: int, flops, density) -> str:
    total = sum(p.numel() for p in task.model_factory().parameters())
    return (
        f"Task `{args.task}` ({task.model_name}, {total:,} parameters); seeds 0..{seeds - 1}; dense model trained "
        f"{task.train_epochs} epochs per seed (excluded from the compute); every method then trains {epochs} epochs "
        f"in all. Channels: FLOPs budgets {_page.listing(flops)}; masks: density {_page.listing(density)} of the conv "
        f"and linear weights. Criteria: init snip, slimming bn_scale, the rest magnitude; global scope, default "
        f"options; `max_ratio` 0.9 for channels, 0.99 for masks; baseline: {BASELINE}. {runs} runs in {args.workers} worker process(es) of one torch thread. "
        "Cells: test accuracy %, mean ± std over seeds."
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", choices=TASKS, default="digits")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=6, help="training epochs after the dense model, every method")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--quick", action="store_true", help="smoke run: 1 seed, 1 epoch, one operating point each")
    _page.add_arguments(p)
    args = p.parse_args()
    args.page_name = args.page_name or f"methods-{args.task}"  # one page per task
    os.environ.setdefault("AUTOPRUNE_CACHE", tempfile.mkdtemp(prefix="autoprune-bench-"))  # dense models, per run
    seeds, epochs, flops, density = args.seeds, args.epochs, list(FLOPS), list(DENSITY)
    if args.quick:
        seeds, epochs, flops, density = 1, 1, flops[:1], density[:1]
    page = _page.Page(__file__, f"Pruning methods at matched training compute on {args.task}", args)
    task = build_task(args.task)
    jobs = make_jobs(args.task, seeds, epochs, flops, density)
    protocol = describe(args, task, seeds, epochs, len(jobs), flops, density)
    print(f"# {protocol}\n# {_page.machine()}", flush=True)
    with ProcessPoolExecutor(max_workers=args.workers) as pool:  # the dense models first, one per seed
        list(pool.map(one_run, [j for j in jobs if j["method"] == "dense"]))
    t0, results = time.perf_counter(), []
    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        for i, r in enumerate(pool.map(one_run, jobs), start=1):
            results.append(r)
            if "error" in r:
                print(f"# {r['label']} {r['structure']} {r['point']:g} seed {r['seed']}: {r['error']}", flush=True)
            if i % max(1, len(jobs) // 10) == 0 or i == len(jobs):
                print(f"# {i}/{len(jobs)} runs done, {time.perf_counter() - t0:.0f} s", flush=True)
    dense = [r["test_acc"] for r in results if r["method"] == "dense"]
    page.show(f"\nDense network, test accuracy %: {_page.pm(dense, digits=1, scale=100.0)}.")
    page.show("\n### Channel pruning (kept FLOPs fraction)\n", table(results, "channel", flops))
    page.show(
        "\n### Weight masks (kept density of the conv and linear weights)\n", table(results, "unstructured", density)
    )
    secs = [r["seconds"] for r in results if r["method"] != "dense"]
    page.show(
        f"\nRuns: {len(results)}; median run {statistics.median(secs):.1f} s; {time.perf_counter() - t0:.0f} s in all."
    )
    page.write(protocol)


if __name__ == "__main__":
    main()
