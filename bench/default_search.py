"""The README's first command's search, ``autoprune search --budget-flops 0.5``, from a cold start.

The search runs as a subprocess with every default, in a fresh temporary working directory:
its dense-model cache (``AUTOPRUNE_CACHE``), Ray Tune storage (``--storage``) and MLflow store
(``mlflow.db``, the default in the working directory) all inside it, so the dense model is
trained from scratch and the latency table built anew; ``RAY_ADDRESS`` is unset, so it runs on
an embedded local Ray instance. The page gives the command's wall time and what the search's
``summary.json`` says: what it returned (a trial or uniform pruning at matched compute) and its
policy, the dense model against it (test metric, FLOPs, parameters, measured and predicted
speed-up) and the verdict against uniform pruning given the search's whole compute.

Flags after ``--`` go to ``autoprune search`` (a smoke run:
``python bench/default_search.py -- --trials 4 --epochs 1 --final-epochs 1``).

Run: ``python bench/default_search.py`` (about 2 minutes on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _page

from autoprune.search.summary import SearchSummary

BUDGET = ["--budget-flops", "0.5"]


def run_search(extra: list[str]) -> tuple[SearchSummary, float]:
    """Run the search in a fresh working directory; its summary and the command's wall time."""
    with tempfile.TemporaryDirectory(prefix="autoprune-default-search-") as d:
        tmp = Path(d)
        env = {**os.environ, "AUTOPRUNE_CACHE": str(tmp / "cache")}
        env.pop("RAY_ADDRESS", None)
        cmd = [str(Path(sys.executable).with_name("autoprune")), "search", *BUDGET, "--storage", str(tmp / "storage")]
        t0 = time.perf_counter()
        proc = subprocess.run([*cmd, *extra], cwd=tmp, env=env)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise SystemExit(f"the search failed (exit status {proc.returncode})")
        found = sorted(tmp.rglob("summary.json"), key=lambda p: p.stat().st_mtime)
        if not found:
            raise SystemExit(f"the search left no summary.json under {tmp}")
        return SearchSummary.read(found[-1]), wall


def _metric(summary: SearchSummary) -> tuple[str, str, bool]:
    """(validation key, test key, reads as a percentage) of the task's metric."""
    info = summary.task_metric or {}
    key = info.get("key") or "val_acc"
    return key, "test_" + key.removeprefix("val_"), bool(info.get("percent", key.endswith("acc")))


def _fmt(value, percent: bool) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.2f}%" if percent else f"{value:.4g}"


def comparison(summary: SearchSummary) -> str:
    """The dense model against the returned one, as a table."""
    dense, best = summary.dense, summary.best
    val, test, percent = _metric(summary)
    lo, hi = best.get("speedup_spread") or (None, None)
    spread = f" ({lo:.2f}-{hi:.2f})" if lo is not None else ""
    batch = best.get("latency_batch", 1)
    rows = [
        [f"test {test.removeprefix('test_')}", _fmt(dense.get(test), percent), _fmt(best.get(test), percent)],
        [f"validation {val.removeprefix('val_')}", _fmt(dense.get(val), percent), _fmt(best.get(val), percent)],
        ["FLOPs", f"{dense['flops'] / 1e6:.3f} M", f"{best['flops'] / 1e6:.3f} M"],
        ["FLOPs ratio", "1", f"{best['flops_ratio']:.3f}"],
        ["params", f"{dense['params']:,.0f}", f"{best['params']:,.0f}"],
        ["params ratio", "1", f"{best['params_ratio']:.3f}"],
        [f"latency, batch {batch} (ms)", _ms(dense), _ms(best)],
        [f"speed-up, batch {batch} (quartiles)", "1", f"{best['speedup']:.2f}x{spread}" if "speedup" in best else "-"],
    ]
    for b, s in (best.get("speedup_by_batch") or {}).items():
        if int(b) != batch:
            rows.append([f"speed-up, batch {b}", "1", f"{s:.2f}x"])
    if best.get("predicted_speedup") is not None:
        rows.append(["predicted speed-up (latency table)", "1", f"{best['predicted_speedup']:.2f}x"])
    return _page.table(["", "dense", "returned model"], rows, "lrr")


def _ms(model: dict) -> str:
    return f"{model['latency_measured_ms']:.3f}" if model.get("latency_measured_ms") is not None else "-"


def returned(summary: SearchSummary) -> list[str]:
    """What the search returned, its policy and the verdict."""
    best, matched = summary.best, summary.uniform_matched or {}
    source = best.get("source") or "trial"
    if source == "uniform_matched":
        what = (
            f"uniform pruning fine-tuned for the search's whole compute, {matched.get('epochs')} epochs "
            "(`uniform_matched`), not a trial's re-run"
        )
    else:
        baseline = f", the {best['baseline']} baseline" if best.get("baseline") else ""
        what = f"trial `{best.get('trial_id')}`{baseline}, re-run for its final epochs"
    policy = best.get("policy") or {}
    short = "/".join(str(policy.get(k)) for k in ("structure", "criterion", "scope"))
    fine = policy.get("finetune") or {}
    blocks = [
        f"The search returned {what} (source: `{source}`): policy {short}, method {policy.get('method')}, "
        f"`max_ratio` {policy.get('max_ratio')}, fine-tuned {fine.get('epochs')} epochs at lr {fine.get('lr')}.",
        "```json\n" + json.dumps(policy, indent=2) + "\n```",
    ]
    if matched.get("verdict"):
        gain = matched.get("gain") or {}
        blocks.append(f"Verdict (summary.json's `uniform_matched.verdict`): “{matched['verdict']}”.")
        if gain:
            beyond = "beyond" if gain.get("beyond_noise") else "within"
            blocks.append(
                f"Gain of the returned model over uniform at matched compute: {gain.get('points'):+.2f} ± "
                f"{gain.get('se_points'):.2f} test points ({beyond} the noise); the best trial's: "
                f"{gain.get('best_trial_points'):+.2f} points."
            )
    return blocks


def details(summary: SearchSummary) -> list[str]:
    """The re-runs of the top trials and the pruned share per group."""
    blocks = []
    reruns = summary.final_reruns or {}
    if reruns.get("val_acc"):
        rows = [[f"`{t}`", f"{100 * v:.2f}%"] for t, v in reruns["val_acc"].items()]
        blocks += [
            f"The top trials re-run for {reruns.get('epochs')} epoch(s), {reruns.get('seeds')} seed(s) each, "
            "before the winner was chosen:",
            _page.table(["trial", "validation accuracy (mean over seeds)"], rows, "lr"),
        ]
    if summary.validation:
        v = summary.validation
        blocks.append(
            f"Validation split: {v.get('samples')} samples, resolving about {v.get('resolves_points')} points."
        )
    if summary.best.get("ratios"):
        rows = [[f"`{g}`", f"{r:.3f}"] for g, r in summary.best["ratios"].items()]
        blocks += [
            "Pruned share of each group in the returned model:",
            _page.table(["group", "pruned share"], rows, "lr"),
        ]
    return blocks


def _protocol(summary: SearchSummary, extra: list[str]) -> str:
    t = summary.trials
    return (
        f"The README's first command, `autoprune search {shlex.join(BUDGET + extra)}`, every other setting at its "
        "default, run as a subprocess in a fresh temporary working directory: the dense-model cache "
        "(`AUTOPRUNE_CACHE`), the Ray Tune storage (`--storage`) and the MLflow store (`mlflow.db` in the working "
        "directory) all inside it, so the dense model is trained from scratch and the latency table built anew, on an "
        f"embedded local Ray instance. From its `summary.json`: task `{summary.task}` ({summary.model}), budget "
        f"{summary.budget['kind']} {summary.budget['fraction']:g}, searcher `{summary.searcher}` over the "
        f"`{summary.space}` space ({_page.listing(summary.structures)}), scheduler {summary.scheduler}, metric "
        f"`{summary.metric}`; {t.get('total')} trials: {t.get('completed')} completed, {t.get('stopped_early')} "
        f"stopped early, {t.get('failed')} failed."
    )


def main() -> None:
    argv = sys.argv[1:]
    cut = argv.index("--") if "--" in argv else len(argv)
    own, extra = argv[:cut], argv[cut + 1 :]
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, usage="%(prog)s [options] [-- FLAGS]"
    )
    _page.add_arguments(parser)
    args = parser.parse_args(own)
    page = _page.Page(__file__, "The default search, from a cold start", args)
    print(f"machine: {_page.machine()}")
    summary, wall = run_search(extra)
    if summary.best is None:
        raise SystemExit("no trial fitted the budget: summary.json has no best model")
    page.show(
        "",
        f"The command ran for {_page.duration(wall)} ({wall:.0f} s); the search's own wall time "
        f"(`wall_time_s`) was {summary.wall_time_s:.0f} s.",
        "",
    )
    page.show(*returned(summary))
    page.show("", comparison(summary), "")
    page.show(*details(summary))
    page.write(_protocol(summary, extra))


if __name__ == "__main__":
    main()
