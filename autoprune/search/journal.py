"""The search's own record of its trials: what ``--resume`` and the end of a search read.

Every trial that ends (completed, stopped by the scheduler, or failed) gets one JSON file,
``<storage>/<name>/trials/<trial_id>.json``, written whole by the driver before the trial's
MLflow run is ended: its number, status, config (with what its searcher needs to be told of
it again), last report, per-report curve and error. Ray Tune's own files (its pickles and
experiment snapshots, under ``tune/``) are never read back: a resume reads these records,
checks each one strictly (a torn or altered file is refused by name, before any work), tells
the searcher the trials again and lets Tune run the rest of the budget as a new experiment.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from ..contract import PRUNED_METRICS, REPORTED, TrialConfig, TrialRecord, task_metric_keys
from ..errors import AutopruneError
from ..paths import join, texts, write_text
from ..schema import parse_json

TRIALS = "trials"  # the records' folder in the search's folder
TUNE = "tune"  # Ray Tune's experiment folder in the search's folder: written, never read back
KIND = "autoprune.trial"
VERSION = 1
STATUSES = ("completed", "stopped", "failed")
CURVE_KEYS = ("training_iteration", "epoch", "val_acc", "val_loss", "reward")
MAX_RECORD = 4 << 20  # bytes: an agent's episode over a few thousand channel groups fits
MAX_CURVE = 100_000  # reports per trial
MAX_NUMBER = 10**7
_TRIAL_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def record(trial_id: str, number: int, status: str, config: dict, report: dict, curve: list, error: str | None):
    """A trial's record as :func:`save` writes it."""
    return {
        "kind": KIND,
        "version": VERSION,
        "trial_id": trial_id,
        "number": number,
        "status": status,
        "config": config,
        "report": {k: report[k] for k in (*REPORTED, *task_metric_keys(report)) if k in report},
        "curve": curve,
        "error": error,
    }


def curve_point(result: dict) -> dict[str, Any]:
    """What a record keeps of one report, for the searcher (an Optuna trial's intermediate values)."""
    return {k: result[k] for k in (*CURVE_KEYS, *task_metric_keys(result)) if _number(result.get(k))}


def save(path: str, rec: dict) -> None:
    """Write a trial's record whole into the search folder ``path`` (a folder or a bucket URI);
    a value that is not a finite number (a diverged loss) is kept as null: records are strict JSON."""
    write_text(join(path, TRIALS, f"{rec['trial_id']}.json"), json.dumps(_finite(rec), allow_nan=False) + "\n")


def _finite(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def load(path: str) -> list[dict]:
    """Every record of the search at ``path``, checked, in the order the trials started. A
    record that is torn, altered or not one this version writes is an AutopruneError naming it."""
    folder = join(path, TRIALS)
    out = [check(text, name, join(folder, f"{name}.json")) for name, text in sorted(texts(folder, ".json").items())]
    numbers = [r["number"] for r in out]
    if len(set(numbers)) != len(numbers):
        raise AutopruneError(f"the trial records in {folder!r} number two trials alike; they were altered")
    return sorted(out, key=lambda r: r["number"])


def check(text: str, name: str, where: str) -> dict:
    """One record, read from ``text`` (the file ``where``, named for ``name``), checked."""
    bad = f"trial record {where!r} is damaged or was altered"
    if len(text) > MAX_RECORD:
        raise AutopruneError(f"{bad}: it is over {MAX_RECORD >> 20} MB")
    try:
        rec = parse_json(text, "it")
    except AutopruneError as exc:
        raise AutopruneError(f"{bad} ({exc}); move it away to run that trial again") from None
    problem = _problem(rec, name)
    if problem:
        raise AutopruneError(f"{bad}: {problem}; move it away to run that trial again")
    return rec


def _problem(rec: Any, name: str) -> str | None:
    """What is wrong with a parsed record, or None."""
    if not isinstance(rec, dict) or rec.get("kind") != KIND:
        return "it is not an autoprune trial record"
    if rec.get("version") != VERSION:
        return f"it is version {rec.get('version')!r}; this autoprune reads version {VERSION}"
    if set(rec) != {"kind", "version", "trial_id", "number", "status", "config", "report", "curve", "error"}:
        return "its fields are not a trial record's"
    trial_id, number = rec["trial_id"], rec["number"]
    if not isinstance(trial_id, str) or not _TRIAL_ID.match(trial_id) or trial_id != name:
        return f"its trial id {str(trial_id)[:80]!r} is not its file's name"
    if type(number) is not int or not 1 <= number < MAX_NUMBER:
        return f"its number {str(number)[:80]!r} is not a trial number"
    if rec["status"] not in STATUSES:
        return f"its status {str(rec['status'])[:80]!r} is not one of {', '.join(STATUSES)}"
    if rec["error"] is not None and not isinstance(rec["error"], str):
        return "its error is not text"
    try:
        TrialConfig.from_config(rec["config"] if isinstance(rec["config"], dict) else {"policy": None})
    except AutopruneError as exc:
        return str(exc)
    report, curve = rec["report"], rec["curve"]
    if not isinstance(report, dict) or set(report) - set(REPORTED) - set(task_metric_keys(report)):
        return "its report holds keys a trial does not report"
    if any(not _number(report[k]) for k in (*PRUNED_METRICS, *task_metric_keys(report)) if report.get(k) is not None):
        return "its report holds a metric that is not a finite number"
    ratios = report.get("ratios", {})
    if not isinstance(ratios, dict) or not all(_number(v) for v in ratios.values()):
        return "its ratios are not numbers"
    if not isinstance(curve, list) or len(curve) > MAX_CURVE:
        return "its curve is not a list of reports"
    if not all(
        isinstance(p, dict) and set(p) - set(task_metric_keys(p)) <= set(CURVE_KEYS) and all(map(_number, p.values()))
        for p in curve
    ):
        return "its curve holds something other than numbers"
    if rec["status"] == "completed" and not any(_number(report[k]) for k in task_metric_keys(report)):
        return "it is completed without the task's validation metric"
    return None


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def to_record(rec: dict, run_id: str | None) -> TrialRecord:
    """The :class:`TrialRecord` the end of the search reads, from a record and its MLflow run."""
    report = rec["report"]
    config = TrialConfig.from_config(rec["config"])
    return TrialRecord(
        number=rec["number"] - 1,  # counted from 0; the record keeps its run's number (#1 first)
        trial_id=rec["trial_id"],
        status=rec["status"],
        policy=config.policy,
        budget_fraction=config.budget_fraction,
        metrics={
            k: report[k]
            for k in (*PRUNED_METRICS, *task_metric_keys(report), "engine_s", "epoch")
            if report.get(k) is not None
        },
        ratios=dict(report.get("ratios") or {}),
        node_id=report.get("node_id") if isinstance(report.get("node_id"), str) else None,
        error=rec["error"] if rec["status"] == "failed" else None,
        run_id=run_id,
        baseline=(config.searcher or {}).get("baseline"),
    )
