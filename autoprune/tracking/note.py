"""The descriptions a search leaves in the MLflow UI (markdown): the search run's (which
trial won and why, dense against the best model, the budget, the searcher and how the trials
ended), the experiment's (the outcome in one line, above the runs table) and the registered
model version's; their links to runs stay in the UI's model-training view."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..contract import TrialRecord, show_metric, task_metric_keys
from ..report import fmt_count, metric_difference, metric_keys, metric_label
from .view import run_link


def _ratio(dense: float | None, best: float | None) -> str:
    return f"{best / dense:.3f}x" if dense and best is not None else ""


@dataclass(frozen=True)
class Outcome:
    """What a search's descriptions are written from."""

    summary: dict[str, Any]  # what summary.json holds (name, budget, searcher, space, metric, scheduler, trials)
    dense: dict[str, Any]  # the dense model's metrics
    best: TrialRecord | None  # the trial picked (None: none was)
    pruned: dict[str, Any] | None  # the final model's metrics
    final_epochs: int
    experiment_id: str
    within_budget: int  # how many completed trials met the budget


def search_note(o: Outcome, epochs: int = 0, charts: tuple[str, ...] = ()) -> str:
    """The markdown description of a search run; ``epochs``: each trial's; ``charts``: the
    charts logged beside it."""
    summary, dense, best, pruned = o.summary, o.dense, o.best, o.pruned
    final_epochs, experiment_id, within_budget = o.final_epochs, o.experiment_id, o.within_budget
    budget, tally = summary["budget"], summary["trials"]
    kind = {"flops": "FLOPs", "params": "parameters"}.get(budget["kind"], budget["kind"])
    agent = summary.get("metric") == "reward"  # an agent's episodes, ranked on their reward
    lines = [f"## autoprune search `{summary['name']}`", ""]
    if best is None or pruned is None:
        lines.append(
            f"**No trial was picked**: {tally['completed']} completed, none within the budget."
            if tally["completed"]
            else "**No trial was picked**: no trial completed."
        )
    else:
        lines.append(f"**Best: {_picked(best, experiment_id, within_budget, epochs, agent)}")
        lines[-1] += (
            f" It was then re-run from the dense model for {final_epochs} epoch(s) and tested once (the table)."
        )
        matched = summary.get("uniform_matched")
        if matched:
            lines += ["", f"**{matched['verdict'][0].upper()}{matched['verdict'][1:]}.**"]
    searcher = (
        f"{summary['searcher']} (an agent ranking its episodes by reward)"
        if agent
        else f"{summary['searcher']} on space `{summary['space']}`, scheduler {summary['scheduler']}"
    )
    lines += [
        "",
        f"- **budget**: {kind} at most {budget['fraction']:g} of dense",
        f"- **searcher**: {searcher}",
        f"- **trials**: {tally['total']}: {tally['completed']} completed, {tally['stopped_early']} stopped early "
        f"by the scheduler, {tally['failed']} failed; {epochs} fine-tuning epoch(s) each",
        f"- **task**: {summary.get('task', '?')} ({summary.get('model', '?')})",
    ]
    if best is not None and pruned is not None:
        rows = _rows(dense, pruned)
        lines += ["", "| | dense | best | best / dense |", "|---|---:|---:|---:|"]
        lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    shown = ", ".join(f"`{c}`" for c in charts) or "none"
    space = "" if agent else "; the search space: `search_space.json`"
    lines += ["", f"Charts (Artifacts tab): {shown}{space}; the model: `best_model/` and the Models tab."]
    return "\n".join(lines) + "\n"


def _picked(best: TrialRecord, experiment_id: str, within: int, epochs: int, agent: bool) -> str:
    """Which trial won and on what: ``[#4 snip/global](link)** (Ray trial ..., sampled): ...``."""
    name = f"[{best.label}]({run_link(experiment_id, best.run_id)})" if best.run_id else best.label
    after = f"after {epochs} fine-tuning epoch(s)" if epochs else "before any fine-tuning"
    if agent:
        reward = best.metrics.get("reward")
        return (
            f"{name}** (Ray trial `{best.trial_id}`): the highest reward"
            + (f", {reward:.3f}," if reward is not None else "")
            + f" among the {within} completed episode(s) within the budget ({_score_phrase(best.metrics)} "
            f"{after})."
        )
    what = f"the uniform-pruning baseline ({best.baseline})" if best.baseline else "sampled"
    return (
        f"{name}** (Ray trial `{best.trial_id}`, {what}): {_score_phrase(best.metrics)} {after}, chosen among "
        f"the {within} completed trial(s) within the budget (trials within the validation split's noise of the "
        "best are ties, given to the simpler policy; the top ones re-run at the final length)."
    )


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


def version_note(
    search: str, best: TrialRecord, pruned: dict[str, Any], dense: dict[str, Any], experiment_id: str, matched: bool
) -> tuple[str, dict[str, str]]:
    """The registered model version's description (markdown) and tags: which search and
    trial it comes from, its policy, and its figures against dense (timed side by side)."""
    from ..contract import policy_text

    link = f"[{best.label}]({run_link(experiment_id, best.run_id)})" if best.run_id else best.label
    source = (
        f"uniform pruning fine-tuned for the search's whole compute (no trial beat it; the best trial was {link})"
        if matched
        else f"trial {link}, re-run from the dense model"
    )
    figures = "; ".join(f"{_long(k)} {show_metric(k, pruned[k])}" for k in metric_keys(pruned) if k in pruned)
    costs = ", ".join(
        f"{name} {_ratio(dense.get(key), pruned.get(key))}" for name, key in (("FLOPs", "flops"), ("params", "params"))
    )
    speed = f", speed-up {pruned['speedup']:.2f}x timed beside dense" if pruned.get("speedup") else ""
    text = f"Best model of autoprune search `{search}`: {source}.\n\n{figures}; {costs} of dense{speed}.\n"
    tags = {
        "autoprune.search": search,
        "autoprune.trial_id": best.trial_id,
        "autoprune.policy": policy_text(best.policy),
        "autoprune.source": "uniform_matched" if matched else "trial",
        **{k: f"{pruned[k]:.4g}" for k in (*metric_keys(pruned), "speedup") if isinstance(pruned.get(k), float)},
        **{f"{key}_ratio": _ratio(dense.get(key), pruned.get(key)) for key in ("flops", "params")},
    }
    return text, tags


def experiment_note(o: Outcome, run_id: str) -> str:
    """The experiment's description, above its runs table: the outcome in its first line
    (all that shows while it is folded), then where to look; ``run_id``: the search run's."""
    summary, dense, best, pruned, experiment_id = o.summary, o.dense, o.best, o.pruned, o.experiment_id
    budget, tally = summary["budget"], summary["trials"]
    kind = {"flops": "FLOPs", "params": "params"}.get(budget["kind"], budget["kind"])
    what = f"{summary['searcher']}, {tally['total']} trials, {kind} at most {budget['fraction']:g} of dense"
    if best is None or pruned is None:
        return f"**No model**: no completed trial within the budget ({what}).\n"
    matched = (summary.get("uniform_matched") or {}).get("returned")
    who = "uniform pruning, fine-tuned longer" if matched else best.label
    test = [k for k in metric_keys(pruned) if k.startswith("test_")] or metric_keys(pruned)[:1]
    figures = [
        f"{metric_label(k)} {show_metric(k, pruned.get(k))} (dense {show_metric(k, dense.get(k))})" for k in test
    ]
    cost = {"latency": "latency_measured_ms"}.get(budget["kind"], budget["kind"])
    figures.append(f"{kind} {_ratio(dense.get(cost), pruned.get(cost))}")
    if pruned.get("speedup"):
        figures.append(f"{pruned['speedup']:.2f}x faster")
    lines = [
        f"**Best: {who}**: {', '.join(figures)}.",
        "",
        f"- The search: {what}.",
        f"- The search run, with its charts, `summary.json` and the best model: [{summary['name']}]"
        f"({run_link(experiment_id, run_id)})",
        f"- The best trial: [{best.label}]({run_link(experiment_id, best.run_id)})" if best.run_id else "",
        f"- Below: the {tally['completed']} completed trials ({o.within_budget} within the budget), the best "
        f"first; `autoprune.best` marks the one picked (re-run for {o.final_epochs} epoch(s) and tested).",
    ]
    return "\n".join(line for line in lines if line is not None) + "\n"
