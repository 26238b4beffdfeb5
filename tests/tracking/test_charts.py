"""The search's charts and the search run's description, built from TrialRecords (completed,
stopped and failed trials; every trial on the budget) and inspected as matplotlib figures."""

from __future__ import annotations

from autoprune.contract import TrialRecord
from autoprune.tracking import charts
from autoprune.tracking.note import run_link, search_note

LATENCY_LABEL = "latency kept (fraction of dense, as the latency table predicts it)"
DENSE = {"val_acc": 0.98, "test_acc": 0.97, "flops": 2.0e6, "params": 1.0e5, "latency_measured_ms": 1.0}


def _record(number, status, criterion, val_acc, latency=None, params_ratio=0.6, run_id=None, **policy):
    metrics = {"val_acc": val_acc, "flops_ratio": 0.5, "params_ratio": params_ratio, "flops": 1e6, "params": 6e4}
    if status in ("completed", "stopped"):  # pruned: the latency table predicts its latency
        latency = latency or 0.4 + params_ratio / 2
        metrics.update(latency_predicted_ms=latency, latency_ratio=latency / DENSE["latency_measured_ms"])
    if status == "completed":
        metrics.update(predicted_speedup=DENSE["latency_measured_ms"] / latency)
    if status == "failed":
        metrics = {}
    policy = {"structure": "channel", "criterion": criterion, "scope": "global", **policy}
    ratios = {"layer1": 0.4, "layer2": 0.6} if status != "failed" else {}
    return TrialRecord(number, f"t{number}", status, policy, None, metrics, ratios, run_id=run_id or f"run{number}")


def _records() -> list[TrialRecord]:
    """Every trial on the FLOPs budget (0.5): only latency and params tell them apart."""
    return [
        _record(0, "completed", "snip", 0.95, 0.61, 0.55),
        _record(1, "stopped", "snip", 0.60, params_ratio=0.7),
        _record(2, "completed", "magnitude", 0.97, 0.55, 0.5),
        _record(3, "failed", "fpgm", None),
        _record(4, "completed", "snip", 0.96, 0.58, 0.65),
        _record(5, "stopped", "random", 0.30, params_ratio=0.45),
    ]


def _texts(ax) -> list[str]:
    return [t.get_text() for t in ax.texts]


def test_accuracy_vs_cost_shows_latency_and_params_when_every_trial_is_on_the_budget():
    fig = charts.accuracy_vs_cost(_records(), DENSE, front=["t2"], budget=0.5, kind="flops")
    latency, params = fig.axes
    assert latency.get_xlabel() == LATENCY_LABEL
    assert params.get_xlabel() == "parameters kept (fraction of dense)"
    assert latency.get_ylabel() == "validation accuracy (%)"
    # completed trials, stopped ones (hollow: their cost is known) and dense on the latency panel
    assert {"#1", "#2", "#3", "#5", "#6", "dense"} == set(_texts(latency))
    xs = sorted(x for c in latency.collections for x, _ in c.get_offsets())
    assert min(xs) < max(xs)  # not degenerate: the latencies differ
    # on the params panel the stopped trials too, hollow
    assert {"#1", "#2", "#3", "#5", "#6", "dense"} == set(_texts(params))
    [stopped] = [c for c in params.collections if c.get_label().startswith("stopped early")]
    assert len(stopped.get_offsets()) == 2 and stopped.get_facecolors().size == 0  # hollow
    labels = params.get_legend().get_texts()
    assert {"completed trial", "dense", "Pareto front"} <= {t.get_text() for t in labels}
    fig.canvas.draw()  # renders without error


def test_accuracy_vs_cost_keeps_the_flops_axis_for_the_multi_objective_searchers():
    fig = charts.accuracy_vs_cost(_records(), DENSE, budget=0.5, kind="flops", flops_panel=True)
    assert [ax.get_xlabel() for ax in fig.axes] == [
        LATENCY_LABEL,
        "parameters kept (fraction of dense)",
        "FLOPs kept (fraction of dense)",
    ]
    assert any(line.get_label() == "budget 0.5" for line in fig.axes[2].lines)
    fig.canvas.draw()


def test_accuracy_vs_cost_copes_with_no_completed_trial():
    records = [_record(0, "stopped", "snip", 0.6), _record(1, "failed", "fpgm", None)]
    fig = charts.accuracy_vs_cost(records, DENSE)
    assert len(fig.axes) == 2
    fig.canvas.draw()


def test_criteria_chart_says_what_its_bars_are_and_counts_every_criterion_tried():
    fig = charts.criteria_chart(_records(), DENSE["val_acc"])
    [ax] = fig.axes
    ticks = [t.get_text() for t in ax.get_xticklabels()]
    assert ticks == [
        "magnitude (1/1 completed)",
        "snip (2/3 completed)",
        "fpgm (0/1 completed)",
        "random (0/1 completed)",
    ]
    assert ax.get_ylim() == (0.0, 100.0)
    assert ax.get_ylabel() == "validation accuracy (%)"
    assert "bar: best completed trial" in ax.get_title()
    bars = [p.get_height() for p in ax.patches]
    assert bars[:2] == [97.0, 96.0] and bars[2:] == [0.0, 0.0]
    legend = {t.get_text() for t in ax.get_legend().get_texts()}
    assert {"best completed trial", "completed trial", "stopped early (when stopped)"} <= legend
    fig.canvas.draw()


def test_ratio_charts_go_to_every_pruned_trials_run():
    logged = []

    class Client:
        def log_figure(self, run_id, fig, name):
            logged.append((run_id, name, fig.axes[0].get_title()))

    charts.ratio_charts(Client(), _records())
    assert [r for r, _, _ in logged] == ["run0", "run1", "run2", "run4", "run5"]
    assert logged[1] == ("run1", "ratios.png", "channel/snip/global #2: pruned fraction reached")


def test_the_search_note_says_which_trial_won_and_why():
    records = _records()
    summary = {
        "name": "e2e",
        "budget": {"kind": "flops", "fraction": 0.5},
        "searcher": "tpe",
        "space": "default",
        "scheduler": "asha",
        "task": "digits",
        "model": "digits_resnet",
        "trials": {"total": 6, "completed": 3, "stopped_early": 2, "failed": 1},
    }
    pruned = {
        "val_acc": 0.975,
        "test_acc": 0.965,
        "flops": 1e6,
        "params": 5e4,
        "latency_measured_ms": 0.5,
        "speedup": 2.0,
    }
    note = search_note(summary, DENSE, records[2], pruned, 10, "4", 3)
    assert f"[channel/magnitude/global #3]({run_link('4', 'run2')})" in note
    assert run_link("4", "run2") == "#/experiments/4/runs/run2"
    assert "3 completed, 2 stopped early by the scheduler, 1 failed" in note
    assert "FLOPs at most 0.5 of dense" in note and "tpe on space `default`" in note
    assert "| validation accuracy | 98.00% | 97.50% | -0.50 pts |" in note
    assert "| FLOPs | 2.00M | 1.00M | 0.500x |" in note
    assert "| latency, timed side by side | 1.000 ms | 0.500 ms | 0.500x |" in note
    assert "| speed-up | 1.00x | 2.00x |  |" in note
    none = search_note({**summary, "trials": {**summary["trials"], "completed": 0}}, DENSE, None, None, 10, "4", 0)
    assert "no trial completed" in none and "|" not in none
