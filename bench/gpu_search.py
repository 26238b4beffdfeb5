"""Trials per minute of the default search on a GPU, against the same search on the CPU,
and the GPU's utilisation while it runs (the issue's GPU check; needs a CUDA GPU and
``nvidia-smi``).

Three set-ups of one search (``--trials`` trials of ``--epochs`` epochs, scheduler none, no
final re-run; add ``--search-args`` for another task), run in rounds, each round running all
three one after the other (``--rounds``, median over them):

* ``cpu``: ``--gpus-per-trial 0`` (trials on the CPU, one per core);
* ``gpu 1``: ``--gpus-per-trial 1``: one trial at a time on the GPU;
* ``gpu 0.25``: ``--gpus-per-trial 0.25``: four trials share the GPU.

Trials per minute come from the trials' MLflow runs (first start to last end). During each
GPU search ``nvidia-smi`` is sampled every 0.2 s; the mean and median utilisation over the
trials' span are printed, with the most memory used.

On a machine without a CUDA GPU only the ``cpu`` set-up runs, and the page says so.

Run: ``python bench/gpu_search.py`` (a few minutes).
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import _page
from _machine import trial_rate

SETUPS = {"cpu": 0.0, "gpu 1": 1.0, "gpu 0.25": 0.25}


class GpuSampler:
    """``nvidia-smi`` utilisation and memory samples, every ``period`` seconds, in a thread."""

    def __init__(self, period: float = 0.2, on: bool = True) -> None:
        self.period, self.samples, self._stop, self.on = period, [], threading.Event(), on
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        query = ["nvidia-smi", "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits", "-i", "0"]
        while not self._stop.is_set():
            out = subprocess.run(query, capture_output=True, text=True).stdout.split(",")
            if len(out) == 2:
                self.samples.append((time.time(), float(out[0]), float(out[1])))
            self._stop.wait(self.period)

    def __enter__(self) -> GpuSampler:
        if self.on:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self.on:
            self._thread.join()


def _search(tmp: Path, name: str, gpus: float, args) -> tuple[float, float, float, float]:
    """(trials/min, mean and median GPU utilisation %, peak GPU memory MiB) of one search."""
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    cmd = [str(Path(sys.executable).with_name("autoprune")), "search", "--trials", str(args.trials), "--name", name]
    cmd += ["--epochs", str(args.epochs), "--final-epochs", "0", "--scheduler", "none", "--no-progress"]
    cmd += ["--gpus-per-trial", f"{gpus:g}", "--storage", str(tmp / "st"), "--tracking-uri", uri]
    cmd += shlex.split(args.search_args)
    with GpuSampler(on=gpus > 0) as gpu:
        proc = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise SystemExit(f"the search ({name}) failed: {proc.stderr[-2000:]}")
    rate, _, span = trial_rate(uri, name)
    end = max(t for t, _, _ in gpu.samples) if gpu.samples else 0
    during = [(u, m) for t, u, m in gpu.samples if end - span <= t <= end]
    util = [u for u, _ in during] or [0.0]
    peak = max((m for _, m in during), default=0.0)
    print(f"  {name:10s} {rate:7.1f} trials/min, GPU {statistics.mean(util):5.1f}% mean", flush=True)
    return rate, statistics.mean(util), statistics.median(util), peak


def _protocol(args, setups: dict[str, float], gpu: bool) -> str:
    extra = f" plus `{args.search_args}`" if args.search_args else ""
    what = (
        f"One `autoprune search` ({args.trials} trials of {args.epochs} epoch(s), scheduler none, no final re-run"
        f"{extra}) in {len(setups)} set-up(s), run in {args.rounds} round(s), each round running every set-up once "
        "in turn: `cpu` (`--gpus-per-trial 0`: trials on the CPU, one per core)"
    )
    if not gpu:
        return (
            f"{what}. **No CUDA GPU was present on this machine** ({_page.machine()}), so only the `cpu` set-up ran. "
            "With a GPU the script also runs `gpu 1` (`--gpus-per-trial 1`: one trial at a time on the GPU) and "
            "`gpu 0.25` (`--gpus-per-trial 0.25`: four trials share it), samples `nvidia-smi` every 0.2 s during "
            "each GPU search for the GPU's utilisation (mean and median over the trials' span) and its peak memory, "
            "and compares their trials per minute with the CPU's. Trials per minute come from the trials' MLflow "
            "runs (first start to last end); the median over the rounds, the range in brackets."
        )
    return (
        f"{what}, `gpu 1` (`--gpus-per-trial 1`: one trial at a time on the GPU) and `gpu 0.25` "
        "(`--gpus-per-trial 0.25`: four trials share the GPU). Trials per minute come from the trials' MLflow runs "
        "(first start to last end); the median over the rounds, the range in brackets. During each GPU search "
        "`nvidia-smi` is sampled every 0.2 s: the utilisation's mean and median over the trials' span (medians over "
        "the rounds), and the most memory used."
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--search-args", default="", help="more `autoprune search` flags, e.g. a task")
    _page.add_arguments(parser)
    args = parser.parse_args()
    page = _page.Page(__file__, "Trials per minute of the default search on a GPU, against the CPU", args)
    import torch

    gpu = torch.cuda.is_available()
    setups = SETUPS if gpu else {"cpu": 0.0}
    print(f"machine: {_page.machine()}")
    if not gpu:
        print("no CUDA GPU here: only the cpu set-up runs (the benchmark compares a GPU against the CPU)")
    print(f"{args.trials} trials x {args.epochs} epoch(s) per search {args.search_args}".rstrip())
    results: dict[str, list[tuple[float, ...]]] = {k: [] for k in setups}
    with tempfile.TemporaryDirectory() as d:
        for r in range(args.rounds):
            print(f"round {r + 1}:")
            for label, gpus in setups.items():
                tmp = Path(d) / f"{label.replace(' ', '')}-{r}"
                tmp.mkdir()
                results[label].append(_search(tmp, f"{label.replace(' ', '')}-{r}", gpus, args))
    base = statistics.median(x[0] for x in results["cpu"])
    rows = []
    for label, runs in results.items():
        rates = [x[0] for x in runs]
        rate = statistics.median(rates)
        util, peak = "-", "-"
        if label != "cpu":
            util = f"{statistics.median(x[1] for x in runs):.1f}% / {statistics.median(x[2] for x in runs):.1f}%"
            peak = f"{max(x[3] for x in runs):.0f}"
        rows.append([label, f"{rate:.1f} ({min(rates):.1f}-{max(rates):.1f})", f"{rate / base:.2f}x", util, peak])
    head = ["set-up", "trials/min (median, range)", "vs cpu", "GPU util mean / median", "peak MiB"]
    page.show("", _page.table(head, rows, "lrrrr"))
    if not gpu:
        page.show(f"\nNo CUDA GPU on this machine ({_page.machine()}): the GPU set-ups did not run.")
    page.write(_protocol(args, setups, gpu))


if __name__ == "__main__":
    main()
