"""The search run's description in the MLflow UI (the ``mlflow.note.content`` tag, markdown):
which trial won and why, dense against the best model, the budget, the searcher and how the
trials ended, with a link to the best trial's run."""

from __future__ import annotations

from typing import Any

from ..contract import TrialRecord, show_metric, task_metric_keys
from ..report import fmt_count, metric_difference, metric_keys, metric_label


def _ratio(dense: float | None, best: float | None) -> str:
    return f"{best / dense:.3f}x" if dense and best is not None else ""


def run_link(experiment_id: str, run_id: str) -> str:
    """A link to a run, relative to the UI (works inside a note)."""
    return f"#/experiments/{experiment_id}/runs/{run_id}"


def search_note(
    summary: dict[str, Any],
    dense: dict[str, Any],
    best: TrialRecord | None,
    pruned: dict[str, Any] | None,
    final_epochs: int,
    experiment_id: str,
    within_budget: int,
) -> str:
    """The markdown description of a search run. ``summary``: what summary.json holds (name,
    budget, searcher, space, scheduler, trials); ``dense``: the dense model's metrics;
    ``best``: the trial picked (None: none was); ``pruned``: its re-run's metrics;
    ``within_budget``: how many completed trials met the budget."""
    budget, tally = summary["budget"], summary["trials"]
    kind = "FLOPs" if budget["kind"] == "flops" else "parameters"
    lines = [f"## autoprune search `{summary['name']}`", ""]
    if best is None or pruned is None:
        lines.append(
            f"**No trial was picked**: {tally['completed']} completed, none within the budget."
            if tally["completed"]
            else "**No trial was picked**: no trial completed."
        )
    else:
        name = f"[{best.label}]({run_link(experiment_id, best.run_id)})" if best.run_id else best.label
        what = f"the uniform-pruning baseline ({best.baseline})" if best.baseline else "sampled"
        lines.append(
            f"**Best: {name}** (Ray trial `{best.trial_id}`, {what}): "
            f"{_score_phrase(best.metrics)} after the search's epochs, chosen among "
            f"the {within_budget} completed trial(s) within the budget (trials within the validation split's "
            "noise of the best are ties, given to the simpler policy; the top ones re-run at the final length); "
            f"it was then re-run from the dense model for {final_epochs} epoch(s) and tested once (the table)."
        )
        matched = summary.get("uniform_matched")
        if matched:
            lines += ["", f"**{matched['verdict'][0].upper()}{matched['verdict'][1:]}.**"]
    lines += [
        "",
        f"- **budget**: {kind} at most {budget['fraction']:g} of dense",
        f"- **searcher**: {summary['searcher']} on space `{summary['space']}`, scheduler {summary['scheduler']}",
        f"- **trials**: {tally['total']}: {tally['completed']} completed, {tally['stopped_early']} stopped early "
        f"by the scheduler, {tally['failed']} failed",
        f"- **task**: {summary.get('task', '?')} ({summary.get('model', '?')})",
    ]
    if best is not None and pruned is not None:
        rows = _rows(dense, pruned)
        lines += ["", "| | dense | best | best / dense |", "|---|---:|---:|---:|"]
        lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    lines += ["", "Charts: `accuracy_vs_cost.png`, `criteria.png`; the model: `best_model/` and the Models tab."]
    return "\n".join(lines) + "\n"


def _rows(dense: dict[str, Any], pruned: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """The description's table: dense against the best model."""
    d_lat, p_lat = dense.get("latency_measured_ms"), pruned.get("latency_measured_ms")
    return [
        *(
            (_long(k), show_metric(k, dense.get(k)), show_metric(k, pruned.get(k)), _diff(dense, pruned, k))
            for k in metric_keys({**dense, **pruned})
        ),
        *(
            (name, fmt_count(dense.get(key)), fmt_count(pruned.get(key)), _ratio(dense.get(key), pruned.get(key)))
            for name, key in (("FLOPs", "flops"), ("params", "params"))
        ),
        (
            "latency, timed side by side",
            "-" if d_lat is None else f"{d_lat:.3f} ms",
            "-" if p_lat is None else f"{p_lat:.3f} ms",
            _ratio(d_lat, p_lat),
        ),
        ("speed-up", "1.00x", "-" if pruned.get("speedup") is None else f"{pruned['speedup']:.2f}x", ""),
    ]


def _diff(dense: dict[str, Any], pruned: dict[str, Any], key: str) -> str:
    return metric_difference(key, dense.get(key), pruned.get(key))


def _score_phrase(metrics: dict[str, Any]) -> str:
    """``val accuracy 98.52%``: the task's validation metric of a trial."""
    keys = task_metric_keys(metrics)
    return f"{_long(keys[0])} {show_metric(keys[0], metrics[keys[0]])}" if keys else "no validation metric"


def _long(key: str) -> str:
    """``val_acc`` -> ``validation accuracy``."""
    return metric_label(key).replace("val ", "validation ", 1)
