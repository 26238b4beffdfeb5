"""``autoprune.tracking.store``: params as the UI shows them, batched logging, the links to a
search's runs table, the searches of a store and the search run's system metrics. (The
tracking-URI checks are in tests/test_bad_input.py.)"""

from __future__ import annotations

import time

import pytest

from autoprune.tracking import store, view


@pytest.fixture(scope="module")
def uri(tmp_path_factory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('store') / 'mlflow.db'}"


def test_flat_params_round_floats_and_drop_what_says_nothing():
    config = {
        "budget": {"kind": "flops", "fraction": 0.5, "tolerance": 0.005},
        "address": None,
        "progress": True,
        "storage": "/somewhere",
        "resume": False,
        "tracking_uri": "sqlite:///x.db",
        "engine": {"progress": False, "seed": 0, "measure": {"batch_sizes": [1, 8]}, "cache_dir": None},
        "lr": 0.0123456789,
        "big": 123456789.0,
        "keep": [],
        "weights": [0.333333333, 2],
        "options": {},
    }
    params = store.flat_params("", config, skip=store.SEARCH_NOISE)
    assert params == {
        "budget.kind": "flops",
        "budget.fraction": "0.5",
        "budget.tolerance": "0.005",
        "engine.seed": "0",
        "engine.measure.batch_sizes": "[1, 8]",
        "lr": "0.01235",
        "big": "1.235e+08",
        "weights": "[0.3333, 2]",
    }
    assert store.flat_params("policy", {"ratios": {"a": 0.25}}) == {"policy.ratios.a": "0.25"}
    assert store.param_value(True) == "true" and store.param_value(False) == "false"
    assert store.param_value("x" * 7000) == "x" * store.MAX_PARAM


def test_metrics_keep_four_significant_digits_and_whole_counts(uri):
    mlflow = store.client(uri)
    _, run_id = store.open_search_run(uri, "digits", {}, resume=False)
    store.log(mlflow, run_id, once={"val_acc": 0.98958333, "flops": 2242306.0, "ms": 0.45906985, "big": 12345.678})
    metrics = mlflow.get_run(run_id).data.metrics
    assert metrics == {"val_acc": 0.9896, "flops": 2242306.0, "ms": 0.4591, "big": 12350.0}


def test_log_puts_single_values_at_step_0_and_batches_past_mlflows_limits(uri):
    mlflow = store.client(uri)
    experiment_id, run_id = store.open_search_run(uri, "batches", {}, resume=False)
    params = {f"p{i}": str(i) for i in range(250)}
    once = {f"m{i}": float(i) for i in range(1100)}
    store.log(mlflow, run_id, {"val_acc": 0.5, "flag": True, "text": "no"}, params, {"t": "v"}, step=3, once=once)
    run = mlflow.get_run(run_id)
    assert len(run.data.params) == 250 and run.data.tags["t"] == "v"
    assert len([k for k in run.data.metrics if k.startswith("m")]) == 1100
    assert "flag" not in run.data.metrics and "text" not in run.data.metrics  # numbers only
    assert [m.step for m in mlflow.get_metric_history(run_id, "val_acc")] == [3]
    assert [m.step for m in mlflow.get_metric_history(run_id, "m1099")] == [0]


def test_runs_link_opens_the_model_training_runs_table():
    assert (
        view.runs_link("7")
        == "http://127.0.0.1:5000/#/experiments/7/runs?viewStateShareKey=trials&workflowType=machine_learning"
    )
    assert view.runs_link("7", "localhost", 8080).startswith("http://localhost:8080/#/experiments/7/runs?")
    assert view.runs_link("7", "::1", 5000).startswith("http://[::1]:5000/#/")
    assert "0.0.0.0" not in view.runs_link("7", "0.0.0.0", 5000)  # a browser reaches the machine by name
    assert (
        view.runs_link("3", server="http://mlflow.example:5000/")
        == "http://mlflow.example:5000/#/experiments/3/runs?viewStateShareKey=trials&workflowType=machine_learning"
    )


def test_search_experiments_lists_the_searches_newest_first(uri):
    mlflow = store.client(uri)
    mlflow.create_experiment("not-a-search")
    ids = []
    for name in ("older", "newer"):
        ids.append(store.open_search_run(uri, f"list-{name}", {}, resume=False)[0])
        time.sleep(0.01)
    found = [(e, n) for e, n in store.search_experiments(uri, limit=100) if n.startswith(("list-", "not-a"))]
    assert found == [(ids[1], "list-newer"), (ids[0], "list-older")]
    assert len(store.search_experiments(uri, limit=1)) == 1


def test_system_metrics_are_logged_on_the_search_run_until_stopped(uri, monkeypatch):
    monkeypatch.setattr(store, "SYSTEM_METRICS_S", 0.2)
    mlflow = store.client(uri)
    _, run_id = store.open_search_run(uri, "system", {}, resume=False)
    monitor = store.SystemMetrics(uri, run_id).start()
    deadline = time.time() + 30
    while not any(k.startswith("system/") for k in mlflow.get_run(run_id).data.metrics):
        assert time.time() < deadline, "no system metrics after 30 s"
        time.sleep(0.2)
    monitor.stop()
    monitor.stop()  # every exit path stops it: a second stop is harmless
    metrics = mlflow.get_run(run_id).data.metrics
    assert "system/cpu_utilization_percentage" in metrics and "system/system_memory_usage_megabytes" in metrics
    count = len(mlflow.get_metric_history(run_id, "system/cpu_utilization_percentage"))
    time.sleep(0.6)
    assert len(mlflow.get_metric_history(run_id, "system/cpu_utilization_percentage")) == count  # stopped


def test_a_run_shorter_than_the_sampling_interval_gets_its_system_metrics(uri):
    mlflow = store.client(uri)
    _, run_id = store.open_search_run(uri, "short", {}, resume=False)
    monitor = store.SystemMetrics(uri, run_id).start()  # samples every 10 s
    time.sleep(0.5)
    monitor.stop()
    assert len(mlflow.get_metric_history(run_id, "system/cpu_utilization_percentage")) == 1


def test_system_metrics_that_cannot_start_warn_and_the_search_goes_on(uri, monkeypatch, capsys):
    import mlflow.system_metrics.system_metrics_monitor as monitor_module

    def broken(*args, **kwargs):
        raise RuntimeError("no psutil here")

    monkeypatch.setattr(monitor_module, "SystemMetricsMonitor", broken)
    monitor = store.SystemMetrics(uri, "0" * 32).start()
    monitor.stop()
    assert "no system metrics for the search run (RuntimeError: no psutil here)" in capsys.readouterr().err
