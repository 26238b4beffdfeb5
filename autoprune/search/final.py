"""The end of a search: pick the best trial within budget, re-run it from the dense model for
``final_epochs``, test it once, save it, and log the search run's summary, charts and model."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..config import Budget, Policy
from ..contract import TrialRecord, objectives
from ..errors import AutopruneError
from ..paths import is_uri, join, upload_dir
from .plan import MASKS_NOTE, Plan
from .results import SearchResult, best_within, counts, pareto_front
from .searchers import SEARCHERS


def short_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: metrics[k] for k in ("val_acc", "test_acc", "flops", "params", "latency_ms") if k in metrics}


@dataclass
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
    "val_acc",
    "test_acc",
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
    """:data:`BEST_KEYS` of an engine run's ``pruned`` figures (``latency_ms`` there is measured)."""
    out = {**pruned, "latency_measured_ms": pruned.get("latency_ms")}
    return {k: out[k] for k in BEST_KEYS if out.get(k) is not None}


def finish(f: Finish) -> SearchResult:
    """Pick the best trial, re-run it for ``final_epochs``, test it once, save it and log the
    search run's plots, summary and model."""
    from .. import engine
    from ..engine.checkpoint import architecture_key, reload_flags, save_model
    from ..report import comparison, latency_note, trials_table
    from ..tracking import charts, store
    from ..tracking.note import search_note

    plan, task, dense, dense_metrics, records = f.plan, f.task, f.dense, f.dense_metrics, f.records
    experiment_id, run_id, say = f.experiment_id, f.run_id, f.say
    config = plan.config
    kind = config.budget.kind
    mlflow = store.client(plan.tracking_uri)
    goals = objectives(kind, plan.metric)
    front = pareto_front(records, goals if SEARCHERS.get(config.searcher).multi_objective else goals[:2])
    tally = counts(records)
    summary: dict[str, Any] = {
        "name": plan.name,
        "budget": {"kind": kind, "fraction": config.budget.fraction},
        "searcher": config.searcher,
        "space": config.space,
        "structures": list(plan.structures),
        "metric": plan.metric,
        "scheduler": plan.scheduler,
        "task": task.name,
        "model": task.model_name,
        "trials": tally,
        "dense": short_metrics(dense_metrics),
        "best": None,
        "pareto": [{"trial_id": r.trial_id, **r.metrics, "policy": r.policy} for r in front],
        "mlflow": {"tracking_uri": plan.tracking_uri, "experiment_id": experiment_id, "run_id": run_id},
    }
    if SEARCHERS.get(config.searcher).agent:
        summary["agent"] = dataclasses.asdict(config.agent)
    if f.latency is not None:
        summary["latency_table"] = {
            **{k: f.latency.key[k] for k in ("device", "batch", "threads", "torch")},
            "dense_ms": f.latency.dense_ms,
            "cached": f.latency.cached,
            "build_s": f.latency.build_s,
        }
        summary["latency_tables"] = {
            name: {"node_id": t["node_id"], "dense_ms": t["table"].dense_ms, "cached": t["table"].cached}
            for name, t in (f.tables or {}).items()
        }
    plan.out.mkdir(parents=True, exist_ok=True)
    model_path = final = None
    best = best_within(records, kind, config.budget.fraction, plan.metric)
    if best is not None:
        fields = dict(best.policy)
        fields["finetune"] = {**fields.get("finetune", {}), "epochs": config.final_epochs}
        policy = Policy.from_dict(fields)
        budget = Budget(kind, best.budget_fraction or config.budget.fraction, config.budget.tolerance)
        cfg = dataclasses.replace(config.engine, train_epochs=config.final_epochs)
        say(
            f"best trial {best.trial_id} (val {100 * best.metrics['val_acc']:.2f}%): re-running it for "
            f"{config.final_epochs} epoch(s) and testing it"
        )
        final = engine.run(task, dense, policy, budget, cfg, dense_metrics, test=True, latency=f.latency)
        p = final.pruned
        model_path = plan.out / "model.pt"
        save_model(
            model_path,
            final.model,
            config.engine.task,
            policy.structure,
            final.history,
            policy.to_dict(),
            {k: p.get(k) for k in ("val_acc", "test_acc", "flops", "params")},
            architecture_key(dense),
        )
        policy.to_json(plan.out / "policy.json")
        summary["best"] = {
            "trial_id": best.trial_id,
            "policy": policy.to_dict(),
            "search_val_acc": best.metrics["val_acc"],
            **best_metrics(p),
            "latency_checks": final.latency_checks,
            "ratios": final.ratios,
            "model_path": str(model_path),
        }
        summary["dense"] = short_metrics(final.dense)  # its latency as timed beside the best model
        tags = {store.BEST_TRIAL_ID: best.trial_id}
        if best.run_id:
            tags[store.BEST_RUN_ID] = best.run_id
            mlflow.set_tag(best.run_id, store.BEST, "true")
        numbers = {k: v for k, v in best_metrics(p).items() if isinstance(v, (int, float))}
        store.log(mlflow, run_id, once={f"best_{k}": v for k, v in numbers.items()}, tags=tags)
        mlflow.log_artifact(run_id, str(model_path), "best_model")
        mlflow.log_artifact(run_id, str(plan.out / "policy.json"), "best_model")
        log_best_model(
            plan.tracking_uri, experiment_id, run_id, final.model, task.example_input(2), f"autoprune-{plan.name}"
        )
    summary["wall_time_s"] = time.time() - f.t0
    (plan.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    mlflow.log_artifact(run_id, str(plan.out / "summary.json"))
    if is_uri(plan.path):  # the best model outlives this machine too
        upload_dir(plan.out, join(plan.path, "best"))
    within = sum(
        r.status == "completed" and r.metrics.get(f"{kind}_ratio", 2.0) <= config.budget.fraction + 1e-9
        for r in records
    )
    note = search_note(
        summary,
        final.dense if final else dense_metrics,
        best,
        final.pruned if final else None,
        config.final_epochs,
        experiment_id,
        within,
    )
    store.log(mlflow, run_id, tags={store.NOTE: note})
    charts.ratio_charts(mlflow, records)
    mlflow.log_figure(
        run_id,
        charts.accuracy_vs_cost(
            records,
            dense_metrics,
            [r.trial_id for r in front],
            config.budget.fraction,
            kind,
            flops_panel=SEARCHERS.get(config.searcher).multi_objective,
        ),
        "accuracy_vs_cost.png",
    )
    mlflow.log_figure(run_id, charts.criteria_chart(records, dense_metrics.get("val_acc")), "criteria.png")
    if f.system_metrics is not None:
        f.system_metrics.stop()
    mlflow.set_terminated(run_id, status="FINISHED" if model_path else "FAILED")

    say("")
    say(trials_table(records, kind, plan.metric))
    if model_path is None:
        if tally["completed"]:
            raise AutopruneError(
                f"no completed trial is within --budget-{kind} {config.budget.fraction:g}; "
                f"see {plan.out / 'summary.json'}"
            )
        first = next((r.error for r in records if r.error), "none recorded")
        raise AutopruneError(
            f"no trial completed ({tally['failed']} failed; first error: {first}); see {plan.out / 'summary.json'}"
        )
    say(f"\ndense against the best policy, re-run for {config.final_epochs} epoch(s), timed side by side:")
    say(comparison(final.dense, final.pruned))
    checked = latency_note(final.latency_checks, final.budget)
    if checked:
        say(checked)
    if "unstructured" in plan.structures:
        say(MASKS_NOTE)
    say(f"\nbest model: {model_path}  (autoprune evaluate {model_path}{reload_flags(config.engine.task)})")
    say(f"summary:    {plan.out / 'summary.json'}")
    if is_uri(plan.path):
        say(f"copied to:  {join(plan.path, 'best')}")
    if plan.tracking_uri.startswith(("http://", "https://")):
        say(f"browse the trials: {store.runs_link(experiment_id, server=plan.tracking_uri)}")
    else:
        say(f"browse the trials: autoprune ui{_ui_flag(plan.tracking_uri)}")
        say(f"  then open {store.runs_link(experiment_id)}")
    return SearchResult(
        plan.name,
        summary,
        records,
        front,
        model_path,
        plan.out,
        experiment_id,
        run_id,
        plan.tracking_uri,
        summary["wall_time_s"],
    )


def log_best_model(uri: str, experiment_id: str, run_id: str, model, example, registered_name: str) -> str | None:
    """Log ``model`` as the MLflow model ``best_model`` of the search run (traced on
    ``example``: MLflow's pt2 format) and register it as ``registered_name``, so it is in the
    Models tab and the registry. Returns its ``models:/`` URI, or None (with a warning on
    stderr) when MLflow cannot log it: the search's own model.pt is what it produced."""
    import mlflow
    import mlflow.pytorch
    import torch
    import torchvision
    from mlflow.tracking import fluent

    def pin(module) -> str:
        return f"{module.__name__}=={module.__version__.split('+')[0]}"

    saved_env = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_ID")}
    saved_uri, saved_experiment = mlflow.get_tracking_uri(), getattr(fluent, "_active_experiment_id", None)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            mlflow.set_tracking_uri(uri)
            mlflow.set_experiment(experiment_id=experiment_id)  # else the logged model lands in experiment 0
            info = mlflow.pytorch.log_model(
                copy.deepcopy(model).cpu().eval(),  # traced on the CPU, as the example is
                name="best_model",
                input_example=example.cpu().numpy(),
                registered_model_name=registered_name,
                pip_requirements=[pin(torch), pin(torchvision)],  # inferring them takes seconds
                run_id=run_id,
            )
        return info.model_uri
    except Exception as exc:  # noqa: BLE001 - the model is saved as model.pt whatever MLflow makes of it
        print(
            f"warning: the best model was not logged as an MLflow model ({type(exc).__name__}: {exc})", file=sys.stderr
        )
        return None
    finally:  # the fluent API's state as it was (a Python API caller may use it)
        with contextlib.suppress(Exception):
            mlflow.set_tracking_uri(saved_uri)
            fluent._active_experiment_id = saved_experiment
            for key, value in saved_env.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


def _ui_flag(uri: str) -> str:
    from ..tracking.store import resolve_tracking_uri

    return "" if uri == resolve_tracking_uri(None) else f" --tracking-uri {uri}"
