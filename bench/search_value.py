"""Is a search worth its cost? Every searcher against uniform pruning at matched compute.

Per task (``--tasks``: ``digits``, the bundled default, and ``seq1d``, the held-out 1-D task
of ``bench/seq1d.py`` that nothing here was tuned on), FLOPs budget (``--budgets``) and seed
(``--seeds``), channels pruned, each arm from the same dense model:

* ``uniform``: uniform magnitude pruning (``local`` scope) fine-tuned ``--final-epochs``;
* ``global``: global magnitude pruning, the same;
* ``tpe``, ``random``, ``amc``: ``autoprune search`` with that searcher (``--trials``
  trials; the AMC agent its ``--episodes``, by default its own per-group count), its final
  model as the search saved it (for AMC also its mean reward per quarter of the episodes and
  its best episode's use of the budget);
* ``matched``: uniform pruning fine-tuned for every epoch the TPE search spent (its trials,
  re-runs and final run), as the search reports it (``uniform_matched``).

Printed: test accuracy mean ± std over the seeds per arm, the epochs each arm consumed, and the
paired difference search minus matched uniform (mean ± std over the seeds) with the search's
own verdict. With ``--rank``, every completed trial of the first seed's TPE search is also
re-run at the final length, and the Spearman rank correlation between the trials' validation
accuracy and their final-length validation accuracy is printed: how well trials of
``--epochs`` rank policies. ``--rank-before`` adds the same for a search run as it was before
ranking on signal (a learning rate sampled per trial, ASHA stopping trials after 1 epoch).

Run: ``PYTHONPATH=bench python bench/search_value.py`` (hours on 2 CPU cores); ``--quick``
for a smoke run (one budget, one seed, 4 trials).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _page  # noqa: E402

from autoprune.config import AgentConfig, Budget, EngineConfig, Policy, SearchConfig, TaskConfig  # noqa: E402

TASKS = {"digits": TaskConfig(), "seq1d": TaskConfig(name="seq1d:task")}


def with_lr(trial, table) -> dict:
    """The default space as it was: the fine-tuning learning rate sampled per trial."""
    from autoprune.search_spaces import default

    return {**default(trial, table), "finetune": {"lr": trial.suggest_float("lr", 1e-3, 0.1, log=True)}}


def _fixed(task, dense, metrics, cfg, scope: str, fraction: float, epochs: int) -> dict:
    from autoprune import engine

    policy = Policy(structure="channel", criterion="magnitude", scope=scope)
    policy = Policy.from_dict({**policy.to_dict(), "finetune": {"epochs": epochs}})
    result = engine.run(task, dense, policy, Budget("flops", fraction), cfg, metrics, test=True, measure_latency=False)
    return result.pruned


def _search(args, task_cfg: TaskConfig, fraction: float, seed: int, searcher: str, root: Path, **extra):
    import autoprune

    engine = EngineConfig(task=task_cfg, seed=seed, cache_dir=str(root / "cache"), progress=False)
    name = f"{task_cfg.name.split(':')[0]}-{searcher}-{fraction:g}-{seed}{extra.pop('tag', '')}"
    config = SearchConfig(
        name=name,
        searcher=searcher,
        budget=Budget("flops", fraction),
        trials=args.episodes if searcher == "amc" else args.trials,  # amc: None, its default (per group)
        epochs=None if searcher == "amc" else args.epochs,
        final_epochs=args.final_epochs,
        storage=str(root / "results"),
        tracking_uri=f"sqlite:///{root / 'mlflow.db'}",
        engine=engine,
        agent=AgentConfig(),
        progress=False,
        **extra,
    )
    with contextlib.redirect_stdout(io.StringIO()):
        result = autoprune.run_search(config)
    return result


def _epochs_of(result) -> int:
    return int(sum(r.metrics.get("epoch") or 0 for r in result.trials))


def _spearman(a: list[float], b: list[float]) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


def _rank(args, result, task, dense, metrics, cfg) -> tuple[float, int]:
    """Spearman between the trials' validation accuracy and their final-length re-runs'."""
    from autoprune import engine
    from autoprune.search.verdict import final_policy

    trial_acc, final_acc = [], []
    for rec in result.trials:
        if rec.status != "completed" or rec.metrics.get("val_acc") is None:
            continue
        budget = Budget("flops", rec.budget_fraction or result.summary["budget"]["fraction"])
        run = engine.run(task, dense, final_policy(rec, args.final_epochs), budget, cfg, metrics, measure_latency=False)
        trial_acc.append(rec.metrics["val_acc"])
        final_acc.append(run.pruned["val_acc"])
    return _spearman(trial_acc, final_acc), len(trial_acc)


def _agent(result) -> dict:
    """The AMC agent's learning: mean reward per quarter of its episodes, and how close its
    best episode came to the budget (its FLOPs ratio over the budget fraction)."""
    curve = [r for r in result.summary.get("reward_curve") or [] if r is not None]
    q = max(1, len(curve) // 4)
    quarters = [statistics.mean(curve[i * q : (i + 1) * q]) for i in range(4) if curve[i * q : (i + 1) * q]]
    done = [r for r in result.trials if r.status == "completed" and r.metrics.get("reward") is not None]
    best = max(done, key=lambda r: r.metrics["reward"])
    used = best.metrics["flops_ratio"] / result.summary["budget"]["fraction"]
    return {"episodes": len(curve), "quarters": quarters, "used": used}


def _mean_std(values: list[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.2f}" if values else "-"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def _cell(args, task_name: str, fraction: float, seed: int, root: Path) -> dict:
    """Every arm at one task, budget and seed: test accuracy (points) and epochs per arm."""
    from autoprune import engine
    from autoprune.engine.tasks import get_task

    task_cfg = TASKS[task_name]
    cfg = EngineConfig(task=task_cfg, seed=seed, cache_dir=str(root / "cache"), progress=False)
    task = get_task(task_cfg)
    dense = engine.dense_model(task, cfg, log=lambda _: None)
    metrics = engine.measure_model(dense, task, cfg.measure, test=True, latency=False)
    final_cfg = dataclasses.replace(cfg, train_epochs=args.final_epochs)
    row = {"dense": (100 * metrics["test_acc"], 0)}
    for scope, arm in (("local", "uniform"), ("global", "global")):
        p = _fixed(task, dense, metrics, final_cfg, scope, fraction, args.final_epochs)
        row[arm] = (100 * p["test_acc"], args.final_epochs)
    for searcher in args.searchers:
        t0 = time.perf_counter()
        result = _search(args, task_cfg, fraction, seed, searcher, root)
        best, matched = result.summary["best"], result.summary.get("uniform_matched")
        row[searcher] = (100 * best["test_acc"], matched["epochs"] if matched else _epochs_of(result))
        row[f"{searcher}_s"] = time.perf_counter() - t0
        if matched:
            row[f"{searcher}_matched"] = (100 * matched["test_acc"], matched["epochs"])
            row[f"{searcher}_verdict"] = matched["verdict"]
            row[f"{searcher}_baseline"] = best.get("baseline") or best.get("source") == "uniform_matched"
        if searcher == "amc":
            row["amc_curve"] = _agent(result)
        if args.rank and searcher == "tpe" and seed == args.seeds[0]:
            row["rank"] = _rank(args, result, task, dense, metrics, final_cfg)
            if args.rank_before:
                before = _search(
                    args,
                    task_cfg,
                    fraction,
                    seed,
                    "tpe",
                    root,
                    space="search_value:with_lr",
                    scheduler="asha",
                    tag="-before",
                )
                row["rank_before"] = _rank(args, before, task, dense, metrics, final_cfg)
    return row


def _report(args, task_name: str, fraction: float, cells: list[dict]) -> list[str]:
    """One task and budget: the arms' table and the sentences computed from the seeds' cells."""
    arms = ["dense", "uniform", "global", *args.searchers]
    rows = [[arm, _mean_std([c[arm][0] for c in cells]), str(cells[0][arm][1])] for arm in arms]
    blocks = [
        f"\n### {task_name}, FLOPs budget {fraction:g} ({len(cells)} seed(s))\n",
        _page.table(["arm", "test accuracy (%)", "epochs"], rows, "lrr"),
    ]
    lines = []
    for s in args.searchers:
        if f"{s}_matched" not in cells[0]:
            continue
        matched = [c[f"{s}_matched"][0] for c in cells]
        diffs = [c[s][0] - c[f"{s}_matched"][0] for c in cells]
        baselines = sum(1 for c in cells if c.get(f"{s}_baseline"))
        lines.append(
            f"`{s}` minus uniform at its matched compute ({cells[0][f'{s}_matched'][1]} epochs, "
            f"{_mean_std(matched)}): {_mean_std(diffs)} points; a baseline (or uniform at matched compute) won "
            f"{baselines} of {len(cells)}; wall {statistics.mean(c[f'{s}_s'] for c in cells):.0f} s. Verdicts: "
            + " / ".join(f"“{c[f'{s}_verdict']}”" for c in cells)
        )
    for c in cells:
        if "amc_curve" in c:
            a = c["amc_curve"]
            lines.append(
                f"amc: {a['episodes']} episodes, mean reward per quarter "
                + " → ".join(f"{x:.3f}" for x in a["quarters"])
                + f"; best episode used {100 * a['used']:.1f}% of the budget"
            )
    for key in ("rank", "rank_before"):
        for c in cells:
            if key in c:
                rho, n = c[key]
                lines.append(
                    f"{key.replace('_', ' ')}: Spearman {rho:.2f} between trial and final-length accuracy, n={n}"
                )
    return blocks + ["\n" + "\n".join(f"- {line}" for line in lines)] if lines else blocks


def _protocol(args) -> str:
    searchers = ", ".join(f"`{s}`" for s in args.searchers)
    amc = f"; AMC's episodes: {args.episodes or 'its own default'}" if "amc" in args.searchers else ""
    rank = ""
    if args.rank:
        rank = (
            " Rank: every completed trial of the first seed's TPE search re-run at the final length; Spearman between "
            "the trials' validation accuracy and their final-length validation accuracy."
        )
        if args.rank_before:
            rank += " Rank before: the same for the search as it was (a learning rate sampled per trial, ASHA)."
    return (
        f"Per task ({_page.listing(f'`{t}`' for t in args.tasks)}), FLOPs budget "
        f"({_page.listing(f'{b:g}' for b in args.budgets)}) and seed ({_page.listing(args.seeds)}), channels pruned, "
        "each arm from the same dense model: `uniform` (magnitude, `local` scope) and `global` (magnitude, global "
        f"scope) fine-tuned {args.final_epochs} epochs; {searchers}: `autoprune search` with that searcher "
        f"({args.trials} trials of {args.epochs} epoch(s){amc}, final runs of {args.final_epochs} epochs), its final "
        "model as the search saved it; matched: uniform pruning fine-tuned for every epoch the search spent "
        "(`uniform_matched` in its summary). Test accuracy mean ± std over the seeds; epochs: what each arm "
        f"consumed; the paired difference search minus matched uniform, over the seeds, with the search's verdict.{rank}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.3, 0.15])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--searchers", nargs="+", default=["tpe", "random", "amc"])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--episodes", type=int, default=None, help="AMC's (default: the searcher's own)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--final-epochs", type=int, default=10)
    parser.add_argument("--rank", action="store_true", help="trial-vs-final rank correlation (first seed's TPE)")
    parser.add_argument("--rank-before", action="store_true", help="and for the search as it was before")
    parser.add_argument("--quick", action="store_true", help="digits, one budget, one seed, 4 trials, tpe")
    _page.add_arguments(parser)
    args = parser.parse_args()
    if args.quick:
        args.tasks, args.budgets, args.seeds, args.searchers = ["digits"], [0.3], [0], ["tpe"]
        args.trials, args.episodes, args.epochs, args.final_epochs = 4, 4, 1, 2
    page = _page.Page(__file__, "Is a search worth its cost? Every searcher against uniform pruning", args)
    print(f"machine: {_page.machine()}")
    rows: dict = {}
    with tempfile.TemporaryDirectory(prefix="search-value-") as tmp:
        for task_name in args.tasks:
            for fraction in args.budgets:
                for seed in args.seeds:
                    cell = _cell(args, task_name, fraction, seed, Path(tmp))
                    rows.setdefault((task_name, fraction), []).append(cell)
                    print(f"done: {task_name} {fraction:g} seed {seed}", file=sys.stderr, flush=True)
                page.show(*_report(args, task_name, fraction, rows[(task_name, fraction)]))  # each budget once done
    page.write(_protocol(args))


if __name__ == "__main__":
    main()
