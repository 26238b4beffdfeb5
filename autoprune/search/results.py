"""What a search produced: its trials as it recorded them, the best trial within budget, the
Pareto front and the counts."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..contract import TrialRecord, metric_mode


@dataclass
class SearchResult:
    """What a search produced; ``summary`` is what ``summary.json`` holds."""

    name: str
    summary: dict[str, Any]
    trials: list[TrialRecord]  # every trial, in the order they started
    pareto: list[TrialRecord]  # the non-dominated completed trials
    best_model_path: Path | None
    out: Path
    experiment_id: str
    run_id: str
    tracking_uri: str
    wall_time_s: float = 0.0


def pareto_front(records: list[TrialRecord], goals: tuple[tuple[str, str], ...]) -> list[TrialRecord]:
    """Completed trials that no other completed trial dominates (at least as good in every
    objective, strictly better in one)."""
    done = [r for r in records if r.status == "completed"]

    def vec(r: TrialRecord) -> list[float]:
        return [r.metrics[k] if d == "min" else -r.metrics[k] for k, d in goals]

    vecs = [vec(r) for r in done]
    front = []
    for i, v in enumerate(vecs):
        dominated = any(
            all(a <= b for a, b in zip(w, v)) and any(a < b for a, b in zip(w, v)) for j, w in enumerate(vecs) if j != i
        )
        if not dominated:
            front.append(done[i])
    return front


def completed_within(
    records: list[TrialRecord], kind: str, fraction: float, metric: str | None = None
) -> list[TrialRecord]:
    """The completed trials within the budget (``kind`` at most ``fraction`` of dense) that
    reported ``metric`` (any, when None), in their order."""
    return [
        r
        for r in records
        if r.status == "completed"
        and r.metrics.get(f"{kind}_ratio", math.inf) <= fraction + 1e-9
        and (metric is None or r.metrics.get(metric) is not None)
    ]


def best_within(
    records: list[TrialRecord], kind: str, fraction: float, metric: str = "val_acc", n_val: int | None = None
) -> TrialRecord | None:
    """The completed trial within budget with the best ``metric`` (highest validation
    accuracy, or lowest validation loss); ties go to the lower predicted latency, then the
    lower cost, then the earlier trial. With ``n_val`` (the validation split's size) and
    accuracy as the metric, trials within the noise of the best (:func:`.ranking.tied`) are
    ties too, and go to the simplest policy among them (:func:`.ranking.simplicity`)."""
    from .ranking import simplicity, tied

    done = completed_within(records, kind, fraction, metric)
    if not done:
        return None
    sign = 1.0 if metric_mode(metric) == "max" else -1.0

    def order(r: TrialRecord) -> tuple:
        return (
            sign * r.metrics[metric],
            -r.metrics.get("latency_predicted_ms", math.inf),
            -r.metrics[f"{kind}_ratio"],
            -r.number,
        )

    best = max(done, key=order)
    if metric != "val_acc" or not n_val:
        return best
    level = [r for r in done if tied(r.metrics[metric], best.metrics[metric], n_val)]
    return max(level, key=lambda r: (-simplicity(r.policy), *order(r)))


def counts(records: list[TrialRecord]) -> dict[str, int]:
    return {
        "total": len(records),
        "completed": sum(r.status == "completed" for r in records),
        "stopped_early": sum(r.status == "stopped" for r in records),
        "failed": sum(r.status == "failed" for r in records),
    }


def read_records(path: str, runs: dict[str, Any]) -> list[TrialRecord]:
    """Every trial recorded in the search folder ``path`` (:mod:`.journal`), with its MLflow
    child run (``runs``: trial id -> run), in the order the trials started (their runs'
    numbers, ``#7``, continued across a resume)."""
    from . import journal

    return [
        journal.to_record(r, runs[r["trial_id"]].info.run_id if r["trial_id"] in runs else None)
        for r in journal.load(path)
    ]
