"""The study's charts, for the search run: the score trial by trial with the best so far,
which policy fields mattered (Optuna's parameter importance), the AMC agent's reward per
episode, and the pruned fraction each group reached across the trials. Each takes the
search's :class:`~autoprune.contract.TrialRecord` list and returns a matplotlib ``Figure``, or
None where it would have nothing to show (the caller then logs no chart)."""

from __future__ import annotations

import math
import warnings
from typing import Any

from ..contract import TrialRecord, metric_mode
from .charts import BASELINE, COMPLETED, DENSE, FRONT, STOPPED, _figure, _label, _y, legend, off_axis, zoom

MIN_TRIALS = 4  # fewer completed trials than this give no importance chart
MOST_PARAMS = 20  # the importance chart shows at most this many parameters


def _scored(records: list[TrialRecord], score: str, status: str = "completed") -> list[TrialRecord]:
    """The trials with ``status`` that reported ``score``, by trial number."""
    return sorted(
        (r for r in records if r.status == status and r.metrics.get(score) is not None), key=lambda r: r.number
    )


def best_so_far(values: list[float], mode: str) -> list[float]:
    """The running best of ``values`` (the largest so far for ``mode`` "max", else the smallest)."""
    out: list[float] = []
    for v in values:
        out.append(v if not out else (max if mode == "max" else min)(out[-1], v))
    return out


def optimisation_history(records: list[TrialRecord], score: str = "val_acc", dense: float | None = None):
    """Each completed trial's ``score`` by trial number (#1, #2 ...), the best so far as a step
    line (best by the metric's direction), stopped trials faded at their score when stopped
    (those off the zoomed axis at its edge), baseline trials marked; ``dense``: the dense
    model's score, a dotted reference line. The y axis is zoomed to the completed trials."""
    done, stopped = _scored(records, score), _scored(records, score, "stopped")
    fig = _figure(10, 4.5)
    ax = fig.subplots()
    ys = [_y(score, r.metrics[score]) for r in done]
    extra = [] if dense is None else [_y(score, dense)]
    limits = zoom(ys + extra or [_y(score, r.metrics[score]) for r in stopped] or [0.0], score)
    if done:
        xs = [r.number + 1 for r in done]
        ax.scatter(xs, ys, s=22, color=COMPLETED, zorder=3, label="completed trial")
        end = max(r.number + 1 for r in records)
        run = best_so_far(ys, metric_mode(score))
        ax.step(xs + [end], run + run[-1:], where="post", color=FRONT, lw=1.6, label="best so far", zorder=2)
        based = [(r.number + 1, y) for r, y in zip(done, ys) if r.baseline]
        if based:
            ax.scatter(*zip(*based), s=90, marker="D", facecolors="none", edgecolors=BASELINE, lw=1.4, zorder=4)
            ax.scatter([], [], marker="D", facecolors="none", edgecolors=BASELINE, label="baseline trial")
    faded = {"color": STOPPED, "alpha": 0.45}
    pts = [(r.number + 1, _y(score, r.metrics[score])) for r in stopped]
    inside = [p for p in pts if limits[0] <= p[1] <= limits[1]]
    if inside:
        ax.scatter(*zip(*inside), s=16, zorder=2, label="stopped early (score when stopped)", **faded)
    off = len(pts) - len(inside)
    off_axis(ax, pts, limits, f"stopped early, off the axis: {off} (at its edge)", **faded)
    if dense is not None:
        ax.axhline(_y(score, dense), color=DENSE, ls=":", lw=1, label="dense")
    ax.set_ylim(*limits)
    last = max([r.number + 1 for r in records] + [1])
    pad = max(0.5, 0.015 * last)  # room for the markers of the first and last trials
    ax.set_xlim(1 - pad, last + pad)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("trial number (#, in the order the trials started)")
    ax.set_ylabel(_label(score))
    failed = sum(r.status == "failed" for r in records)
    ax.set_title(
        f"{_label(score)} trial by trial: {len(done)} completed, {len(stopped)} stopped early, {failed} failed",
        fontsize=10,
    )
    ax.grid(alpha=0.3)
    legend([ax], ax)
    return fig


def _fields(policy: dict[str, Any]) -> dict[str, Any]:
    """A policy's fields as flat names: nested ones (``ratios``, ``method_options``,
    ``finetune``) as ``ratios.layer1``; a list as its text."""
    out: dict[str, Any] = {}
    for key, value in policy.items():
        if isinstance(value, dict):
            out.update({f"{key}.{k}": v for k, v in _fields(value).items()})
        else:
            out[key] = str(value) if isinstance(value, (list, tuple)) else value
    return out


def _numeric(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _distributions(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """A distribution for every field with at least two values among ``rows``: a float range
    over the values seen where all are numbers, a categorical over them otherwise."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution

    seen: dict[str, list] = {}
    for row in rows:
        for key, value in row.items():
            if value not in seen.setdefault(key, []):
                seen[key].append(value)
    out: dict[str, Any] = {}
    for key, values in seen.items():
        if len(values) < 2:
            continue
        if all(_numeric(v) for v in values):
            out[key] = FloatDistribution(float(min(values)), float(max(values)))
        else:
            out[key] = CategoricalDistribution(sorted(values, key=lambda v: (v is None, str(v))))
    return out


def param_importances(records: list[TrialRecord], score: str = "val_acc") -> tuple[dict[str, float], str] | None:
    """Optuna's parameter importances of the policy fields for ``score`` over the completed
    trials: an in-memory study of one trial per completed record (its flattened policy
    fields that took two values or more: ``criterion``, ``scope``, ``ratios.layer1`` ...),
    assessed by Optuna's PED-ANOVA (``PedAnovaImportanceEvaluator``, Optuna 5's default),
    which weighs fields present in only some trials (a per-layer ratio) too. Returns the
    importances (non-negative, summing to 1, largest first) and the evaluator's name; None
    with fewer than ``MIN_TRIALS`` completed trials or fewer than two fields that vary."""
    done = _scored(records, score)
    if len(done) < MIN_TRIALS:
        return None
    rows = [_fields(r.policy) for r in done]
    dists = _distributions(rows)
    if len(dists) < 2:
        return None
    import optuna
    from optuna.importance import PedAnovaImportanceEvaluator, get_param_importances

    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        direction = "maximize" if metric_mode(score) == "max" else "minimize"
        study = optuna.create_study(direction=direction)
        for r, row in zip(done, rows):
            params = {k: float(v) if _numeric(v) else v for k, v in row.items() if k in dists}
            study.add_trial(
                optuna.trial.create_trial(
                    params=params,
                    distributions={k: dists[k] for k in params},
                    value=float(r.metrics[score]),
                )
            )
        evaluator = PedAnovaImportanceEvaluator()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # few trials in a regime: the estimate is noisier, still drawn
            found = get_param_importances(study, evaluator=evaluator)
    finally:
        optuna.logging.set_verbosity(verbosity)
    return dict(found), "PED-ANOVA"


def importance(records: list[TrialRecord], score: str = "val_acc"):
    """Horizontal bars of :func:`param_importances`, the most important field on top (at most
    ``MOST_PARAMS``); None where it gives none (too few completed trials or varying fields)."""
    found = param_importances(records, score)
    if found is None:
        return None
    values, evaluator = found
    shown = list(values.items())[:MOST_PARAMS]
    fig = _figure(8, max(2.8, 0.3 * len(shown) + 1.4))
    ax = fig.subplots()
    ax.barh(range(len(shown)), [v for _, v in shown], color=COMPLETED)
    ax.set_yticks(range(len(shown)), [k for k, _ in shown], fontsize=8)
    ax.invert_yaxis()
    for i, (_, v) in enumerate(shown):
        ax.annotate(f"{v:.2f}", (v, i), xytext=(3, 0), textcoords="offset points", va="center", fontsize=7)
    ax.set_xlim(0, max(v for _, v in shown) * 1.15 or 1.0)
    ax.set_xlabel("importance (share of the total, sums to 1 over every field)")
    more = f"; top {len(shown)} of {len(values)} fields" if len(values) > len(shown) else ""
    done = len(_scored(records, score))
    ax.set_title(
        f"which policy fields mattered for {_label(score).removesuffix(' (%)')}\n"
        f"Optuna {evaluator} importance over {done} completed trials{more}",
        fontsize=10,
    )
    ax.grid(axis="x", alpha=0.3)
    return fig


def moving_average(values: list[float], window: int) -> list[float]:
    """The mean of each value and the ``window - 1`` before it (fewer at the start)."""
    return [sum(values[max(0, i - window + 1) : i + 1]) / (i + 1 - max(0, i - window + 1)) for i in range(len(values))]


def reward_chart(records: list[TrialRecord], score: str = "val_acc"):
    """The AMC agent's search: the reward of every episode (a trial; episode = trial number)
    with its moving average, and below it the episode's task metric (``score``, and
    ``recal_acc``: the same metric after BN recalibration, before any fine-tuning; one line
    where the two agree) where reported. None when no trial reported a reward."""
    eps = sorted((r for r in records if r.metrics.get("reward") is not None), key=lambda r: r.number)
    if not eps:
        return None
    fig = _figure(10, 6.5)
    top, bottom = fig.subplots(2, 1, sharex=True)
    xs = [r.number + 1 for r in eps]
    rewards = [float(r.metrics["reward"]) for r in eps]
    window = max(3, min(25, len(eps) // 10))
    top.scatter(xs, rewards, s=10, color=COMPLETED, alpha=0.5, label="episode reward")
    top.plot(xs, moving_average(rewards, window), color=FRONT, lw=1.8, label=f"moving average ({window} episodes)")
    best = max(range(len(eps)), key=lambda i: rewards[i])
    top.scatter([xs[best]], [rewards[best]], s=90, facecolors="none", edgecolors=DENSE, label=f"best: #{xs[best]}")
    top.set_ylabel("reward")
    top.set_title(f"AMC agent: reward per episode ({len(eps)} episodes)", fontsize=10)
    name = _label(score).removesuffix(" (%)")
    series = {key: [(x, r.metrics.get(key)) for x, r in zip(xs, eps)] for key in (score, "recal_acc")}
    same = all(a == b for (_, a), (_, b) in zip(*series.values()))
    names = {score: f"{name} (= after BN recalibration)" if same else name, "recal_acc": "after BN recalibration"}
    colours = {score: COMPLETED, "recal_acc": STOPPED}
    for key in [score] if same else [score, "recal_acc"]:
        pts = [(x, _y(score, v)) for x, v in series[key] if v is not None]  # recal_acc: the same metric
        if pts:
            bottom.scatter(*zip(*pts), s=8, alpha=0.35, color=colours[key])
            ys = moving_average([p[1] for p in pts], window)
            bottom.plot([p[0] for p in pts], ys, color=colours[key], lw=1.6, label=f"{names[key]}, moving average")
    bottom.set_ylabel(_label(score))
    bottom.set_title(f"the episode's {name} (dots: each episode)", fontsize=9)
    bottom.set_xlabel("episode (trial number)")
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
        legend([ax], ax)
    return fig


def group_ratios(records: list[TrialRecord], best_trial_id: str | None = None):
    """A heatmap of the realised pruned fraction of every group (rows, in the network's order)
    in every completed trial (columns, #number, in trial order), colour 0 (kept) to 1
    (pruned away); a group a trial did not report is blank. ``best_trial_id``: that trial's
    column is outlined. None when no completed trial reported ratios."""
    done = sorted((r for r in records if r.status == "completed" and r.ratios), key=lambda r: r.number)
    if not done:
        return None
    import numpy as np

    groups = list(dict.fromkeys(g for r in done for g in r.ratios))
    grid = np.array([[r.ratios.get(g, math.nan) for r in done] for g in groups], dtype=float)
    fig = _figure(min(18.0, max(7.0, 3.5 + 0.075 * len(done))), min(16.0, max(3.0, 0.22 * len(groups) + 1.8)))
    ax = fig.subplots()
    from matplotlib import colormaps

    cmap = colormaps["viridis"].with_extremes(bad="#eeeeee")
    image = ax.imshow(np.ma.masked_invalid(grid), aspect="auto", cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
    fig.colorbar(image, ax=ax, label="pruned fraction (realised)", fraction=0.04, pad=0.01)
    step = max(1, math.ceil(len(done) / 30))
    ticks = list(range(0, len(done), step))
    best = next((i for i, r in enumerate(done) if r.trial_id == best_trial_id), None)
    if best is not None:
        from matplotlib.patches import Rectangle

        ax.add_patch(Rectangle((best - 0.5, -0.5), 1, len(groups), fill=False, edgecolor=FRONT, lw=2.2))
        ticks = sorted({t for t in ticks if abs(t - best) >= max(1, step * 0.6)} | {best})
    labels = [f"#{done[t].number + 1}" + (" best" if t == best else "") for t in ticks]
    ax.set_xticks(ticks, labels, rotation=90, fontsize=7)
    if best is not None:
        ax.get_xticklabels()[ticks.index(best)].set_color(FRONT)
    ax.set_yticks(range(len(groups)), groups, fontsize=7 if len(groups) <= 40 else 5)
    ax.set_xlabel("completed trial (#number, in the order the trials started)")
    ax.set_ylabel("group (network order)")
    mark = f"; best trial #{done[best].number + 1} outlined" if best is not None else ""
    ax.set_title(f"pruned fraction per group across {len(done)} completed trials{mark}", fontsize=10)
    return fig
