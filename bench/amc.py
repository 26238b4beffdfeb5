"""AMC against simpler allocations on the default task (digits), at several FLOPs budgets.

What is compared, per FLOPs budget (``--budgets``: 0.5, 0.3, 0.2, 0.1) and seed (``--seeds``:
0, 1, 2), all with the magnitude criterion choosing which channels go inside a group, and every
candidate scored the same way (AMC's protocol: the pruned network, its BN statistics
recalibrated on 8 training batches, validation accuracy, no fine-tuning):

* ``amc``: the AMC searcher (:class:`autoprune.agents.searcher.AMCSearch`: DDPG with AMC's
  settings, the legal-action clip, reward ``acc``), ``--episodes`` episodes (60), a quarter
  of them warm-up;
* ``uniform``: one run of the ``local`` scope (every group loses the same share, scaled to the
  budget), no search;
* ``random``: the same searcher with every episode a warm-up episode: uniform random actions
  through the same clip, the same number of episodes;
* ``tpe``: Optuna TPE over the ``default`` space restricted to channels (criterion, scope,
  per-group ratios, ... as ``autoprune search`` samples them), the same number of trials, each
  candidate pruned to the budget by the solver and scored as above (``bn_recalibrate`` set,
  0 fine-tuning epochs).

The searchers run in this process through Ray Tune's ``Searcher`` interface
(``suggest`` / ``on_trial_complete``), one candidate at a time, without Ray: the comparison is
of the algorithms, not of the cluster. Each method's best candidate (highest recalibrated
validation accuracy) is then reported as

* ``no-ft``: test accuracy after BN recalibration, without fine-tuning;
* ``ft``: test accuracy after ``--finetune-epochs`` (5) of fine-tuning from the dense model
  (SGD, lr 0.01, cosine: the policy's defaults), the same for every method;

mean ± std over the seeds, and the search's wall time (mean). Finally, over the episodes of one
AMC run (the first budget and seed given to ``--spearman``, default 0.3 / 0), every episode's
allocation is also fine-tuned for ``--finetune-epochs`` and the Spearman rank correlation
between the recalibrated accuracy and the fine-tuned validation accuracy is printed (EagleEye's
claim that the first predicts the second).

Run: ``python bench/amc.py`` (about 20 minutes on 2 CPU cores); ``--quick`` for a smoke run.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import _page
import numpy as np
import torch

from autoprune import engine
from autoprune.config import AgentConfig, Budget, EngineConfig, Policy
from autoprune.engine.allocation import allocation_space
from autoprune.engine.layers import layer_table
from autoprune.engine.tasks import get_task
from autoprune.rayenv import quiet_environment
from autoprune.search.searchers import SEARCHERS, SearcherContext

RECALIBRATE = AgentConfig().recalibrate_batches


def _score(task, dense, dense_metrics, cfg, fields: dict, budget: Budget, test: bool = False, epochs: int = 0) -> dict:
    """One candidate pruned, BN recalibrated and, for ``epochs``, fine-tuned: as every method's
    trials score it with ``epochs`` 0."""
    fields = {**fields, "finetune": {**fields.get("finetune", {}), "epochs": epochs, "bn_recalibrate": RECALIBRATE}}
    result = engine.run(task, dense, Policy.from_dict(fields), budget, cfg, dense_metrics, test, measure_latency=False)
    return result.pruned


def _search(method: str, ctx: SearcherContext, evaluate, episodes: int) -> list[tuple[dict, dict]]:
    """Run ``method``'s searcher for ``episodes`` candidates; (policy fields, scores) of each."""
    if method == "random":  # every episode a warm-up episode: random actions
        ctx = dataclasses.replace(ctx, extra={**ctx.extra, "agent": AgentConfig(warmup_episodes=episodes)})
    searcher = SEARCHERS.get("amc" if method in ("amc", "random") else "tpe").make(ctx)
    out = []
    for i in range(episodes):
        config = searcher.suggest(f"t{i}")
        fields = dict(config["policy"])
        if method == "tpe":
            fields["structure"] = "channel"
        try:
            scores = evaluate(fields, config.get("budget_fraction"))
        except Exception as exc:  # noqa: BLE001 - a candidate the engine refuses counts as failed
            print(f"    {method} candidate {i} failed: {exc}")
            searcher.on_trial_complete(f"t{i}", None, error=True)
            continue
        report = {"val_acc": scores["val_acc"], "reward": scores["val_acc"], "recal_acc": scores["val_acc"]}
        searcher.on_trial_complete(f"t{i}", {**report, "final": True, "epoch": 0})
        out.append((fields, scores))
    return out


METHODS = ("amc", "uniform", "random", "tpe")


def _one(method: str, fraction: float, seed: int, env: dict, args) -> tuple[tuple, list]:
    """One method's search at one budget and seed: (test acc no-ft, ft, wall s, FLOPs ratio), its history."""
    task, dense, dense_metrics = env["task"], env["dense"], env["metrics"]
    budget, seeded = Budget("flops", fraction), EngineConfig(progress=False, seed=seed)
    t0 = time.perf_counter()
    if method == "uniform":
        best_fields = {"structure": "channel", "criterion": "magnitude", "scope": "local"}
        history = [(best_fields, _score(task, dense, dense_metrics, seeded, best_fields, budget))]
    else:

        def evaluate(fields, sub_fraction):
            b = Budget("flops", sub_fraction) if sub_fraction else budget
            return _score(task, dense, dense_metrics, seeded, fields, b)

        extra = {"allocation": env["space"], "agent": AgentConfig()}
        ctx = SearcherContext(table=env["table"], budget=budget, seed=seed, trials=args.episodes, extra=extra)
        history = _search(method, ctx, evaluate, args.episodes)
        best_fields = max(history, key=lambda h: h[1]["val_acc"])[0]
    wall = time.perf_counter() - t0
    no_ft = _score(task, dense, dense_metrics, seeded, best_fields, budget, test=True)
    ft = _score(task, dense, dense_metrics, seeded, best_fields, budget, True, args.finetune_epochs)
    print(
        f"  budget {fraction:g} seed {seed} {method:8s} flops {no_ft['flops_ratio']:.3f} "
        f"no-ft {100 * no_ft['test_acc']:.2f}% ft {100 * ft['test_acc']:.2f}% search {wall:.1f}s",
        flush=True,
    )
    return (no_ft["test_acc"], ft["test_acc"], wall, no_ft["flops_ratio"]), history


def _spearman(env: dict, args, fraction: float, seed: int, history: list) -> str:
    """The Spearman sentence over the episodes of one AMC run."""
    from scipy.stats import spearmanr

    budget, seeded = Budget("flops", fraction), EngineConfig(progress=False, seed=seed)
    recal, tuned = [], []
    for fields, scores in history:
        recal.append(scores["val_acc"])
        run = _score(env["task"], env["dense"], env["metrics"], seeded, fields, budget, True, args.finetune_epochs)
        tuned.append(run["val_acc"])
    rho, p = spearmanr(recal, tuned)
    return (
        f"Spearman (recalibrated val acc, no fine-tuning) vs (val acc after {args.finetune_epochs} epochs) over "
        f"the {len(history)} episodes of AMC at {fraction:g} FLOPs, seed {seed}: rho {rho:.3f} "
        f"(p {p:.2g}); recalibrated {100 * min(recal):.1f}-{100 * max(recal):.1f}%, "
        f"fine-tuned {100 * min(tuned):.1f}-{100 * max(tuned):.1f}%."
    )


def _protocol(args, env: dict) -> str:
    task, m = env["task"], env["metrics"]
    return (
        f"Task digits ({task.model_name}; dense validation accuracy {100 * m['val_acc']:.2f}%, test "
        f"{100 * m['test_acc']:.2f}%), {len(env['space'].groups)} channel groups, one torch thread. Per FLOPs "
        f"budget ({_page.listing(f'{b:g}' for b in args.budgets)}) and seed ({_page.listing(args.seeds)}), every "
        "method prunes channels with the magnitude criterion inside a group: `amc` (the DDPG searcher with AMC's "
        f"settings, {args.episodes} episodes, a quarter of them warm-up), `uniform` (the `local` scope, no search), "
        f"`random` (the same searcher, all {args.episodes} episodes warm-up: random actions through the same clip) "
        f"and `tpe` (Optuna TPE over the `default` space restricted to channels, {args.episodes} trials). Every "
        f"candidate is scored by its validation accuracy after BN recalibration on {RECALIBRATE} training batches, "
        "without fine-tuning; the searchers run in this process through Ray Tune's `Searcher` interface, without "
        "Ray. Each method's best candidate is reported by its test accuracy without fine-tuning (no-ft) and after "
        f"{args.finetune_epochs} epoch(s) of fine-tuning from the dense model (ft), mean ± std over the seeds, with "
        f"the search's mean wall time; FLOPs: the largest ratio over the seeds. Spearman over the episodes of the "
        f"AMC run at budget {args.spearman[0]:g}, seed {args.spearman[1]:g}: each episode's allocation fine-tuned "
        f"{args.finetune_epochs} epoch(s)."
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.5, 0.3, 0.2, 0.1])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--episodes", type=int, default=60)
    parser.add_argument("--finetune-epochs", type=int, default=5)
    parser.add_argument("--spearman", type=float, nargs=2, default=[0.3, 0], metavar=("BUDGET", "SEED"))
    parser.add_argument("--quick", action="store_true", help="one budget, one seed, 8 episodes, 1 epoch")
    _page.add_arguments(parser)
    args = parser.parse_args()
    if args.quick:
        args.budgets, args.seeds, args.episodes, args.finetune_epochs = [0.3], [0], 8, 1
        args.spearman = [0.3, 0]
    page = _page.Page(__file__, "AMC against simpler allocations on the default task", args)
    quiet_environment()
    torch.set_num_threads(1)
    cfg = EngineConfig(progress=False)
    task = get_task(cfg.task)
    dense = engine.dense_model(task, cfg, log=lambda s: None)
    env = {"task": task, "dense": dense, "metrics": engine.measure_model(dense, task, cfg.measure, test=True)}
    env["table"] = layer_table(task, ("channel",))
    env["space"] = allocation_space(dense, task.example_input(), Policy().max_ratio)
    print(f"machine: {_page.machine()}")
    print(_protocol(args, env))
    rows, spearman_run = [], None
    for fraction in args.budgets:
        results: dict[str, list] = {m: [] for m in METHODS}
        for seed in args.seeds:
            for method in METHODS:
                got, history = _one(method, fraction, seed, env, args)
                results[method].append(got)
                if method == "amc" and [fraction, seed] == args.spearman:
                    spearman_run = (fraction, seed, history)
        for method in METHODS:
            no_ft, ft, wall, flops = zip(*results[method])
            rows.append(
                (f"{fraction:g}", method, f"{max(flops):.3f}", _pm(no_ft), _pm(ft), f"{statistics.mean(wall):.1f}")
            )
    head = ["budget", "method", "FLOPs ratio", "no-ft test acc", "ft test acc", "search s"]
    page.show("", _page.table(head, rows, "llrrrr"))
    if spearman_run is not None:
        page.show("", _spearman(env, args, *spearman_run))
    page.write(_protocol(args, env))


def _pm(values) -> str:
    return _page.pm(values, 2, 100) + "%"


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
