"""The search's charts (matplotlib, drawn headless): per-trial ratio bars, accuracy against
measured cost, criteria compared. They are built from :class:`~autoprune.contract.TrialRecord`
and return a matplotlib ``Figure`` (``MlflowClient.log_figure`` stores it as a PNG), or None
where a chart would show nothing worth a look. The study's own charts (history, parameter
importance, the agent's rewards, per-group ratios) are in :mod:`.study_charts`."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from ..contract import TrialRecord, is_percent, metric_mode
from ..report import metric_label

COMPLETED, STOPPED, DENSE, FRONT, BASELINE = "#4c72b0", "#dd8452", "#222222", "#c44e52", "#8172b3"
SCOPES = ("local", "global", "per_layer")  # the bars' order in the criteria chart
SCOPE_COLOURS = {"local": "#8da0cb", "global": "#66c2a5", "per_layer": "#fc8d62"}
# where a point's label may go, tried in turn: (dx, dy) in points, horizontal and vertical alignment
OFFSETS = ((4, 3, "left", "bottom"), (-4, 3, "right", "bottom"), (4, -3, "left", "top"), (-4, -3, "right", "top"))


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
    """The axis label of a metric: ``validation accuracy (%)`` for val_acc, ``reward`` for reward."""
    name = metric_label(score).replace("val ", "validation ", 1) if "_" in score else score
    return f"{name} (%)" if is_percent(score) else name


def _show(score: str, value: float) -> str:
    """A charted value as text: ``98.6`` for a percentage, 3 significant digits otherwise."""
    return f"{value:.1f}" if is_percent(score) else f"{value:.3g}"


def zoom(values: Iterable[float], score: str, margin: float = 0.08) -> tuple[float, float]:
    """Axis limits around ``values`` (charted: in % for a percentage metric) with ``margin`` of
    their span beyond each end; a span under half a point (1 % of the values, for another
    metric) is widened to it, so one value or equal values still get an axis."""
    values = list(values)
    lo, hi = min(values), max(values)
    least = 0.5 if is_percent(score) else max(1e-6, 0.01 * max(abs(lo), abs(hi)))
    if hi - lo < least:
        mid = (lo + hi) / 2
        lo, hi = mid - least / 2, mid + least / 2
    pad = margin * (hi - lo)
    return lo - pad, hi + pad


def off_axis(ax, points: list[tuple[float, float]], limits: tuple[float, float], label: str, **style) -> int:
    """Draw ``points`` that fall outside ``limits`` (the y axis) at the edge they passed, as a
    triangle pointing on (``v`` below, ``^`` above); returns how many were outside."""
    lo, hi = limits
    inset = 0.02 * (hi - lo)
    below = [x for x, y in points if y < lo]
    above = [x for x, y in points if y > hi]
    for xs, y, marker in ((below, lo + inset, "v"), (above, hi - inset, "^")):
        if xs:
            ax.scatter(xs, [y] * len(xs), marker=marker, s=28, zorder=3, label=label, **style)
    return len(below) + len(above)


def pareto(points: list[tuple[float, float]], mode: str) -> list[int]:
    """Indices of the points (cost, score) that no other point dominates: none costs at most as
    much and scores at least as well (higher for ``mode`` "max", lower for "min"), strictly
    better in one of the two."""
    sign = 1.0 if mode == "max" else -1.0
    keys = [(x, -sign * y) for x, y in points]  # both lower is better
    return [
        i
        for i, (x, y) in enumerate(keys)
        if not any(a <= x and b <= y and (a < x or b < y) for j, (a, b) in enumerate(keys) if j != i)
    ]


def place_labels(ax, items: Iterable[tuple[float, float, str]], fontsize: float = 7) -> list:
    """Label points (x, y, text), in the order given: each at the first offset around its point
    where it stays inside the axes and overlaps no label placed before; a label that fits
    nowhere is left out. Lays the figure out first (a draw), so call it once the rest of the
    figure is drawn. Returns the labels placed."""
    fig = ax.figure
    fig.canvas.draw()
    frame = ax.get_window_extent()
    placed: list = []
    boxes: list = []
    for x, y, text in items:
        for dx, dy, ha, va in OFFSETS:
            note = ax.annotate(
                text,
                (x, y),
                xytext=(dx, dy),
                textcoords="offset points",
                ha=ha,
                va=va,
                fontsize=fontsize,
                zorder=5,
                bbox={"boxstyle": "square,pad=0.1", "fc": "white", "ec": "none", "alpha": 0.7},
            )
            note.set_in_layout(False)
            box = note.get_window_extent()
            inside = frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1
            if inside and not any(box.overlaps(b) for b in boxes):
                placed.append(note)
                boxes.append(box)
                break
            note.remove()
    return placed


Point = tuple[float, float, int]  # (x, score as charted, trial number from 1)


def _points(records: Iterable[TrialRecord], x: Callable, status: str, score: str) -> list[Point]:
    """(x, the task's validation metric (in % where it is a percentage), trial number from 1)
    of the trials with ``status`` that have both values; ``x``: record -> value or None."""
    out = []
    for r in records:
        value = x(r) if r.status == status else None
        if value is not None and r.metrics.get(score) is not None:
            out.append((float(value), _y(score, r.metrics[score]), r.number + 1))
    return out


def _panel(ax, records, x: Callable, dense_y: float | None, limits, score: str) -> list[tuple[float, float, str]]:
    """One score-against-cost panel: completed trials (filled), stopped trials (hollow; those
    off the zoomed axis at its edge), this panel's own Pareto front (ringed, joined by a step
    line), dense (a dotted line at its score: at its cost, 1, it would squeeze the trials
    into a corner). Returns the labels to place: dense, then the front's trial numbers, best
    score first."""
    done = _points(records, x, "completed", score)
    stopped = _points(records, x, "stopped", score)
    if done:
        ax.scatter([p[0] for p in done], [p[1] for p in done], s=30, color=COMPLETED, label="completed trial", zorder=3)
    lo, hi = limits
    shown = [p for p in stopped if lo <= p[1] <= hi]
    hollow = {"facecolors": "none", "edgecolors": STOPPED}
    if shown:
        ax.scatter(*zip(*[p[:2] for p in shown]), s=30, zorder=3, label="stopped early (score when stopped)", **hollow)
    off = sum(1 for p in stopped if not lo <= p[1] <= hi)
    off_axis(ax, [p[:2] for p in stopped], limits, f"stopped early, off the axis: {off} (at its edge)", **hollow)
    mode = metric_mode(score)
    front = sorted((done[i] for i in pareto([p[:2] for p in done], mode)), key=lambda p: p[0])
    if front:
        ax.scatter(
            [p[0] for p in front],
            [p[1] for p in front],
            s=120,
            facecolors="none",
            edgecolors=FRONT,
            linewidths=1.5,
            label="Pareto front of the panel's two axes",
            zorder=2,
        )
        ax.step([p[0] for p in front], [p[1] for p in front], where="post", color=FRONT, lw=0.8, alpha=0.5, zorder=1)
    labels = []
    if dense_y is not None:
        ax.axhline(dense_y, color=DENSE, ls=":", lw=1, label="dense", zorder=1)
        right = max((p[0] for p in done + stopped), default=1.0)
        labels.append((right, dense_y, "dense"))
    by_score = sorted(front, key=lambda p: -p[1] if mode == "max" else p[1])
    return labels + [(p[0], p[1], f"#{p[2]}") for p in by_score]


def legend(axes: Iterable, on) -> None:
    """One legend right of the axes ``on`` for every labelled artist of ``axes``, each label once."""
    handles: dict[str, Any] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    if handles:
        on.legend(list(handles.values()), list(handles), fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))


def _cost(key: str) -> Callable:
    return lambda r: r.metrics.get(f"{key}_ratio")


def accuracy_vs_cost(
    records: list[TrialRecord],
    dense: dict[str, Any],
    front: Iterable[str] = (),
    budget: float | None = None,
    kind: str = "flops",
    flops_panel: bool = False,
    score: str = "val_acc",
):
    """The task's validation metric (``score``; accuracy by default) against predicted latency
    and against parameters (two panels; with ``flops_panel``, for the multi-objective
    searchers, a third against FLOPs). The y axis is zoomed to the completed trials and dense;
    stopped trials (hollow: pruned, so their cost is known, but not fine-tuned to the end) that
    fall outside it are drawn at its edge. Each panel rings the Pareto front of its own two axes
    (score against that cost, computed from the completed trials it shows) and labels only
    those trials and dense, where the labels do not collide. ``front`` (the search's own
    front, over other objectives) is not drawn: it is accepted so existing callers keep
    working. A budget of kind ``kind`` is drawn where its axis is."""
    fig = _figure(14 if flops_panel else 11, 4.8)
    axes = list(fig.subplots(1, 3 if flops_panel else 2, sharey=True))
    dense_y = None if dense.get(score) is None else _y(score, dense[score])
    panels = [("latency", "latency", "latency kept (fraction of dense, as the latency table predicts it)")]
    panels += [("params", "parameters", "parameters kept (fraction of dense)")]
    panels += [("flops", "FLOPs", "FLOPs kept (fraction of dense)")] if flops_panel else []
    costs = [_cost(key) for key, _, _ in panels]
    done = [p[1] for c in costs for p in _points(records, c, "completed", score)]
    every = done or [p[1] for c in costs for p in _points(records, c, "stopped", score)]
    limits = zoom(every + ([dense_y] if dense_y is not None else []) or [0.0], score)
    labels = []
    for ax, cost, (key, name, xlabel) in zip(axes, costs, panels):
        labels.append(_panel(ax, records, cost, dense_y, limits, score))
        ax.set_xlabel(xlabel)
        where = " on this hardware" if key == "latency" else ""
        ax.set_title(f"{metric_label(score).split(' ', 1)[-1]} against {name}{where}", fontsize=9)
        if budget is not None and kind == key:
            ax.axvline(budget, color="#55a868", ls="--", lw=1, label=f"budget {budget:g}")
        ax.locator_params(axis="x", nbins=5)
        ax.margins(x=0.1)
        ax.grid(alpha=0.3)
    axes[0].set_ylim(*limits)
    axes[0].set_ylabel(_label(score))
    legend(axes, axes[-1])
    n = {s: sum(r.status == s for r in records) for s in ("completed", "stopped", "failed")}
    fig.suptitle(
        f"{_label(score)} against cost: {n['completed']} completed, {n['stopped']} stopped early, "
        f"{n['failed']} failed; front trials labelled #number as in the run names",
        fontsize=10,
    )
    for ax, items in zip(axes, labels):
        place_labels(ax, items)
    return fig


def _by_criterion(records: list[TrialRecord]) -> dict[str, dict[str, list[TrialRecord]]]:
    """The trials grouped by criterion, then by scope."""
    tried: dict[str, dict[str, list[TrialRecord]]] = {}
    for r in records:
        scope = str(r.policy.get("scope", "?"))
        tried.setdefault(str(r.policy.get("criterion", "?")), {}).setdefault(scope, []).append(r)
    return tried


def criteria_chart(records: list[TrialRecord], dense_acc: float | None = None, score: str = "val_acc"):
    """Per pruning criterion tried, one bar per scope (local, global, per_layer; those tried):
    the best completed trial's score, with a dot for every completed trial and, above the bar,
    its best score and its trials completed / tried. The y axis is zoomed to the completed
    trials and dense (a dotted reference line); criteria are ordered by their best score.
    None when fewer than two criteria were tried (the AMC agent's search tries one): there is
    nothing to compare, and the caller logs no chart."""
    tried = _by_criterion(records)
    if len(tried) < 2:
        return None
    scopes = [s for s in SCOPES if any(s in c for c in tried.values())]
    scopes += sorted({s for c in tried.values() for s in c} - set(scopes))

    def scores(rs: list[TrialRecord]) -> list[float]:
        return [_y(score, r.metrics[score]) for r in rs if r.status == "completed" and r.metrics.get(score) is not None]

    top = max if metric_mode(score) == "max" else min
    sign = -1.0 if metric_mode(score) == "max" else 1.0
    best = {c: {s: top(scores(rs), default=None) for s, rs in by.items()} for c, by in tried.items()}
    overall = {c: top([v for v in b.values() if v is not None], default=None) for c, b in best.items()}
    names = sorted(tried, key=lambda c: (overall[c] is None, sign * (overall[c] or 0.0), c))
    fig = _figure(max(8.0, 3.5 + 0.32 * len(scopes) * len(names)), 4.8)
    ax = fig.subplots()
    every = [v for by in tried.values() for rs in by.values() for v in scores(rs)]
    lo, hi = zoom(every + ([_y(score, dense_acc)] if dense_acc is not None else []) or [0.0], score)
    hi += 0.12 * (hi - lo)  # room for the text above the bars
    width = 0.8 / len(scopes)
    for j, s in enumerate(scopes):
        xs = [i + (j - (len(scopes) - 1) / 2) * width for i in range(len(names))]
        _scope_bars(ax, xs, width, [tried[c].get(s, []) for c in names], [best[c].get(s) for c in names], s, scores)
        for x, c in zip(xs, names):
            rs = tried[c].get(s, [])
            if rs:
                text = f"{sum(r.status == 'completed' for r in rs)}/{len(rs)}"
                at = lo if best[c].get(s) is None else best[c][s]
                text = text if best[c].get(s) is None else f"{_show(score, best[c][s])}\n{text}"
                ax.annotate(
                    text,
                    (x, at),
                    xytext=(0, 4),
                    textcoords="offset points",
                    ha="center",
                    va="bottom",
                    fontsize=6,
                    bbox={"boxstyle": "square,pad=0.05", "fc": "white", "ec": "none", "alpha": 0.8},
                    zorder=5,
                )
    if dense_acc is not None:
        d = _y(score, dense_acc)
        ax.axhline(d, color=DENSE, ls=":", lw=1, label=f"dense ({_show(score, d)})")
    done = {c: sum(r.status == "completed" for rs in tried[c].values() for r in rs) for c in names}
    total = {c: sum(len(rs) for rs in tried[c].values()) for c in names}
    ax.set_xticks(range(len(names)), [f"{c}\n({done[c]}/{total[c]})" for c in names], fontsize=8)
    ax.set_ylim(lo, hi)
    ax.set_xlabel("pruning criterion (trials completed / tried); above each bar: best score, completed / tried")
    ax.set_ylabel(_label(score))
    ax.set_title(
        f"{_label(score)} per criterion and scope: bar = best completed trial ({sum(done.values())} completed "
        f"of {len(records)} trials)",
        fontsize=10,
    )
    ax.grid(axis="y", alpha=0.3)
    legend([ax], ax)
    return fig


def _scope_bars(ax, xs, width, groups, bests, scope: str, scores: Callable) -> None:
    """One scope's bars (a criterion without a completed trial in it gets none) and a dot for
    each of its completed trials."""
    have = [(x, b) for x, b in zip(xs, bests) if b is not None]
    if have:
        ax.bar(*zip(*have), width=width * 0.95, color=SCOPE_COLOURS.get(scope, "#bbbbbb"), label=f"scope {scope}")
    dots = [(x, v) for x, rs in zip(xs, groups) for v in scores(rs)]
    if dots:
        ax.scatter(*zip(*dots), s=9, color=COMPLETED, zorder=3, label="completed trial")
