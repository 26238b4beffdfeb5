"""The end of a search: pick the best trial within budget, re-run it from the dense model for
``final_epochs``, test it once, save it, and log the search run's summary, charts and model."""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import Budget
from ..contract import TrialRecord, objectives, show_metric
from ..errors import AutopruneError
from ..paths import is_uri, join, upload_dir
from ..report import metric_keys
from . import remote
from .best_model import log_best_model
from .plan import MASKS_NOTE, Plan
from .ranking import resolution_points, standard_error
from .results import SearchResult, completed_within, counts, pareto_front
from .searchers import SEARCHERS
from .summary import SearchSummary
from .verdict import against_uniform, choose, final_policy, final_run


def short_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """The task's metrics (``val_acc``, ``test_acc`` ...), FLOPs, parameters and latency of ``metrics``."""
    keys = (*metric_keys(metrics), "flops", "params", "latency_measured_ms")
    return {k: metrics[k] for k in keys if k in metrics}


@dataclass(kw_only=True)
class Finish:
    """What the end of a search works from."""

    plan: Plan
    task: Any
    dense: Any  # the dense model
    dense_metrics: dict[str, Any]
    records: list[TrialRecord]
    experiment_id: str
    run_id: str
    say: Callable[[str], None]
    t0: float  # when the search started (time.time())
    system_metrics: Any = None  # the search run's tracking.store.SystemMetrics, stopped before the run ends
    latency: Any = None  # this machine's engine.LatencyTable for the trials' device (the final run's)
    tables: dict[str, dict] | None = None  # hardware -> {"table", "node_id"}: what the trials predicted with


# the final run's figures summary.json keeps of the best model (latency: the table's prediction
# and the side-by-side timing against the dense model on the idle machine)
BEST_KEYS = (
    "flops",
    "params",
    "flops_ratio",
    "params_ratio",
    "latency_predicted_ms",
    "latency_ratio",
    "predicted_speedup",
    "latency_measured_ms",
    "latency_measured_ratio",
    "speedup",
    "speedup_spread",
    "speedup_by_batch",
    "latency_batch",
)


def best_metrics(pruned: dict[str, Any]) -> dict[str, Any]:
    """The task's metrics and :data:`BEST_KEYS` of an engine run's ``pruned`` figures."""
    return {k: pruned[k] for k in (*metric_keys(pruned), *BEST_KEYS) if pruned.get(k) is not None}


def finish(f: Finish) -> SearchResult:
    """Pick the best trial, re-run it for ``final_epochs``, test it once, save it and log the
    search run's plots, summary and model."""
    from ..tracking import store

    plan, config = f.plan, f.plan.config
    kind = config.budget.kind
    goals = objectives(kind, plan.metric)
    front = pareto_front(f.records, goals if SEARCHERS.get(config.searcher).multi_objective else goals[:2])
    stage = plan.out.parent / f".{plan.out.name}.new-{os.getpid()}"  # written whole, then moved into place
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    try:
        best, reruns = choose(f)
        final = _rerun_best(f, best) if best is not None else None
        extra: dict[str, Any] = {"final_reruns": reruns} if reruns else {}
        if final is not None and config.matched_baseline:
            uniform, matched, kept = against_uniform(f, final, reruns)
            extra.update(matched)
            final = uniform if kept else final  # more fine-tuning of the simplest policy did as well
        if final is not None:
            _save_best(f, best, final, stage, matched=bool(extra.get("uniform_matched", {}).get("returned")))
        model_path = plan.out / "model.pt" if final is not None else None
        summary = build_summary(f, front, best, final, model_path, extra)
        summary.write(stage / "summary.json")
        publish(stage, plan.out)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    _log_search_run(f, summary, front, best, final)
    store.client(plan.tracking_uri).set_terminated(f.run_id, status="FINISHED" if model_path else "FAILED")
    _say_outcome(f, summary, final, model_path, front)
    return SearchResult(
        plan.name,
        summary.to_dict(),
        f.records,
        front,
        model_path,
        plan.out,
        f.experiment_id,
        f.run_id,
        plan.tracking_uri,
        summary.wall_time_s,
    )


def publish(stage: Path, out: Path) -> None:
    """Move the files of ``stage`` into ``out``, each replacing its earlier version at once
    (``summary.json`` last), so that ``out`` holds an earlier best model whole until the new
    one is whole; a file of ``out`` the new results lack (an earlier model) is removed."""
    out.mkdir(parents=True, exist_ok=True)
    new = sorted((p.name for p in stage.iterdir() if p.is_file()), key=lambda name: name == "summary.json")
    for name in new:
        os.replace(stage / name, out / name)
    for old in {"model.pt", "policy.json"} - set(new):
        with contextlib.suppress(FileNotFoundError):
            (out / old).unlink()


def _rerun_best(f: Finish, best: TrialRecord):
    """Re-run the best trial's policy from the dense model for ``final_epochs``, test it once
    and time it beside the dense model (the engine's result)."""
    config = f.plan.config
    policy = final_policy(best, config.final_epochs)
    budget = Budget(config.budget.kind, best.budget_fraction or config.budget.fraction, config.budget.tolerance)
    f.say(
        f"best trial {best.trial_id} ({f.plan.score} {show_metric(f.plan.score, best.metrics.get(f.plan.score))}): "
        f"re-running it for {config.final_epochs} epoch(s) and testing it"
    )
    return final_run(f, policy, budget, config.final_epochs)


def _save_best(f: Finish, best: TrialRecord, final, stage: Path, matched: bool = False) -> None:
    """Save the final model (``model.pt``, ``policy.json``) into ``stage`` and log it to the
    search run, tagging the best trial; ``matched``: the model is the uniform baseline
    fine-tuned for the search's whole compute."""
    from ..engine.checkpoint import architecture_key, save_model
    from ..tracking import store
    from ..tracking.note import version_note

    plan, config, policy, p = f.plan, f.plan.config, final.policy, final.pruned
    model_path = stage / "model.pt"
    save_model(
        model_path,
        final.model,
        config.engine.task,
        policy.structure,
        final.history,
        policy.to_dict(),
        {k: p.get(k) for k in (*metric_keys(p), "flops", "params")},
        architecture_key(f.dense),
    )
    policy.to_json(stage / "policy.json")
    mlflow = store.client(plan.tracking_uri)
    tags = {store.BEST_TRIAL_ID: best.trial_id}
    if best.run_id:
        tags[store.BEST_RUN_ID] = best.run_id
        mlflow.set_tag(best.run_id, store.BEST, "true")
    numbers = {f"best_{k}": v for k, v in best_metrics(p).items() if isinstance(v, (int, float))}
    # the dense latency the search run shows is the one timed beside the best model (summary.json's)
    numbers["dense_latency_measured_ms"] = final.dense.get("latency_measured_ms")
    store.log(mlflow, f.run_id, once=numbers, tags=tags)
    mlflow.log_artifact(f.run_id, str(model_path), "best_model")
    mlflow.log_artifact(f.run_id, str(stage / "policy.json"), "best_model")
    text, version_tags = version_note(plan.name, best, p, final.dense, f.experiment_id, matched)
    log_best_model(
        plan.tracking_uri,
        f.experiment_id,
        f.run_id,
        final.model,
        f.task.example_input(2),
        f"autoprune-{plan.name}",
        f.task.prediction,
        text,
        version_tags,
    )


def build_summary(
    f: Finish, front: list[TrialRecord], best: TrialRecord | None, final, model_path, more: dict | None = None
) -> SearchSummary:
    """The search's :class:`SearchSummary`: the settings that shaped it, the trial counts, the
    dense model, the best trial's re-run (``final``; its dense figures timed beside it), the
    Pareto front and the latency tables the trials predicted with."""
    plan, config = f.plan, f.plan.config
    extra: dict[str, Any] = dict(more or {})
    extra.update(SEARCHERS.get(config.searcher).hooks().summary(config))
    if f.latency is not None:
        extra["latency_table"] = {
            **{k: f.latency.key.get(k) for k in ("device", "batch", "threads", "torch", "runtime")},
            "dense_ms": f.latency.dense_ms,
            "cached": f.latency.cached,
            "build_s": f.latency.build_s,
        }
        extra["latency_tables"] = {
            name: {"node_id": t["node_id"], "dense_ms": t["table"].dense_ms, "cached": t["table"].cached}
            for name, t in (f.tables or {}).items()
        }
    if plan.metric == "reward":  # an agent's learning curve: its reward per episode, in order
        extra["reward_curve"] = [r.metrics.get("reward") for r in sorted(f.records, key=lambda r: r.number)]
    n_val, score = len(f.task.val), plan.score
    extra["task_metric"] = f.task.metric_info()
    extra["ran_on"] = remote.ran_on() or None
    if n_val and score == "val_acc" and f.dense_metrics.get("val_acc") is not None:
        extra["validation"] = {
            "samples": n_val,
            "resolves_points": round(resolution_points(f.dense_metrics["val_acc"], n_val), 3),
        }
    best_fields = None
    if final is not None:
        best_fields = {
            "trial_id": best.trial_id,
            "policy": final.policy.to_dict(),  # the policy the re-run ran
            f"search_{score}": best.metrics.get(score),
            "search_val_se": standard_error(best.metrics[score], n_val) if n_val and score == "val_acc" else None,
            "baseline": best.baseline,  # the baseline it is (uniform, global), or None when sampled
            # what model.pt is: the best trial re-run for final_epochs, or uniform pruning fine-tuned for
            # the search's whole compute, when no trial beat it beyond the validation noise
            "source": "uniform_matched" if (more or {}).get("uniform_matched", {}).get("returned") else "trial",
            **best_metrics(final.pruned),
            "latency_checks": final.latency_checks,
            "ratios": final.ratios,
            "model_path": str(model_path),
        }
    return SearchSummary(
        name=plan.name,
        budget={"kind": config.budget.kind, "fraction": config.budget.fraction},
        searcher=config.searcher,
        space=config.space,
        structures=list(plan.structures),
        metric=plan.metric,
        scheduler=plan.scheduler,
        task=f.task.name,
        model=f.task.model_name,
        trials=counts(f.records),
        # with a best model, the dense latency as timed beside it
        dense=short_metrics(final.dense if final is not None else f.dense_metrics),
        best=best_fields,
        pareto=[{"trial_id": r.trial_id, **r.metrics, "policy": r.policy} for r in front],
        mlflow={"tracking_uri": plan.tracking_uri, "experiment_id": f.experiment_id, "run_id": f.run_id},
        wall_time_s=time.time() - f.t0,
        **extra,
    )


def _log_search_run(f: Finish, summary: SearchSummary, front: list[TrialRecord], best, final) -> None:
    """The search run's summary artifact, charts and description, the experiment's
    description; the best model copied to a bucket ``--storage``; its system metrics stopped."""
    from ..tracking import charts, store
    from ..tracking.note import Outcome, experiment_note, search_note
    from ..tracking.view import describe_experiment

    plan, config = f.plan, f.plan.config
    mlflow = store.client(plan.tracking_uri)
    mlflow.log_artifact(f.run_id, str(plan.out / "summary.json"))
    if is_uri(plan.path):  # the best model outlives this machine too
        upload_dir(plan.out, join(plan.path, "best"))
    charts.ratio_charts(mlflow, f.records)  # on each trial's run
    figures = _charts(f, best)
    for name, figure in figures.items():
        mlflow.log_figure(f.run_id, figure, name)
    within = len(completed_within(f.records, config.budget.kind, config.budget.fraction))
    dense = final.dense if final else f.dense_metrics
    pruned = final.pruned if final else None
    outcome = Outcome(summary.to_dict(), dense, best, pruned, config.final_epochs, f.experiment_id, within)
    store.log(mlflow, f.run_id, tags={store.NOTE: search_note(outcome, plan.epochs, tuple(figures))})
    describe_experiment(mlflow, f.experiment_id, experiment_note(outcome, f.run_id))
    if f.system_metrics is not None:
        f.system_metrics.stop()


def _charts(f: Finish, best: TrialRecord | None) -> dict[str, Any]:
    """The search run's charts by file name, those that have something to show."""
    from ..tracking import charts, study_charts

    plan, config = f.plan, f.plan.config
    dense_score = f.dense_metrics.get(plan.score)
    agent = SEARCHERS.get(config.searcher).agent
    figures = {
        "accuracy_vs_cost.png": charts.accuracy_vs_cost(
            f.records,
            f.dense_metrics,
            budget=config.budget.fraction,
            kind=config.budget.kind,
            flops_panel=SEARCHERS.get(config.searcher).multi_objective,
            score=plan.score,
        ),
        "optimisation_history.png": study_charts.optimisation_history(
            f.records, plan.metric if agent else plan.score, None if agent else dense_score
        ),
        "importance.png": None if agent else study_charts.importance(f.records, plan.score),
        "reward.png": study_charts.reward_chart(f.records, plan.score),
        "criteria.png": charts.criteria_chart(f.records, dense_score, plan.score),
        "group_ratios.png": study_charts.group_ratios(f.records, best.trial_id if best else None),
    }
    return {name: figure for name, figure in figures.items() if figure is not None}


def _say_outcome(f: Finish, summary: SearchSummary, final, model_path, front: list[TrialRecord]) -> None:
    """The trials table (a multi-objective searcher's: its Pareto ``front``) and dense against
    the best model in the terminal, with where the results are; an :class:`AutopruneError`
    when no trial gave a model."""
    from ..engine.checkpoint import reload_flags
    from ..report import comparison, latency_note, trials_table
    from ..tracking.view import runs_link

    plan, config, say = f.plan, f.plan.config, f.say
    kind = config.budget.kind
    summary_path = plan.out / "summary.json"
    say("")
    pareto = [r.trial_id for r in front] if SEARCHERS.get(config.searcher).multi_objective else None
    say(trials_table(f.records, kind, plan.metric, score=plan.score, front=pareto))
    if model_path is None:
        if summary.trials["completed"]:
            raise AutopruneError(
                f"no completed trial is within --budget-{kind} {config.budget.fraction:g}; see {summary_path}"
            )
        first = next((r.error for r in f.records if r.error), "none recorded")
        raise AutopruneError(
            f"no trial completed ({summary.trials['failed']} failed; first error: {first}); see {summary_path}"
        )
    what = (
        f"uniform pruning fine-tuned for {summary.uniform_matched['epochs']} epochs"
        if summary.best and summary.best["source"] == "uniform_matched"
        else f"the best policy, re-run for {config.final_epochs} epoch(s)"
    )
    say(f"\ndense against {what}, timed side by side:")
    say(comparison(final.dense, final.pruned))
    if summary.best and summary.best.get("baseline"):
        say(
            f"the best policy is the {summary.best['baseline']} baseline itself: no sampled policy beat it "
            + ("by more than the validation split's noise" if plan.score == "val_acc" else "on the validation split")
        )
    if summary.uniform_matched:
        u = summary.uniform_matched
        test = plan.score.replace("val_", "test_", 1)
        say(f"{u['verdict']} (uniform: {test.replace('_', ' ')} {show_metric(test, u.get(test))})")
    checked = latency_note(final.latency_checks, final.budget)
    if checked:
        say(checked)
    if "unstructured" in plan.structures:
        say(MASKS_NOTE)
    say(f"\nbest model: {model_path}  (autoprune evaluate {model_path}{reload_flags(config.engine.task)})")
    say(f"summary:    {summary_path}")
    if is_uri(plan.path):
        say(f"copied to:  {join(plan.path, 'best')}")
    if plan.tracking_uri.startswith(("http://", "https://")):
        say(f"browse the trials: {runs_link(f.experiment_id, server=plan.tracking_uri)}")
    else:
        say(f"browse the trials: autoprune ui{_ui_flag(plan.tracking_uri)}")
        say(f"  then open {runs_link(f.experiment_id)}")


def _ui_flag(uri: str) -> str:
    from ..tracking.store import resolve_tracking_uri

    return "" if uri == resolve_tracking_uri(None) else f" --tracking-uri {uri}"
