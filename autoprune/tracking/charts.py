"""The search's charts (matplotlib, drawn headless): per-trial ratio bars, accuracy against
measured cost, criteria compared. They are built from :class:`~autoprune.contract.TrialRecord`
and return a matplotlib ``Figure`` (``MlflowClient.log_figure`` stores it as a PNG)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ..contract import TrialRecord, is_percent, metric_mode
from ..report import metric_label

COMPLETED, STOPPED, DENSE, FRONT = "#4c72b0", "#dd8452", "#222222", "#c44e52"


def ratio_charts(mlflow, records: list[TrialRecord]) -> None:
    """The per-group bar chart of the pruned fraction every trial reached, on its child run
    (stopped trials too: they were pruned before they were stopped)."""
    for r in records:
        if r.status in ("completed", "stopped") and r.run_id and r.ratios:
            mlflow.log_figure(r.run_id, ratio_chart(r.ratios, f"{r.label}: pruned fraction reached"), "ratios.png")


def _figure(width: float, height: float):
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def ratio_chart(ratios: dict[str, float], title: str):
    """Horizontal bars: the pruned fraction of every group (or layer)."""
    fig = _figure(7, max(2.5, 0.28 * len(ratios) + 1))
    ax = fig.subplots()
    names = list(ratios)
    ax.barh(range(len(names)), [ratios[n] for n in names], color=COMPLETED)
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("pruned fraction (realised)")
    ax.set_title(title)
    return fig


def _y(score: str, value: float) -> float:
    """A metric as charted: a percentage metric (accuracy, mean IoU) in %, another as it is."""
    return 100 * value if is_percent(score) else value


def _label(score: str) -> str:
    """The axis label of the task's validation metric: ``validation accuracy (%)``."""
    name = metric_label(score).replace("val ", "validation ", 1)
    return f"{name} (%)" if is_percent(score) else name


def _points(records: Iterable[TrialRecord], x: Any, status: str, score: str) -> list[tuple[float, float, int]]:
    """(x, the task's validation metric (in % where it is a percentage), trial number from 1)
    of the trials with ``status`` that have both values; ``x``: record -> value or None."""
    out = []
    for r in records:
        value = x(r) if r.status == status else None
        if value is not None and r.metrics.get(score) is not None:
            out.append((float(value), _y(score, r.metrics[score]), r.number + 1))
    return out


def _panel(ax, records, x, dense_x, dense_acc, front: set[str], hollow_stopped: bool, score: str) -> None:
    """One accuracy-against-cost panel: completed trials (filled), stopped trials (hollow, when
    they have this cost), the Pareto front (ringed), dense (a labelled square); every trial
    labelled with its number."""
    done = _points(records, x, "completed", score)
    stopped = _points(records, x, "stopped", score) if hollow_stopped else []
    if done:
        ax.scatter([p[0] for p in done], [p[1] for p in done], s=30, color=COMPLETED, label="completed trial", zorder=3)
    if stopped:
        ax.scatter(
            [p[0] for p in stopped],
            [p[1] for p in stopped],
            s=30,
            facecolors="none",
            edgecolors=STOPPED,
            label="stopped early (accuracy when stopped)",
            zorder=3,
        )
    ringed = [
        (x(r), _y(score, r.metrics[score]))
        for r in records
        if r.trial_id in front and x(r) is not None and r.metrics.get(score) is not None
    ]
    if ringed:
        ax.scatter(
            *zip(*ringed), s=110, facecolors="none", edgecolors=FRONT, linewidths=1.5, label="Pareto front", zorder=2
        )
    at: dict[tuple[float, float], list[int]] = {}  # trials on the same spot share one label: "#2 #4"
    for px, py, number in done + stopped:
        at.setdefault((round(px, 6), round(py, 4)), []).append(number)
    for (px, py), numbers in at.items():
        text = " ".join(f"#{n}" for n in sorted(numbers))
        ax.annotate(text, (px, py), xytext=(4, 3), textcoords="offset points", fontsize=7)
    if dense_x is not None and dense_acc is not None:
        ax.scatter([dense_x], [_y(score, dense_acc)], marker="s", s=45, color=DENSE, label="dense", zorder=4)
        ax.annotate(
            "dense", (dense_x, _y(score, dense_acc)), xytext=(0, 7), textcoords="offset points", fontsize=8, ha="center"
        )
    ax.locator_params(axis="x", nbins=5)
    ax.margins(x=0.1, y=0.08)
    ax.grid(alpha=0.3)


def accuracy_vs_cost(
    records: list[TrialRecord],
    dense: dict[str, Any],
    front: Iterable[str] = (),
    budget: float | None = None,
    kind: str = "flops",
    flops_panel: bool = False,
    score: str = "val_acc",
):
    """The task's validation metric (``score``; accuracy by default) against predicted latency and against parameters (two panels; with
    ``flops_panel``, for the multi-objective searchers, a third against FLOPs). Trials are
    labelled with their number; stopped trials are hollow (pruned, so their cost is known,
    but not fine-tuned to the end); dense is a labelled square; ``front``: trial ids of
    the Pareto front, ringed. A budget of kind ``kind`` is drawn where its axis is."""
    fig = _figure(14 if flops_panel else 11, 4.5)
    axes = list(fig.subplots(1, 3 if flops_panel else 2, sharey=True))
    front = set(front)

    def share(key: str):
        return lambda r: r.metrics.get(f"{key}_ratio")

    _panel(
        axes[0],
        records,
        lambda r: r.metrics.get("latency_ratio"),
        1.0,
        dense.get(score),
        front,
        True,
        score,
    )
    axes[0].set_xlabel("latency kept (fraction of dense, as the latency table predicts it)")
    axes[0].set_title("accuracy against latency on this hardware", fontsize=9)
    panels = [("params", "parameters")] + ([("flops", "FLOPs")] if flops_panel else [])
    for ax, (key, name) in zip(axes[1:], panels):
        _panel(ax, records, share(key), 1.0, dense.get(score), front, True, score)
        ax.set_xlabel(f"{name} kept (fraction of dense)")
        ax.set_title(f"accuracy against {name}", fontsize=9)
        if budget is not None and kind == key:
            ax.axvline(budget, color="#55a868", ls="--", lw=1, label=f"budget {budget:g}")
    axes[0].set_ylabel(_label(score))
    handles: dict[str, Any] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    if handles:
        axes[-1].legend(list(handles.values()), list(handles), fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.suptitle(
        f"{_label(score)} against cost: latency predicted, parameters counted (trial numbers as in the run names)",
        fontsize=10,
    )
    return fig


def criteria_chart(records: list[TrialRecord], dense_acc: float | None = None, score: str = "val_acc"):
    """Per pruning criterion tried: a bar for the best validation accuracy of its completed
    trials, a dot for each completed trial, a hollow dot for each stopped one (its accuracy
    when stopped); the tick label says how many of its trials completed. Axis 0-100 %."""
    fig = _figure(9, 4.5)
    ax = fig.subplots()
    tried: dict[str, list[TrialRecord]] = {}
    for r in records:
        tried.setdefault(str(r.policy.get("criterion", "?")), []).append(r)

    def accs(name: str, status: str) -> list[float]:
        return [
            _y(score, r.metrics[score]) for r in tried[name] if r.status == status and r.metrics.get(score) is not None
        ]

    top = max if metric_mode(score) == "max" else min
    sign = -1.0 if metric_mode(score) == "max" else 1.0
    best = {n: top(accs(n, "completed"), default=None) for n in tried}
    names = sorted(tried, key=lambda n: (best[n] is None, sign * (best[n] or 0.0), n))
    xs = range(len(names))
    ax.bar(xs, [best[n] or 0.0 for n in names], color="#c8d3e6", label="best completed trial")
    for i, n in enumerate(names):
        if best[n] is not None:
            ax.annotate(
                f"{best[n]:.1f}", (i, best[n]), xytext=(0, -12), textcoords="offset points", ha="center", fontsize=7
            )
    dots = [(i, a) for i, n in enumerate(names) for a in accs(n, "completed")]
    hollow = [(i, a) for i, n in enumerate(names) for a in accs(n, "stopped")]
    if dots:
        ax.scatter(*zip(*dots), color=COMPLETED, s=16, zorder=3, label="completed trial")
    if hollow:
        ax.scatter(
            *zip(*hollow), facecolors="none", edgecolors=STOPPED, s=16, zorder=3, label="stopped early (when stopped)"
        )
    if dense_acc is not None:
        d = _y(score, dense_acc)
        ax.axhline(d, color=DENSE, ls=":", lw=1, label=f"dense ({d:.3g})")
    done = {n: sum(r.status == "completed" for r in tried[n]) for n in names}
    ax.set_xticks(list(xs), [f"{n} ({done[n]}/{len(tried[n])} completed)" for n in names], rotation=30, ha="right")
    if is_percent(score):
        ax.set_ylim(0, 100)
    ax.set_xlabel("pruning criterion (trials completed / tried)")
    ax.set_ylabel(_label(score))
    ax.set_title(f"{_label(score)} per pruning criterion (bar: best completed trial)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return fig
