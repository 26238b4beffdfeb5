"""Pruning at initialisation on the default task: which criterion keeps a trainable network?

What is measured: for each criterion (random, magnitude, snip, grasp, synflow, fisher,
hutchinson), each unstructured sparsity (90%, 95%, 98% of the conv/linear weights masked),
with and without BN warm-up, and each seed, autoprune's ``init`` method prunes the
untrained digits network (scope ``global``, ``max_ratio`` 1.0, so layers may collapse) and
trains it from scratch with the dense recipe (task default: 30 epochs, SGD, cosine from
0.1). The table gives test accuracy, mean ± std over seeds, and how many runs emptied a
layer (layer collapse). The dense network trained with the same recipe and seeds is the
reference. Every run is a full ``autoprune.engine.run``: the same scoring subset (10 per
class), the same budget solver and the same training loop as ``autoprune prune``.

Sparsity counts conv/linear weights only; it is turned into the equivalent ``params``
budget (BN parameters and biases are never masked).

Runs are independent processes (``--workers``, one torch thread each), so the figures do
not depend on the worker count. Run: ``python bench/pai.py`` (``--quick`` for a smoke run:
one seed, 3 epochs, two criteria).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from concurrent.futures import ProcessPoolExecutor

CRITERIA = ("random", "magnitude", "snip", "grasp", "synflow", "fisher", "hutchinson")
SPARSITIES = (0.90, 0.95, 0.98)


def _budget_fraction(model, sparsity: float) -> float:
    """The params fraction that masks ``sparsity`` of the conv/linear weights."""
    from autoprune.graph import PRUNABLE_TYPES

    total = sum(p.numel() for p in model.parameters())
    prunable = sum(m.weight.numel() for m in model.modules() if isinstance(m, PRUNABLE_TYPES))
    return (total - sparsity * prunable) / total


def one_run(job: dict) -> dict:
    import torch

    torch.set_num_threads(1)
    from autoprune import engine
    from autoprune.config import Budget, EngineConfig, FinetuneConfig, MeasureConfig, Policy
    from autoprune.tasks import get_task

    cfg = EngineConfig(seed=job["seed"], train_epochs=job["epochs"], progress=False, device="cpu",
                       measure=MeasureConfig(batch_sizes=(1,), warmup=1, repeats=1))  # fmt: skip
    task = get_task(cfg.task)
    t0 = time.perf_counter()
    if job["criterion"] == "dense":
        engine.seed_everything(job["seed"])
        model = task.model_factory()
        engine.train(model, task, FinetuneConfig(epochs=job["epochs"], lr=task.train_lr), job["seed"],
                     torch.device("cpu"))  # fmt: skip
        return {**job, "test_acc": engine.evaluate(model, task.loader("test")), "empty": 0,
                "seconds": time.perf_counter() - t0}  # fmt: skip
    fresh = task.model_factory()
    budget = Budget("params", _budget_fraction(fresh, job["sparsity"]), tolerance=0.002)
    policy = Policy(structure="unstructured", criterion=job["criterion"], scope="global", method="init",
                    max_ratio=1.0, bn_warmup=job["warmup"], finetune=FinetuneConfig(epochs=0))  # fmt: skip
    result = engine.run(task, fresh, policy, budget, cfg, test=True)
    return {**job, "test_acc": result.pruned["test_acc"], "empty": len(result.collapse["empty"]),
            "params_ratio": result.pruned["params_ratio"], "seconds": time.perf_counter() - t0}  # fmt: skip


def _fmt(values: list[float]) -> str:
    if not values:
        return "-"
    mean = 100 * statistics.fmean(values)
    std = 100 * statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.1f} ± {std:.1f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--criteria", default=",".join(CRITERIA))
    p.add_argument("--sparsities", default=",".join(str(s) for s in SPARSITIES))
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=None, help="training epochs from scratch (task default 30)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--quick", action="store_true", help="smoke run: 1 seed, 3 epochs, random and snip at 0.9")
    args = p.parse_args()
    criteria = args.criteria.split(",")
    sparsities = [float(s) for s in args.sparsities.split(",")]
    seeds, epochs = args.seeds, args.epochs
    if args.quick:
        criteria, sparsities, seeds, epochs = ["random", "snip"], [0.9], 1, 3
    if epochs is None:
        from autoprune.config import TaskConfig
        from autoprune.tasks import get_task

        epochs = get_task(TaskConfig()).train_epochs

    jobs = [{"criterion": "dense", "sparsity": 0.0, "warmup": False, "seed": s, "epochs": epochs} for s in range(seeds)]
    jobs += [
        {"criterion": c, "sparsity": sp, "warmup": w, "seed": s, "epochs": epochs}
        for c in criteria
        for sp in sparsities
        for w in (False, True)
        for s in range(seeds)
    ]
    import torch

    print(f"# pruning at initialisation, digits task, {epochs} epochs from scratch, {seeds} seed(s)")
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, {args.workers} worker(s) "
          f"of 1 thread, torch {torch.__version__}, {len(jobs)} runs")  # fmt: skip
    t0 = time.perf_counter()
    results = []
    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        for i, r in enumerate(pool.map(one_run, jobs), start=1):
            results.append(r)
            if i % max(1, len(jobs) // 10) == 0 or i == len(jobs):
                print(f"# {i}/{len(jobs)} runs done, {time.perf_counter() - t0:.0f} s", flush=True)

    dense = [r["test_acc"] for r in results if r["criterion"] == "dense"]
    print(f"\ndense (no pruning), test accuracy %: {_fmt(dense)}\n")
    head = " | ".join(f"{int(round(100 * s))}% no warm-up | {int(round(100 * s))}% BN warm-up" for s in sparsities)
    print(f"| criterion | {head} |")
    print("|---|" + "---:|" * (2 * len(sparsities)))
    for c in criteria:
        cells = []
        for sp in sparsities:
            for w in (False, True):
                runs = [r for r in results if r["criterion"] == c and r["sparsity"] == sp and r["warmup"] == w]
                collapsed = sum(1 for r in runs if r["empty"])
                cells.append(_fmt([r["test_acc"] for r in runs]) + (f" ({collapsed} collapsed)" if collapsed else ""))
        print(f"| {c} | " + " | ".join(cells) + " |")
    secs = [r["seconds"] for r in results]
    print("\n# test accuracy %, mean ± std over seeds; '(n collapsed)': runs in which a layer was emptied")
    print(f"# wall time {time.perf_counter() - t0:.0f} s; median run {statistics.median(secs):.1f} s")


if __name__ == "__main__":
    main()
