"""How the end of a search decides, and what it says the search was worth.

Trials are short; the saved model is fine-tuned for ``final_epochs``. A policy that leads
after a few epochs need not lead after many, so the top trials (``--final-top-k``) are re-run
at the final length from the dense model, on as many seeds as the trials' compute pays for
(``--final-seeds``), and the winner is picked on those runs (ties within the validation
split's noise going to the simpler policy, :mod:`.ranking`). Then the uniform
baseline is fine-tuned for as many epochs as the whole search spent (its trials, these
re-runs and the final run), and the winner's test accuracy is set against it: more tuning is
only worth it if it beats more fine-tuning of the simplest policy.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from ..config import Budget, Policy
from ..contract import TrialRecord, better, metric_mode, show_metric
from . import remote
from .baselines import BASELINES, UNIFORM
from .ranking import TIE_SE, standard_error, tied
from .results import best_within, completed_within


def top_trials(records: list[TrialRecord], kind: str, fraction: float, metric: str, k: int) -> list[TrialRecord]:
    """The ``k`` best completed trials within budget by ``metric`` (best first)."""
    from ..contract import metric_mode

    done = completed_within(records, kind, fraction, metric)
    sign = -1.0 if metric_mode(metric) == "max" else 1.0
    return sorted(done, key=lambda r: (sign * r.metrics[metric], r.number))[:k]


def rerun_seeds(records: list[TrialRecord], candidates: int, final_epochs: int, most: int = 3) -> int:
    """How many seeds each final-length re-run averages over when ``--final-seeds`` is not
    set: as many (up to ``most``) as keep the re-runs' epochs within the trials' own."""
    per_seed = max(1, candidates * final_epochs)
    return max(1, min(most, trial_epochs(records) // per_seed))


def trial_epochs(records: list[TrialRecord]) -> int:
    """The fine-tuning epochs the trials themselves ran."""
    return int(sum(r.metrics.get("epoch") or 0 for r in records))


def rerun_at_final_length(f, candidates: list[TrialRecord], seeds: int = 1) -> list[TrialRecord]:
    """Each candidate's policy re-run from the dense model for ``final_epochs`` on ``seeds``
    seeds (validation only; no timing), as a record with the runs' mean figures in place of the
    trial's."""
    from .. import engine

    config = f.plan.config
    cfg = dataclasses.replace(config.engine, train_epochs=config.final_epochs)
    out = []
    for rec in candidates:
        budget = Budget(config.budget.kind, rec.budget_fraction or config.budget.fraction, config.budget.tolerance)
        runs = []
        for s in range(seeds):
            result = remote.call(
                f.plan,
                "final",
                engine.run,
                f.task,
                f.dense,
                final_policy(rec, config.final_epochs),
                budget,
                dataclasses.replace(cfg, seed=cfg.seed + s),
                f.dense_metrics,
                latency=f.latency,
                measure_latency=False,
            )
            runs.append({k: v for k, v in result.pruned.items() if isinstance(v, (int, float))})
        mean = {k: sum(r[k] for r in runs) / len(runs) for k in runs[0] if all(k in r for r in runs)}
        out.append(dataclasses.replace(rec, metrics={**rec.metrics, **mean}))
        key = f.plan.score
        each = ", ".join(show_metric(key, r[key]) for r in runs)
        f.say(
            f"  {rec.label}: {key} {show_metric(key, rec.metrics.get(key))} after {rec.metrics.get('epoch', 0)} "
            f"epoch(s), {show_metric(key, mean[key])} after {config.final_epochs}"
            + (f" (seeds: {each})" if seeds > 1 else "")
        )
    return out


def search_epochs(records: list[TrialRecord], reruns: int, final_epochs: int) -> int:
    """The fine-tuning epochs a search spent: every trial's, the final-length re-runs' and the
    final run's."""
    return trial_epochs(records) + (reruns + 1) * final_epochs


def matched_uniform(f, epochs: int, structure: str):
    """The uniform baseline fine-tuned for ``epochs`` (the search's whole compute), tested and
    timed beside the dense model (the engine's result: it may become the search's model)."""
    policy = Policy.from_dict({**BASELINES[UNIFORM], "structure": structure, "finetune": {"epochs": epochs}})
    return final_run(f, policy, f.plan.config.budget, epochs)


def final_run(f, policy: Policy, budget: Budget, epochs: int):
    """``policy`` run from the dense model for ``epochs`` to ``budget``, tested once and timed
    beside the dense model, where the trials ran (the engine's result)."""
    from .. import engine

    cfg = dataclasses.replace(f.plan.config.engine, train_epochs=epochs)
    args = (f.task, f.dense, policy, budget, cfg, f.dense_metrics)
    if remote.on_cluster(f.plan):  # the driver's printing does not travel: say it here
        f.say("then timed beside the dense model on that node ...")
        return remote.call(f.plan, "final", engine.run, *args, test=True, latency=f.latency)
    return remote.call(f.plan, "final", engine.run, *args, test=True, latency=f.latency, log=f.say)


def gain(best_test: float, uniform_test: float, n_test: int, key: str = "test_acc") -> dict[str, Any]:
    """The winner's test metric against the matched-compute uniform baseline's: the
    improvement (accuracy: points, with its standard error, and whether it is beyond the
    noise; another metric: in its own units, positive when better, ``se_points`` None: no
    noise model, so any difference counts)."""
    if key != "test_acc":
        diff = best_test - uniform_test if metric_mode(key) == "max" else uniform_test - best_test
        return {"points": round(diff, 6), "se_points": None, "beyond_noise": diff != 0, "metric": key}
    points = 100.0 * (best_test - uniform_test)
    se = 100.0 * math.hypot(standard_error(best_test, n_test), standard_error(uniform_test, n_test))
    return {"points": round(points, 3), "se_points": round(se, 3), "beyond_noise": abs(points) >= TIE_SE * se}


def tied_on(key: str, a: float, b: float, n: int) -> bool:
    """Whether two validation figures of ``key`` are within the split's noise: accuracy's
    binomial noise (:func:`.ranking.tied`); another metric has no noise model, only equality ties."""
    return tied(a, b, n) if key == "val_acc" else a == b


def _figure(g: dict[str, Any]) -> str:
    if g.get("se_points") is None:
        return f"{g['points']:+.4g} {g.get('metric', '').replace('_', ' ')}".rstrip()
    return f"{g['points']:+.1f} ± {g['se_points']:.1f} points"


def gain_sentence(g: dict[str, Any], epochs: int) -> str:
    """One line for the terminal, the summary and the MLflow description."""
    figure = _figure(g)
    if g["beyond_noise"] and g["points"] > 0:
        return f"search gained {figure} over uniform pruning at matched compute ({epochs} epochs)"
    if g["beyond_noise"]:
        return f"search lost {figure} against uniform pruning at matched compute ({epochs} epochs)"
    return f"no gain over uniform pruning at matched compute ({epochs} epochs): {figure}, within the noise"


def final_policy(best: TrialRecord, final_epochs: int) -> Policy:
    """The best trial's policy, fine-tuned for ``final_epochs``: what the final run re-runs."""
    return Policy.from_dict({**best.policy, "finetune": {**best.policy.get("finetune", {}), "epochs": final_epochs}})


def choose(f) -> tuple[TrialRecord | None, dict[str, Any] | None]:
    """The best trial within budget (ties within the validation noise to the simpler policy),
    chosen among the top ``final_top_k`` re-run at the final length when they are several;
    with the re-runs (summary.json's ``final_reruns``; None when there were none)."""
    plan, config = f.plan, f.plan.config
    kind, n_val = config.budget.kind, len(f.task.val)
    best = best_within(f.records, kind, config.budget.fraction, plan.metric, n_val=n_val)
    if best is None or plan.metric != plan.score or config.final_top_k < 2 or config.final_epochs < 1:
        return best, None
    top = top_trials(f.records, kind, config.budget.fraction, plan.metric, config.final_top_k)
    top += [r for r in f.records if r in (best, *_uniform(f.records, kind, config.budget.fraction)) and r not in top]
    if len(top) < 2:
        return best, None
    seeds = config.final_seeds or rerun_seeds(f.records, len(top), config.final_epochs)
    on = f" on {seeds} seeds" if seeds > 1 else ""
    f.say(f"re-running the top {len(top)} trials for {config.final_epochs} epoch(s){on} to choose the best:")
    reran = rerun_at_final_length(f, top, seeds)
    chosen = best_within(reran, kind, config.budget.fraction + 1.0, plan.metric, n_val=n_val)  # all were in budget
    score = plan.score
    runs = {"epochs": config.final_epochs, "seeds": seeds, score: {r.trial_id: r.metrics[score] for r in reran}}
    return next(r for r in top if r.trial_id == chosen.trial_id), runs


def reruns_of(runs: dict[str, Any] | None) -> int:
    """How many final-length runs :func:`choose` made (its candidates times their seeds)."""
    if not runs:
        return 0
    return len(next(v for v in runs.values() if isinstance(v, dict))) * runs["seeds"]


def _uniform(records: list[TrialRecord], kind: str, fraction: float) -> list[TrialRecord]:
    return [r for r in completed_within(records, kind, fraction) if r.baseline == UNIFORM]


def against_uniform(f, final, reruns: dict[str, Any] | None) -> tuple[Any, dict[str, Any], bool]:
    """The uniform baseline fine-tuned for the search's whole compute, against the best
    trial's final run on validation accuracy: (its engine result, summary.json's
    ``uniform_matched``, whether it is returned instead). It is, unless the best trial beat
    it by more than the validation noise: a search never returns less than the simplest
    policy given the same compute."""
    config = f.plan.config
    epochs = search_epochs(f.records, reruns_of(reruns), config.final_epochs)
    f.say(f"fine-tuning uniform pruning for {epochs} epochs, the search's whole compute, to compare:")
    uniform = matched_uniform(f, epochs, final.policy.structure)
    u, w = uniform.pruned, final.pruned
    val, test = f.plan.score, f.plan.score.replace("val_", "test_", 1)
    returned = not (better(val, w[val], u[val]) and not tied_on(val, w[val], u[val], len(f.task.val)))
    g = gain(w[test], u[test], len(f.task.test), test)
    figures = {k: u[k] for k in (val, test, f"{config.budget.kind}_ratio") if u.get(k) is not None}
    verdict = gain_sentence(g, epochs)
    if returned:
        verdict = (
            f"no policy beat uniform pruning fine-tuned for {epochs} epochs (the search's whole compute) "
            f"{'beyond the validation noise' if val == 'val_acc' else 'on the validation split'}: it is the search's model (the best trial re-run for {config.final_epochs} "
            f"epoch(s): {_figure(g)} against it)"
        )
        g = {**g, "points": 0.0, "beyond_noise": False, "best_trial_points": g["points"]}
    matched = {"policy": uniform.policy.to_dict(), "epochs": epochs, **figures, "gain": g, "verdict": verdict}
    return uniform, {"uniform_matched": {**matched, "returned": returned}}, returned


def epochs_after_trials(plan) -> int:
    """The fine-tuning epochs the driver runs once the trials are done, as :func:`choose` and
    :func:`against_uniform` will decide them (for the progress line's estimate): the top
    trials and the uniform baseline re-run at the final length (on the seeds
    :func:`rerun_seeds` would pick), the best's final run, and uniform pruning fine-tuned for
    the search's whole compute. 0 for trials that do not train (an estimate per epoch of
    theirs would mean nothing)."""
    config, final = plan.config, plan.config.final_epochs
    trials = plan.trials * plan.epochs
    if not trials:
        return 0
    reruns = 0
    if plan.metric == plan.score and config.final_top_k >= 2 and final >= 1:
        candidates = config.final_top_k + 1
        reruns = candidates * (config.final_seeds or max(1, min(3, trials // max(1, candidates * final))))
    after = (reruns + 1) * final
    return after + (trials + after if config.matched_baseline else 0)
