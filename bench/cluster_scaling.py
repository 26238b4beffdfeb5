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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3, help="each round runs every size once, in turn")
    parser.add_argument("--port", type=int, default=7700)
    args = parser.parse_args()
    print(f"{os.cpu_count()} CPU cores; {args.trials} trials x {args.epochs} epoch(s) of the default task per search")
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
    print(f"\nmedian of {args.rounds} round(s), range in brackets")
    print("workers  trials/min            speed-up  share of linear")
    for n, got in rates.items():
        speedup = statistics.median(got) / base
        spread = f"({min(got):.1f}-{max(got):.1f})"
        print(
            f"{n:7d}  {statistics.median(got):10.1f} {spread:11s}  {speedup:6.2f}x  {speedup / (n / min(rates)):14.0%}"
        )


if __name__ == "__main__":
    main()
