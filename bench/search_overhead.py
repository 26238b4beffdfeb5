"""Search throughput on the default task: per-trial overhead, and trials per minute at
concurrency 1 against 2.

Pairs of real searches run back to back in one process, identical but for ``--concurrency``:
the default space, the seeded ``random`` searcher (so both run the same policies in the same
order), no early stopping (every trial runs all its epochs), local Ray sized to this
machine, MLflow logging to a fresh SQLite store, 1 CPU (one torch thread) per trial.
From the MLflow child runs and the trials' own reports:

* engine time: the time a trial spends inside ``engine.run`` (score, solve, prune, measure,
  fine-tune, evaluate), measured in the trial;
* trial wall time: from Tune's trial start to its completion, measured by the driver's
  callback (scheduling, actor reuse, fetching the dense model, result reporting and the
  MLflow logging of its epochs included);
* per-trial overhead = (trial wall - engine time) / trial wall, summed over the trials;
  also without the first trial on each worker (``concurrency`` trials), whose wall time
  includes starting the worker process and importing torch and the engine in it;
* span: from the first trial's start to the last trial's end; span overhead at
  concurrency 1 = (span - sum of engine times) / span, which also counts the gaps between
  trials;
* trials per minute = trials / span; scaling = concurrency-2 rate over concurrency-1 rate;
* steady state: the same after every worker's first trial has ended (time t_s): trials
  ending after t_s over (last end - t_s). Each worker's first trial pays a fixed start-up of
  about 3 s on this machine (the actor process, importing torch and the engine, and torch's
  first optimizer importing ``torch._dynamo``), which weighs on a short search at any
  concurrency.

The searches run in pairs (concurrency 1, then 2), ``--repeats`` pairs (default 3), and
the medians over the pairs are the figures: on a shared 2-core machine one pair's scaling
has varied from 1.67x to 1.95x.

Run: ``python bench/search_overhead.py`` (``--trials 20 --epochs 3`` by default: the
default search's size).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path
from statistics import median

import _page

import autoprune
from autoprune.config import Budget, EngineConfig, SearchConfig


def one(root: Path, concurrency: int, trials: int, epochs: int) -> dict:
    from mlflow.tracking import MlflowClient

    root.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    name = f"bench-c{concurrency}"
    result = autoprune.run_search(
        SearchConfig(
            name=name,
            budget=Budget("flops", 0.5),
            searcher="random",
            trials=trials,
            epochs=epochs,
            final_epochs=1,
            concurrency=concurrency,
            scheduler="none",
            storage=str(root / "results"),
            tracking_uri=uri,
            engine=EngineConfig(progress=False),
            progress=False,
        )
    )
    client = MlflowClient(uri)
    runs = sorted((client.get_run(r.run_id) for r in result.trials if r.run_id), key=lambda r: r.info.start_time)
    wall = [r.data.metrics["trial_wall_s"] for r in runs]
    engine = [r.data.metrics["engine_s"] for r in runs]
    later_wall, later_engine = wall[concurrency:], engine[concurrency:]
    t_s = max(r.info.end_time for r in runs[:concurrency])
    after = [r for r in runs if r.info.end_time > t_s]
    steady = 60 * len(after) / ((max(r.info.end_time for r in runs) - t_s) / 1000) if after else float("nan")
    span = (max(r.info.end_time for r in runs) - min(r.info.start_time for r in runs)) / 1000
    return {
        "concurrency": concurrency,
        "trials": len(runs),
        "completed": sum(r.status == "completed" for r in result.trials),
        "mean_engine_s": sum(engine) / len(engine),
        "mean_wall_s": sum(wall) / len(wall),
        "overhead": (sum(wall) - sum(engine)) / sum(wall),
        "overhead_warm": (sum(later_wall) - sum(later_engine)) / sum(later_wall),
        "span_s": span,
        "span_overhead": (span - sum(engine) / concurrency) / span,
        "per_min": 60 * len(runs) / span,
        "steady_per_min": steady,
    }


HEAD = [
    "pair",
    "concurrency",
    "trials",
    "mean engine s",
    "mean wall s",
    "per-trial overhead",
    "after start-up",
    "span s",
    "span overhead",
    "trials/min",
    "steady trials/min",
]


def _row(i: int, r: dict) -> list[str]:
    return [
        str(i),
        str(r["concurrency"]),
        str(r["trials"]),
        f"{r['mean_engine_s']:.2f}",
        f"{r['mean_wall_s']:.2f}",
        f"{100 * r['overhead']:.1f}%",
        f"{100 * r['overhead_warm']:.1f}%",
        f"{r['span_s']:.1f}",
        f"{100 * r['span_overhead']:.1f}%" if r["concurrency"] == 1 else "-",
        f"{r['per_min']:.1f}",
        f"{r['steady_per_min']:.1f}",
    ]


def _protocol(args) -> str:
    return (
        f"{args.repeats} pair(s) of real searches run back to back in one process, each pair identical but for "
        f"`--concurrency` (1, then 2): the default task and space, the seeded `random` searcher (the same policies "
        f"in the same order), {args.trials} trials of {args.epochs} epoch(s), no early stopping, 1 CPU (one torch "
        "thread) per trial, local Ray, MLflow logging to a fresh SQLite store. Engine time: measured inside the "
        "trial around `engine.run`; trial wall time: from Tune's trial start to its completion, in the driver's "
        "callback; per-trial overhead = (trial wall - engine time) / trial wall, summed over the trials, and the "
        "same without each worker's first trial (after start-up); span: first trial start to last trial end; span "
        "overhead (concurrency 1) = (span - engine time) / span; trials per minute = trials / span; steady: the same "
        "after every worker's first trial has ended. The summary figures are medians over the pairs."
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3, help="pairs of searches (concurrency 1 then 2)")
    _page.add_arguments(ap)
    args = ap.parse_args()
    page = _page.Page(__file__, "Search throughput: per-trial overhead, and concurrency 1 against 2", args)
    root = Path(tempfile.mkdtemp(prefix="autoprune-bench-search-"))
    os.environ.setdefault("AUTOPRUNE_CACHE", str(root / "cache"))
    try:
        pairs = [[one(root / f"r{i}", c, args.trials, args.epochs) for c in (1, 2)] for i in range(args.repeats)]
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"\nmachine: {_page.machine()}")
    print(
        f"default task, default space, random searcher, {args.trials} trials x {args.epochs} epochs, no early stop, "
        f"{args.repeats} pair(s) of searches\n"
    )
    rows = [_row(i, r) for i, pair in enumerate(pairs, 1) for r in pair]
    page.show(_page.table(HEAD, rows, "r" * len(HEAD)))
    overhead = [pair[0]["overhead"] for pair in pairs]
    warm = [pair[0]["overhead_warm"] for pair in pairs]
    scaling = [pair[1]["per_min"] / pair[0]["per_min"] for pair in pairs]
    steady = [pair[1]["steady_per_min"] / pair[0]["steady_per_min"] for pair in pairs]
    page.show(
        f"\nPer-trial overhead at concurrency 1: median {100 * median(overhead):.1f}% "
        f"({_each(overhead, '{:.1%}')}), after start-up {100 * median(warm):.1f}%.",
        f"\nScaling, concurrency 2 over 1: median {median(scaling):.2f}x trials per minute "
        f"({_each(scaling, '{:.2f}x')}), {median(steady):.2f}x in steady state.",
    )
    page.write(_protocol(args))


def _each(values: list[float], fmt: str) -> str:
    return "pairs: " + ", ".join(fmt.format(v) for v in values)


if __name__ == "__main__":
    main()
