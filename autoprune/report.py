"""Plain-text tables for the terminal."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .contract import is_percent, policy_text, show_metric, task_metric_keys

if TYPE_CHECKING:
    from .contract import TrialRecord


def fmt_count(x: float | None) -> str:
    if x is None:
        return "-"
    for unit, div in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.2f}{unit}"
    return f"{x:.0f}"


def pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f} ms"


def table(rows: list[list[str]], left_last: bool = False) -> str:
    """``rows`` (the first the header) as aligned columns: the first column left-justified,
    the others right-justified, the last one left-justified too with ``left_last`` (for
    cells of words rather than numbers)."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    left = {0, len(widths) - 1} if left_last else {0}
    lines = []
    for k, row in enumerate(rows):
        cells = [c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))]
        lines.append("  ".join(cells).rstrip())
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def metric_keys(metrics: dict[str, Any]) -> list[str]:
    """The task metrics in ``metrics`` (``val_acc``, ``test_miou`` ...), validation first."""
    return task_metric_keys(metrics, ("val", "test"))


def metric_label(key: str) -> str:
    """``val_acc`` -> ``val accuracy``; ``test_rmse`` -> ``test rmse``."""
    split, name = key.split("_", 1)
    return f"{split} {METRIC_WORDS.get(name, name)}"


METRIC_WORDS = {"acc": "accuracy", "miou": "mean IoU", "rmse": "RMSE", "mae": "MAE"}


def metric_difference(key: str, before: float | None, after: float | None) -> str:
    if before is None or after is None:
        return ""
    if is_percent(key):
        return f"{100 * (after - before):+.2f} pts"
    return f"{after - before:+.4g}"


def comparison(dense: dict[str, Any], pruned: dict[str, Any]) -> str:
    """Dense-vs-pruned table: the task's metric, FLOPs, params, latency per batch size with the
    speed-up (see :func:`_latency_rows`), and a note on how the speed-up is read."""

    def ratio(key: str) -> str:
        d, p = dense.get(key), pruned.get(key)
        return f"{p / d:.3f}x" if d and p is not None else ""

    rows = [["metric", "dense", "pruned", "pruned/dense"]]
    for key in metric_keys({**dense, **pruned}):
        d, p = dense.get(key), pruned.get(key)
        rows.append([metric_label(key), show_metric(key, d), show_metric(key, p), metric_difference(key, d, p)])
    rows.append(["FLOPs", fmt_count(dense.get("flops")), fmt_count(pruned.get("flops")), ratio("flops")])
    rows.append(["params", fmt_count(dense.get("params")), fmt_count(pruned.get("params")), ratio("params")])
    latency, notes = _latency_rows(dense.get("latency_ms_by_batch", {}), pruned)
    rows += latency
    if pruned.get("latency_predicted_ms") is not None:
        speed = f"speed-up {pruned['predicted_speedup']:.2f}x"
        rows.append(["predicted latency (table)", "", _ms(pruned["latency_predicted_ms"]), speed])
    if (pruned.get("round_to") or 1) > 1:
        rows.append(["kept widths", "", f"multiples of {pruned['round_to']}", ""])
    if pruned.get("ideal_speedup"):
        rows.append(["ideal speed-up (1/FLOPs ratio)", "", f"{pruned['ideal_speedup']:.2f}x", ""])
    return "\n".join([table(rows, left_last=True), *notes])


# When a side-by-side timing is called noisy: the quartiles of its per-round ratios (dense time /
# pruned time in one round) lie more than this factor apart ...
NOISY_SPREAD = 1.2
# ... or they straddle 1 while the speed-up is at least this far from 1 (faster or slower is not
# settled) ...
NOISY_SIDE = 0.05
# ... or the median of those ratios and the ratio of the medians differ by more than this factor.
NOISY_DISAGREE = 1.1


def noisy(speedup: float, per_round: float | None, spread: list[float] | tuple[float, float] | None) -> bool:
    """Whether a speed-up (``speedup``: dense median / pruned median) timed side by side is too
    noisy to read as it is: by :data:`NOISY_SPREAD`, :data:`NOISY_SIDE` and :data:`NOISY_DISAGREE`,
    from ``per_round`` (the median of the per-round ratios) and ``spread`` (their quartiles)."""
    if per_round and max(speedup, per_round) / min(speedup, per_round) > NOISY_DISAGREE:
        return True
    if not spread or spread[0] <= 0:
        return False
    lo, hi = spread
    return hi / lo > NOISY_SPREAD or (lo < 1.0 < hi and abs(speedup - 1.0) >= NOISY_SIDE)


def _speed(dense_ms: float | None, pruned_ms: float | None, pruned: dict[str, Any], batch: str) -> tuple[str, str]:
    """The speed-up cell of a latency row, and what a note under the table must explain of it
    ("", "spread" or "noisy"): dense median / pruned median (the latencies on its row), the
    quartiles of the per-round ratios in brackets where they were kept, and ``noisy: timings
    varied`` where :func:`noisy` says so."""
    per_round = pruned.get("speedup_per_round_by_batch", pruned.get("speedup_by_batch", {})).get(batch)
    spread = pruned.get("speedup_spread_by_batch", {}).get(batch)
    if spread is None and batch == str(pruned.get("latency_batch", 1)):
        spread = pruned.get("speedup_spread")
    if not dense_ms or not pruned_ms:
        return (f"speed-up {per_round:.2f}x (median per round)" if per_round else ""), ""
    x = dense_ms / pruned_ms
    varied = f"({spread[0]:.2f}-{spread[1]:.2f})" if spread else ""
    if noisy(x, per_round, spread):
        return f"speed-up {x:.2f}x, noisy: timings varied {varied or f'(median per round {per_round:.2f}x)'}", "noisy"
    return f"speed-up {x:.2f}x {varied}".rstrip(), "spread" if spread else ""


def _latency_rows(dense_by_batch: dict[str, float], pruned: dict[str, Any]) -> tuple[list[list[str]], list[str]]:
    """Latency per batch size, dense and pruned timed side by side (the median of each), with
    the speed-up (:func:`_speed`); and the notes that say how to read the speed-up, for below
    the table."""
    p_lat = pruned.get("latency_ms_by_batch", {})
    rows, kinds = [], set()
    for b, t in dense_by_batch.items():
        cell, kind = _speed(t, p_lat.get(b), pruned, b)
        rows.append([f"latency (batch {b})", _ms(t), _ms(p_lat.get(b)), cell])
        kinds.add(kind)
    if not rows:
        return rows, []
    what = "speed-up: dense median / pruned median"
    if pruned.get("latency_runtime"):
        what = f"timed in {pruned['latency_runtime']}; {what}"
    if kinds & {"spread", "noisy"}:
        what += "; (a-b): quartiles of the per-round ratio (dense / pruned time in one round)"
    notes = [what]
    if "noisy" in kinds:
        notes.append(
            f"noisy: the per-round quartiles over {NOISY_SPREAD:g}x apart or either side of 1, or their median "
            f"over {NOISY_DISAGREE:g}x off the speed-up; was the machine busy?"
        )
    return rows, notes


def single(metrics: dict[str, Any]) -> str:
    """``autoprune evaluate``'s table: the task's metrics, FLOPs, params, and latency (beside
    the dense architecture's, timed side by side, where it was)."""
    rows = [["metric", "value"]]
    for key in metric_keys(metrics):
        rows.append([metric_label(key), show_metric(key, metrics[key])])
    rows.append(["FLOPs", fmt_count(metrics.get("flops"))])
    rows.append(["params", fmt_count(metrics.get("params"))])
    if "dense_latency_ms_by_batch" in metrics:  # timed side by side with the dense architecture
        lat = [["latency, side by side", "dense architecture", "this model", "speed-up"]]
        latency, notes = _latency_rows(metrics["dense_latency_ms_by_batch"], metrics)
        return "\n".join([table(rows), "", table(lat + latency, left_last=True), *notes])
    for b, t in metrics.get("latency_ms_by_batch", {}).items():
        rows.append([f"latency (batch {b})", _ms(t)])
    return table(rows)


FRONT_ROWS = 10  # the most trials of a Pareto front the trials table lists
GOAL_WORDS = {"latency_predicted_ms": "predicted latency"}  # an objective in the front's heading


def trials_table(
    records: list[TrialRecord],
    kind: str,
    metric: str = "val_acc",
    top: int = 5,
    score: str | None = None,
    front: list[str] | None = None,
) -> str:
    """The best completed trials of a search by ``metric`` (the best first, ``top`` of them),
    with the task's validation metric ``score`` (default: ``metric``, or val_acc for a loss or
    a reward), and how many completed, stopped or failed. ``front``: the trial ids on the
    Pareto front of a multi-objective search (``contract.objectives(kind, metric)``); the table
    then lists those trials instead (the best by ``score`` first, up to :data:`FRONT_ROWS`),
    under a line that says so."""
    from .contract import metric_mode

    score = score or (metric if metric.startswith("val_") and metric != "val_loss" else "val_acc")
    if front is None:
        sign = -1.0 if metric_mode(metric) == "max" else 1.0
        done = sorted(
            (r for r in records if r.status == "completed" and r.metrics.get(metric) is not None),
            key=lambda r: sign * r.metrics[metric],
        )[:top]
    else:
        done = _front_rows(records, front, score)
    rows = [["trial", "policy", metric_label(score), f"{kind} ratio", "predicted latency", "predicted speed-up"]]
    for r in done:
        p, m = r.policy, r.metrics
        rows.append(
            [
                f"#{r.number + 1} {r.trial_id}",
                policy_text(p, "-"),
                show_metric(score, m.get(score)),
                f"{m[f'{kind}_ratio']:.3f}" if m.get(f"{kind}_ratio") is not None else "-",
                _ms(m.get("latency_predicted_ms")),
                f"{m['predicted_speedup']:.2f}x" if m.get("predicted_speedup") else "-",
            ]
        )
    counts = {s: sum(r.status == s for r in records) for s in ("completed", "stopped", "failed")}
    footer = (
        f"{len(records)} trials: {counts['completed']} completed, {counts['stopped']} stopped early by the "
        f"scheduler, {counts['failed']} failed"
    )
    head = _front_heading(len(front), kind, metric, score) + "\n" if front is not None else ""
    return head + (table(rows) + "\n" if len(rows) > 1 else "") + footer


def _front_rows(records: list[TrialRecord], front: list[str], score: str) -> list[TrialRecord]:
    """The records of the trials in ``front``, the best by ``score`` first (those without it
    last), at most :data:`FRONT_ROWS`."""
    from .contract import metric_mode

    ids = set(front)
    sign = -1.0 if metric_mode(score) == "max" else 1.0
    on = [r for r in records if r.trial_id in ids]
    on.sort(key=lambda r: (r.metrics.get(score) is None, sign * (r.metrics.get(score) or 0.0), r.number))
    return on[:FRONT_ROWS]


def _front_heading(n: int, kind: str, metric: str, score: str) -> str:
    """``Pareto front: 7 trials (accuracy vs flops ratio vs predicted latency)``, and which of
    them the table lists when there are more than :data:`FRONT_ROWS`."""
    from .contract import objectives

    goals = [GOAL_WORDS.get(key, key.replace("_", " ")) for key, _ in objectives(kind, metric)]
    goals[0] = METRIC_WORDS.get(metric.split("_", 1)[-1], metric)  # the task's metric, without its split
    line = f"Pareto front: {n} trial{'s' if n != 1 else ''} ({' vs '.join(goals)})"
    if n > FRONT_ROWS:
        line += f"; the {FRONT_ROWS} best by {metric_label(score)}"
    return line


def latency_note(checks: list[dict[str, Any]], budget: Any) -> str | None:
    """One line on how a latency budget fared against the timing, or None."""
    if not checks:
        return None
    kept = next((c for c in checks if c.get("kept")), checks[-1])
    what = (
        f"latency budget {budget.fraction:.4g}: measured {kept['measured']:.3f} of dense side by side (noise "
        f"{kept['noise']:.3f}), predicted {kept['predicted']:.3f}"
    )
    if len(checks) > 1:
        what += f"; solved {len(checks)} times, the timing having missed the budget by more than its noise"
    if kept["missed"]:
        what += "; it still misses it (is the machine busy?)"
    if checks[-1].get("unreachable"):
        what += "; a corrected target was out of this policy's reach"
    return what
