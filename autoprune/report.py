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


def table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for k, row in enumerate(rows):
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
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
    """Dense-vs-pruned table: the task's metric, FLOPs, params, latency per batch size, speed-up."""

    def ratio(key: str) -> str:
        d, p = dense.get(key), pruned.get(key)
        return f"{p / d:.3f}x" if d and p is not None else ""

    rows = [["metric", "dense", "pruned", "pruned/dense"]]
    for key in metric_keys({**dense, **pruned}):
        d, p = dense.get(key), pruned.get(key)
        rows.append([metric_label(key), show_metric(key, d), show_metric(key, p), metric_difference(key, d, p)])
    rows.append(["FLOPs", fmt_count(dense.get("flops")), fmt_count(pruned.get("flops")), ratio("flops")])
    rows.append(["params", fmt_count(dense.get("params")), fmt_count(pruned.get("params")), ratio("params")])
    rows += _latency_rows(dense.get("latency_ms_by_batch", {}), pruned)
    if pruned.get("latency_predicted_ms") is not None:
        speed = f"speed-up {pruned['predicted_speedup']:.2f}x"
        rows.append(["predicted latency (table)", "", _ms(pruned["latency_predicted_ms"]), speed])
    if pruned.get("ideal_speedup"):
        rows.append(["ideal speed-up (1/FLOPs ratio)", "", f"{pruned['ideal_speedup']:.2f}x", ""])
    return table(rows)


def _speed(pruned: dict[str, Any], batch: str) -> str:
    x = pruned.get("speedup_by_batch", {}).get(batch)
    if x is None:
        return ""
    spread = pruned.get("speedup_spread") if batch == str(pruned.get("latency_batch", 1)) else None
    return f"speed-up {x:.2f}x" + (f" ({spread[0]:.2f}-{spread[1]:.2f})" if spread else "")


def _latency_rows(dense_by_batch: dict[str, float], pruned: dict[str, Any]) -> list[list[str]]:
    """Latency per batch size and the speed-up, both timed side by side (spread: the
    quartiles of the per-round ratios)."""
    p_lat = pruned.get("latency_ms_by_batch", {})
    return [[f"latency (batch {b})", _ms(t), _ms(p_lat.get(b)), _speed(pruned, b)] for b, t in dense_by_batch.items()]


def single(metrics: dict[str, Any]) -> str:
    rows = [["metric", "value"]]
    for key in metric_keys(metrics):
        rows.append([metric_label(key), show_metric(key, metrics[key])])
    rows.append(["FLOPs", fmt_count(metrics.get("flops"))])
    rows.append(["params", fmt_count(metrics.get("params"))])
    if "dense_latency_ms_by_batch" in metrics:  # timed side by side with the dense architecture
        lat = [["latency, side by side", "dense architecture", "this model", "speed-up"]]
        lat += _latency_rows(metrics["dense_latency_ms_by_batch"], metrics)
        return table(rows) + "\n\n" + table(lat)
    for b, t in metrics.get("latency_ms_by_batch", {}).items():
        rows.append([f"latency (batch {b})", _ms(t)])
    return table(rows)


def trials_table(
    records: list[TrialRecord], kind: str, metric: str = "val_acc", top: int = 5, score: str | None = None
) -> str:
    """The best completed trials of a search by ``metric`` (the best first), with the task's
    validation metric ``score`` (default: ``metric``, or val_acc for a loss or a reward), and
    how many completed, stopped or failed."""
    from .contract import metric_mode

    score = score or (metric if metric.startswith("val_") and metric != "val_loss" else "val_acc")
    sign = -1.0 if metric_mode(metric) == "max" else 1.0
    done = sorted(
        (r for r in records if r.status == "completed" and r.metrics.get(metric) is not None),
        key=lambda r: sign * r.metrics[metric],
    )
    rows = [["trial", "policy", metric_label(score), f"{kind} ratio", "predicted latency", "predicted speed-up"]]
    for r in done[:top]:
        p, m = r.policy, r.metrics
        rows.append(
            [
                f"#{r.number + 1} {r.trial_id}",
                policy_text(p, "-"),
                show_metric(score, m.get(score)),
                f"{m[f'{kind}_ratio']:.3f}",
                _ms(m.get("latency_predicted_ms")),
                f"{m['predicted_speedup']:.2f}x" if m.get("predicted_speedup") else "-",
            ]
        )
    counts = {s: sum(r.status == s for r in records) for s in ("completed", "stopped", "failed")}
    footer = (
        f"{len(records)} trials: {counts['completed']} completed, {counts['stopped']} stopped early by the "
        f"scheduler, {counts['failed']} failed"
    )
    return (table(rows) + "\n" if len(rows) > 1 else "") + footer


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
