"""Trials per minute on a real multi-node Ray cluster on this machine, with 1, 2 and 3
single-CPU worker nodes (``cluster/local.sh``; the head has no CPUs, so every trial runs on a
worker).

For each worker count (``--workers``: 1 2 3) the cluster is brought up, one
``autoprune search`` runs on it (``--trials`` 12 trials of ``--epochs`` 2 on the default task,
scheduler none, no final re-run, the dense model and latency table from the cache), and the
cluster is torn down. Trials per minute = trials / (last trial's end - first trial's start),
from the trials' MLflow runs, so Ray's start-up and the driver's own work are left out.
Printed: trials per minute per worker count, the speed-up over one worker, and its share of
linear scaling (speed-up / workers). On a 2-core machine, 3 workers share 2 cores: scaling past
2 cannot be linear.

Sizes are interleaved over ``--rounds`` rounds (default 3); the median and range are printed.

Run: ``python bench/cluster_scaling.py`` (about 10 minutes).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import _page
from _machine import trial_rate

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "cluster" / "local.sh"


def _script(state: Path, *args: str) -> str:
    env = {**os.environ, "AUTOPRUNE_CLUSTER_DIR": str(state), "RAY": str(Path(sys.executable).with_name("ray"))}
    proc = subprocess.run(["bash", str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise SystemExit(f"cluster/local.sh {' '.join(args)} failed: {proc.stderr[-2000:]}")
    return proc.stdout


def _search(state: Path, tmp: Path, trials: int, epochs: int) -> float:
    """Trials per minute of one search on the running cluster."""
    env = dict(os.environ)
    for line in _script(state, "env").splitlines():
        key, _, value = line.removeprefix("export ").partition("=")
        env[key] = value
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    args = [str(Path(sys.executable).with_name("autoprune")), "search", "--trials", str(trials)]
    args += ["--epochs", str(epochs), "--final-epochs", "0", "--scheduler", "none", "--name", "scaling"]
    args += ["--storage", str(tmp / "st"), "--tracking-uri", uri, "--no-progress"]
    proc = subprocess.run(args, env=env, cwd=tmp, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise SystemExit(f"the search failed: {proc.stderr[-2000:]}")
    rate, nodes, span = trial_rate(uri, "scaling")
    print(f"    {trials} trials on {nodes} node(s) in {span:.1f} s", flush=True)
    return rate


def _protocol(args) -> str:
    return (
        "A real multi-node Ray cluster on this machine (`cluster/local.sh`: a head with no CPUs, so that every "
        f"trial runs on a worker, and {_page.listing(args.workers)} single-CPU worker nodes in turn), brought up "
        f"and torn down for each search. Each search: `autoprune search` with {args.trials} trials of {args.epochs} "
        "epoch(s) on the default task, scheduler none, no final re-run, the dense model and latency table from the "
        "cache. Trials per minute = trials / (last trial's end - first trial's start), from the trials' MLflow runs, "
        f"so Ray's start-up and the driver's own work are left out. {args.rounds} round(s), each running every size "
        "once in turn; the median over the rounds, the range in brackets. Speed-up: over the smallest size; share "
        "of linear: speed-up / (workers / smallest size)."
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3, help="each round runs every size once, in turn")
    parser.add_argument("--port", type=int, default=7700)
    _page.add_arguments(parser)
    args = parser.parse_args()
    page = _page.Page(__file__, "Trials per minute on a multi-node Ray cluster on one machine", args)
    print(f"machine: {_page.machine()}; {args.trials} trials x {args.epochs} epoch(s) of the default task per search")
    rates: dict[int, list[float]] = {n: [] for n in args.workers}
    for r in range(args.rounds):
        for n in args.workers:
            with tempfile.TemporaryDirectory() as d:
                state, tmp = Path(d) / "cluster", Path(d) / "search"
                tmp.mkdir()
                _script(state, "up", "--workers", str(n), "--worker-cpus", "1", "--port", str(args.port))
                try:
                    print(f"  round {r + 1}, {n} worker(s):", flush=True)
                    rates[n].append(_search(state, tmp, args.trials, args.epochs))
                finally:
                    _script(state, "down")
    base = statistics.median(rates[min(rates)])
    rows, said = [], []
    for n, got in rates.items():
        speedup = statistics.median(got) / base
        share = speedup / (n / min(rates))
        rows.append(
            [str(n), f"{statistics.median(got):.1f} ({min(got):.1f}-{max(got):.1f})", f"{speedup:.2f}x", f"{share:.0%}"]
        )
        if n != min(rates):
            said.append(f"{n} workers reach {speedup:.2f}x the rate of {min(rates)}, {share:.0%} of linear")
    page.show(
        f"\nMedian of {args.rounds} round(s), range in brackets:\n",
        _page.table(["workers", "trials/min", "speed-up", "share of linear"], rows, "rrrr"),
    )
    if said:
        page.show(f"\n{'; '.join(said).capitalize()}.")
    page.write(_protocol(args))


if __name__ == "__main__":
    main()
