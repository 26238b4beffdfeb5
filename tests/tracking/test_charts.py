"""The search's charts and the search run's description, built from TrialRecords (completed,
stopped and failed trials; every trial on the budget) and inspected as matplotlib figures."""

from __future__ import annotations

import pytest

from autoprune.contract import TrialRecord
from autoprune.search.results import pareto_front
from autoprune.tracking import charts, study_charts

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


def _collection(ax, prefix: str):
    """The one scatter on ``ax`` whose legend label starts with ``prefix``."""
    [found] = [c for c in ax.collections if c.get_label().startswith(prefix)]
    return found


def _xy(collection) -> set[tuple[float, float]]:
    return {(round(float(x), 6), round(float(y), 6)) for x, y in collection.get_offsets()}


def _no_overlap(fig) -> None:
    """No two texts inside one panel overlap once drawn."""
    fig.canvas.draw()
    for ax in fig.axes:
        boxes = [t.get_window_extent() for t in ax.texts if t.get_visible()]
        for i, a in enumerate(boxes):
            assert not any(a.overlaps(b) for b in boxes[i + 1 :]), [t.get_text() for t in ax.texts]


def _shaped(number, status, val_acc, latency, params):
    """A trial with the latency and parameter fractions given (FLOPs on the 0.5 budget)."""
    return _record(number, status, "snip", val_acc, latency, params)


def _fronts() -> list[TrialRecord]:
    """#1 leads on latency and is the most accurate, #2 leads on parameters, #3 is cheapest in
    latency, #4 is beaten everywhere, #5 was stopped at 70 %."""
    return [
        _shaped(0, "completed", 0.97, 0.50, 0.70),
        _shaped(1, "completed", 0.96, 0.60, 0.40),
        _shaped(2, "completed", 0.95, 0.45, 0.65),
        _shaped(3, "completed", 0.94, 0.70, 0.60),
        _shaped(4, "stopped", 0.70, 0.55, 0.50),
    ]


def test_each_panel_rings_the_front_of_its_own_axes():
    records = _fronts()
    # the search's front (trial #4 here) is not what the panels ring
    fig = charts.accuracy_vs_cost(records, DENSE, front=["t3"], budget=0.5, kind="flops", flops_panel=True)
    latency, params, flops = fig.axes
    ring = "Pareto front of the panel"
    assert _xy(_collection(latency, ring)) == {(0.50, 97.0), (0.45, 95.0)}
    assert _xy(_collection(params, ring)) == {(0.70, 97.0), (0.40, 96.0)}
    assert _xy(_collection(flops, ring)) == {(0.5, 97.0)}  # every trial at 0.5: the most accurate one
    # the same fronts as the search's own Pareto code finds on those two objectives
    for ax, key in ((latency, "latency_ratio"), (params, "params_ratio"), (flops, "flops_ratio")):
        front = pareto_front(records, (("val_acc", "max"), (key, "min")))
        assert _xy(_collection(ax, ring)) == {(r.metrics[key], 100 * r.metrics["val_acc"]) for r in front}
    # only the ringed trials and dense are labelled
    assert set(_texts(latency)) == {"#1", "#3", "dense"}
    assert set(_texts(params)) == {"#1", "#2", "dense"}


def test_the_accuracy_axis_is_zoomed_to_the_completed_trials_and_dense():
    fig = charts.accuracy_vs_cost(_fronts(), DENSE, budget=0.5, kind="flops")
    latency, params = fig.axes
    lo, hi = latency.get_ylim()
    assert 92.0 < lo < 94.0 and 98.0 < hi < 99.0  # 94..98 % with a margin; the 70 % trial is not in it
    # the stopped trial is drawn at the axis' lower edge, inside it, and counted in the legend
    edge = _collection(params, "stopped early, off the axis: 1")
    [(x, y)] = edge.get_offsets()
    assert x == 0.50 and lo < y < lo + 0.05 * (hi - lo)
    assert not [c for c in params.collections if c.get_label().startswith("stopped early (score")]
    labels = {t.get_text() for t in params.get_legend().get_texts()}
    assert {"completed trial", "dense", "stopped early, off the axis: 1 (at its edge)"} <= labels
    fig.canvas.draw()


def test_accuracy_vs_cost_shows_latency_and_params_when_every_trial_is_on_the_budget():
    fig = charts.accuracy_vs_cost(_records(), DENSE, front=["t2"], budget=0.5, kind="flops")
    latency, params = fig.axes
    assert latency.get_xlabel() == LATENCY_LABEL
    assert params.get_xlabel() == "parameters kept (fraction of dense)"
    assert latency.get_ylabel() == "validation accuracy (%)"
    xs = sorted(x for c in latency.collections for x, _ in c.get_offsets())
    assert min(xs) < max(xs)  # not degenerate: the latencies differ
    # trial #3 (97 %, cheapest in both) is the front of both panels
    assert set(_texts(latency)) == set(_texts(params)) == {"#3", "dense"}
    assert "3 completed, 2 stopped early, 1 failed" in fig.get_suptitle()
    fig.canvas.draw()


def test_accuracy_vs_cost_keeps_the_flops_axis_for_the_multi_objective_searchers():
    fig = charts.accuracy_vs_cost(_records(), DENSE, budget=0.5, kind="flops", flops_panel=True)
    assert [ax.get_xlabel() for ax in fig.axes[:3]] == [
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
    lo, hi = fig.axes[0].get_ylim()
    assert lo < 60.0 < hi  # with nothing completed, the stopped trial sets the axis
    fig.canvas.draw()


def test_labels_never_overlap_on_a_crowded_search():
    records = _amc(150)
    fig = charts.accuracy_vs_cost(records, DENSE, budget=0.5, kind="flops", flops_panel=True)
    _no_overlap(fig)
    for ax in fig.axes[:3]:  # every label is a ringed trial or dense
        ringed = len(_collection(ax, "Pareto front").get_offsets())
        assert 1 <= len(ax.texts) <= ringed + 1


def test_criteria_chart_groups_every_criterion_by_scope_on_a_zoomed_axis():
    records = _records() + [
        _record(6, "completed", "snip", 0.986, scope="local"),
        _record(7, "completed", "magnitude", 0.997, scope="local"),
        _record(8, "stopped", "snip", 0.70, scope="local"),
    ]
    fig = charts.criteria_chart(records, DENSE["val_acc"])
    [ax] = fig.axes
    ticks = [t.get_text() for t in ax.get_xticklabels()]
    assert ticks == ["magnitude\n(2/2)", "snip\n(3/5)", "fpgm\n(0/1)", "random\n(0/1)"]
    lo, hi = ax.get_ylim()
    assert 94.0 < lo < 95.0 and 99.7 < hi < 101.0  # 95..99.7 % and dense, not 0..100 nor down to 70
    bars = {p.get_label(): [] for p in ax.containers}
    for container in ax.containers:
        bars[container.get_label()] = [(round(b.get_x() + b.get_width() / 2, 3), b.get_height()) for b in container]
    # one bar per scope tried, beside each other under its criterion: magnitude, then snip
    assert set(bars) == {"scope local", "scope global"}
    [(x_mag_local, h1), (x_snip_local, h2)] = bars["scope local"]
    [(x_mag_global, h3), (x_snip_global, h4)] = bars["scope global"]
    assert (h1, h2, h3, h4) == pytest.approx((99.7, 98.6, 97.0, 96.0))
    assert x_mag_local < x_mag_global < x_snip_local < x_snip_global < 2
    assert round(x_mag_global - x_mag_local, 3) == round(x_snip_global - x_snip_local, 3)
    # the trial counts above the bars: snip/global completed 2 of its 3 (one stopped)
    assert any(t.endswith("\n2/3") for t in _texts(ax)) and any(t.endswith("\n1/2") for t in _texts(ax))
    assert "best completed trial" in ax.get_title()
    _no_overlap(fig)


def test_criteria_chart_is_none_when_one_criterion_was_tried():
    assert charts.criteria_chart(_amc(20), DENSE["val_acc"]) is None
    assert charts.criteria_chart([], DENSE["val_acc"]) is None


def test_zoom_and_pareto_helpers():
    assert charts.zoom([98.6, 99.7], "val_acc") == pytest.approx((98.512, 99.788))
    lo, hi = charts.zoom([97.0], "val_acc")  # one value: half a point around it
    assert lo < 97.0 < hi and hi - lo == pytest.approx(0.5 * 1.16)
    points = [(0.5, 97.0), (0.6, 96.0), (0.45, 95.0), (0.45, 95.0)]
    assert charts.pareto(points, "max") == [0, 2, 3]  # equal points do not dominate each other
    assert charts.pareto(points, "min") == [2, 3]  # lower is better: the cheapest is also the best


GROUPS = ["conv1", "layer1.0", "layer1.1", "layer2.0", "layer2.1", "layer3.0", "layer3.1", "fc"]


def _amc(n: int) -> list[TrialRecord]:
    """The AMC agent's episodes: one criterion, per-group ratios that settle as it learns, the
    accuracy after BN recalibration (no fine-tuning) and a reward that follows it."""
    out = []
    for i in range(n):
        settled = min(1.0, i / (0.6 * n))
        ratios = {
            g: round((1 - settled) * ((i * 7 + k * 13) % 10) / 12 + settled * (0.2 + 0.1 * (k % 4)), 4)
            for k, g in enumerate(GROUPS)
        }
        flops = 1 - sum(ratios.values()) / len(ratios)
        acc = 0.10 + 0.85 * settled - 0.05 * ((i * 11) % 7) / 7
        policy = {
            "structure": "channel",
            "criterion": "magnitude",
            "scope": "per_layer",
            "ratios": ratios,
            "exact": True,
            "finetune": {"epochs": 0, "bn_recalibrate": 50},
        }
        metrics = {
            "val_acc": acc,
            "recal_acc": acc,
            "reward": -(1 - acc) * 10 * flops,
            "flops_ratio": flops,
            "params_ratio": 0.9 * flops,
            "latency_ratio": 0.3 + 0.7 * flops,
            "latency_predicted_ms": 0.3 + 0.7 * flops,
        }
        out.append(TrialRecord(i, f"a{i}", "completed", policy, None, metrics, dict(ratios)))
    return out


def _tpe(n: int = 40) -> list[TrialRecord]:
    """A search over every criterion x scope x BN warm-up in turn where the criterion decides
    the accuracy (taylor best, random worst; the rest is noise of 0.2 points at most); every
    fifth trial is stopped at 70-74 %, every seventeenth fails, the first two are baselines."""
    crit = {"magnitude": 0.985, "random": 0.960, "fpgm": 0.990, "taylor": 0.995}  # tried in this order
    out = []
    for i in range(n):
        cell = i % 16
        name = list(crit)[cell // 4]
        status = "failed" if i % 17 == 16 else "stopped" if i % 5 == 3 else "completed"
        acc = 0.70 + 0.01 * (i % 5) if status == "stopped" else crit[name] - 0.002 * ((i * 37) % 11) / 10
        r = _record(
            i,
            status,
            name,
            acc,
            0.5 + 0.01 * (i % 7),
            0.4 + 0.02 * (i % 9),
            scope=["global", "local"][cell % 2],
            bn_warmup=(cell // 2) % 2 == 0,
        )
        r.baseline = ["uniform", "global"][i] if i < 2 else None
        out.append(r)
    return out


def test_history_steps_up_through_the_best_so_far_and_zooms_past_stopped_trials():
    records = _tpe()
    fig = study_charts.optimisation_history(records, dense=DENSE["val_acc"])
    [ax] = fig.axes
    done = [r for r in records if r.status == "completed"]
    stopped = [r for r in records if r.status == "stopped"]
    accs = [100 * r.metrics["val_acc"] for r in done]
    [best] = [line for line in ax.lines if line.get_label() == "best so far"]
    ys = list(best.get_ydata())
    assert ys == sorted(ys) and ys[-1] == pytest.approx(max(accs))  # never falls; ends at the best trial
    assert len(set(ys)) > 2  # it does step up
    assert list(best.get_xdata())[-1] == 40  # drawn to the last trial
    assert len(_collection(ax, "completed trial").get_offsets()) == len(done)
    lo, hi = ax.get_ylim()
    assert min(accs) - 0.5 < lo < min(accs) and max(accs) < hi < max(accs) + 0.5  # not down to 70 %
    edge = _collection(ax, f"stopped early, off the axis: {len(stopped)}")
    assert edge.get_alpha() < 1  # faded
    assert sorted(x for x, _ in edge.get_offsets()) == [r.number + 1 for r in stopped]
    [baselines] = [c for c in ax.collections if c.get_paths() and c.get_sizes()[0] == 90]
    assert baselines.get_offsets()[:, 0].tolist() == [1.0, 2.0]
    assert baselines.get_offsets()[:, 1].tolist() == pytest.approx(accs[:2])
    failed = len(records) - len(done) - len(stopped)
    assert f"{len(done)} completed, {len(stopped)} stopped early, {failed} failed" in ax.get_title()
    fig.canvas.draw()


def test_history_follows_a_metric_where_lower_is_better():
    records = [_record(i, "completed", "snip", None) for i in range(6)]
    for r, rmse in zip(records, [3.0, 3.5, 2.0, 2.5, 1.5, 4.0]):
        r.metrics = {"val_rmse": rmse}
    [ax] = study_charts.optimisation_history(records, score="val_rmse").axes
    [best] = [line for line in ax.lines if line.get_label() == "best so far"]
    assert list(best.get_ydata()) == [3.0, 3.0, 2.0, 2.0, 1.5, 1.5, 1.5]
    assert ax.get_ylabel() == "validation RMSE"  # not a percentage


def test_importance_ranks_the_fields_that_varied_with_optuna():
    records = _tpe()
    values, evaluator = study_charts.param_importances(records)
    assert set(values) == {"criterion", "scope", "bn_warmup"}  # structure never varied
    assert all(v >= 0 for v in values.values()) and sum(values.values()) == pytest.approx(1.0)
    assert max(values, key=values.get) == "criterion"
    fig = study_charts.importance(records)
    [ax] = fig.axes
    assert [t.get_text() for t in ax.get_yticklabels()] == list(values)  # most important on top
    assert ax.yaxis_inverted() and f"Optuna {evaluator}" in ax.get_title()
    assert [p.get_width() for p in ax.patches] == pytest.approx(list(values.values()))
    fig.canvas.draw()


def test_importance_weighs_the_agents_per_group_ratios():
    values, _ = study_charts.param_importances(_amc(60))
    assert set(values) == {f"ratios.{g}" for g in GROUPS}  # criterion, scope, finetune never varied
    assert sum(values.values()) == pytest.approx(1.0)


def test_importance_needs_trials_and_two_varying_fields():
    records = _tpe()
    assert study_charts.importance([r for r in records if r.status == "completed"][:3]) is None
    same = [r for r in records if r.policy["criterion"] == "taylor" and r.policy["bn_warmup"] is False]
    assert len([r for r in same if r.status == "completed"]) >= 4
    assert study_charts.importance(same) is None  # only the scope varies


def test_reward_chart_follows_the_agents_episodes():
    records = _amc(150)
    fig = study_charts.reward_chart(records)
    top, bottom = fig.axes
    assert "150 episodes" in top.get_title() and top.get_ylabel() == "reward"
    [average] = [line for line in top.lines if line.get_label().startswith("moving average")]
    window = int(average.get_label().split("(")[1].split()[0])
    rewards = [r.metrics["reward"] for r in records]
    assert len(average.get_ydata()) == 150
    assert average.get_ydata()[-1] == pytest.approx(sum(rewards[-window:]) / window)
    assert bottom.get_ylabel() == "validation accuracy (%)"
    assert [line.get_label() for line in bottom.lines] == [
        "validation accuracy (= after BN recalibration), moving average"
    ]
    _no_overlap(fig)
    assert study_charts.reward_chart(_tpe()) is None


def test_group_ratios_heatmap_has_a_row_per_group_and_a_column_per_completed_trial():
    records = _amc(150)
    records[5].status = "stopped"
    fig = study_charts.group_ratios(records, best_trial_id="a120")
    ax = fig.axes[0]
    [image] = ax.images
    grid = image.get_array()
    assert grid.shape == (len(GROUPS), 149)
    assert [t.get_text() for t in ax.get_yticklabels()] == GROUPS
    assert grid[3, 6] == records[7].ratios["layer2.0"]  # column 6: trial #8, #6 was stopped
    assert image.get_clim() == (0, 1)
    [outline] = ax.patches
    assert outline.get_x() == 119 - 0.5  # #121 is column 119
    assert "#121 best" in [t.get_text() for t in ax.get_xticklabels()]
    _no_overlap(fig)
    assert study_charts.group_ratios([_record(0, "failed", "snip", None)]) is None


def test_every_chart_draws_for_a_search_of_20_to_150_trials(tmp_path):
    for records in (_tpe(20), _tpe(150), _amc(150)):
        figs = [
            charts.accuracy_vs_cost(records, DENSE, budget=0.5, kind="flops"),
            charts.criteria_chart(records, DENSE["val_acc"]),
            study_charts.optimisation_history(records),
            study_charts.importance(records),
            study_charts.reward_chart(records),
            study_charts.group_ratios(records, records[-1].trial_id),
        ]
        for fig in filter(None, figs):
            fig.savefig(tmp_path / "chart.png")
            _no_overlap(fig)


def test_ratio_charts_go_to_every_pruned_trials_run():
    logged = []

    class Client:
        def log_figure(self, run_id, fig, name):
            logged.append((run_id, name, fig.axes[0].get_title()))

    charts.ratio_charts(Client(), _records())
    assert [r for r, _, _ in logged] == ["run0", "run1", "run2", "run4", "run5"]
    assert logged[1] == ("run1", "ratios.png", "#2 snip/global: pruned fraction reached")
