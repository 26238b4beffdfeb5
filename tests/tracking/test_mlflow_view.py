"""What the MLflow UI shows of a default search, read back over the REST API of a real
`autoprune ui` (the MLflow server) against the search's SQLite store: the deep link to the
runs table, which trial won and why, run names, params, metrics and their steps, charts,
system metrics and the registered best model."""

from __future__ import annotations

import re
import urllib.request

import pytest

pytestmark = pytest.mark.slow

LINK = "/#/experiments/{}/runs?workflowType=machine_learning"
NOISE = ("address", "progress", "engine.progress", "storage", "resume", "tracking_uri")


@pytest.fixture(scope="module")
def runs(viewed, rest):
    """The search's runs as the server gives them: (parent, children)."""
    found = rest("/api/2.0/mlflow/runs/search", {"experiment_ids": [viewed.result.experiment_id], "max_results": 100})
    parents = [r for r in found["runs"] if _tags(r).get("autoprune.role") == "search"]
    children = [r for r in found["runs"] if _tags(r).get("autoprune.role") == "trial"]
    assert len(parents) == 1 and len(children) == 6
    return parents[0], children


def _tags(run: dict) -> dict[str, str]:
    return {t["key"]: t["value"] for t in run["data"].get("tags", [])}


def _params(run: dict) -> dict[str, str]:
    return {p["key"]: p["value"] for p in run["data"].get("params", [])}


def _metrics(run: dict) -> dict[str, float]:
    return {m["key"]: m["value"] for m in run["data"].get("metrics", [])}


def _steps(rest, run: dict, key: str) -> list[int]:
    history = rest("/api/2.0/mlflow/metrics/get-history", run_id=run["info"]["run_id"], metric_key=key)
    return [int(m.get("step", 0)) for m in history.get("metrics", [])]


def test_search_and_ui_print_the_link_to_the_runs_table(viewed, ui):
    eid = viewed.result.experiment_id
    assert f"autoprune ui --tracking-uri {viewed.uri}" in viewed.printed
    assert "http://127.0.0.1:5000" + LINK.format(eid) in viewed.printed  # `autoprune ui`'s defaults
    assert f"view: http://127.0.0.1:{ui.port}" + LINK.format(eid) in ui.printed
    # quiet: no dependency's deprecation notice, no log line a request, no registry-store note
    assert not any(word in ui.printed for word in ("Warning", "INFO", "Registry store")), ui.printed
    # the link opens the UI: the part before '#' is the server's root, the UI page
    with urllib.request.urlopen(ui.base + "/", timeout=20) as reply:
        page = reply.read().decode(errors="replace")
    assert reply.status == 200 and "<html" in page.lower() and "mlflow" in page.lower()


def test_the_best_trial_is_tagged_and_the_search_run_says_why(viewed, runs):
    parent, children = runs
    eid, tags = viewed.result.experiment_id, _tags(parent)
    [best] = [c for c in children if _tags(c).get("autoprune.best") == "true"]
    assert tags["autoprune.best_run_id"] == best["info"]["run_id"]
    assert (
        tags["autoprune.best_trial_id"]
        == _tags(best)["autoprune.trial_id"]
        == viewed.result.summary["best"]["trial_id"]
    )
    note = tags["mlflow.note.content"]
    assert viewed.result.summary["uniform_matched"]["verdict"][1:] in note  # what the search gained, or not
    assert f"[{best['info']['run_name']}](#/experiments/{eid}/runs/{best['info']['run_id']})" in note
    for row in ("| validation accuracy |", "| test accuracy |", "| FLOPs |", "| params |", "| latency", "| speed-up |"):
        assert row in note, row
    tally = viewed.result.summary["trials"]
    assert "FLOPs at most 0.5 of dense" in note and "tpe on space `default`" in note
    assert f"{tally['completed']} completed, {tally['stopped_early']} stopped early" in note
    assert f"{tally['failed']} failed" in note


def test_child_runs_are_named_by_what_they_are(runs):
    _, children = runs
    names = sorted(c["info"]["run_name"] for c in children)
    form = r"((uniform|global) baseline: )?(channel|unstructured)/[a-z_0-9]+/(global|local|per_layer) #[1-6]"
    assert all(re.fullmatch(form, n) for n in names), names
    assert sum(" baseline: " in n for n in names) == 2  # the baselines say what they are
    assert sorted(int(n.rsplit("#", 1)[1]) for n in names) == [1, 2, 3, 4, 5, 6]
    for c in children:
        tags = _tags(c)
        assert tags["ray.trial_id"] == tags["autoprune.trial_id"]
        assert c["info"]["run_name"].endswith(f"#{tags['autoprune.trial_number']}")


def test_cost_is_logged_once_for_every_pruned_trial_and_epochs_as_steps(viewed, runs, rest):
    _, children = runs
    stopped = 0
    for child in children:
        metrics, tags = _metrics(child), _tags(child)
        assert any(k.startswith("realised_pruned_fraction.") for k in metrics)
        for key in ("flops", "params", "flops_ratio", "params_ratio", "trial_wall_s"):
            assert _steps(rest, child, key) == [0], key
        [realised] = [k for k in metrics if k.startswith("realised_pruned_fraction.")][:1]
        assert _steps(rest, child, realised) == [0]
        if tags["autoprune.stopped_early"] == "true":  # by ASHA after epoch 1
            stopped += 1
            assert _steps(rest, child, "val_acc") == [1] and "predicted_speedup" not in metrics
            assert _steps(rest, child, "latency_predicted_ms") == [0]  # predicted once pruned
            continue
        assert metrics["flops_ratio"] <= 0.5 + 1e-9
        assert sorted(_steps(rest, child, "val_acc")) == [1, 2] and sorted(_steps(rest, child, "loss")) == [1, 2]
        assert sorted(_steps(rest, child, "val_loss")) == [1, 2]
        for key in ("latency_predicted_ms", "predicted_speedup", "latency_measured_ms", "engine_s", "report_s"):
            assert _steps(rest, child, key) == [0], key
    assert stopped == viewed.result.summary["trials"]["stopped_early"]


def test_params_name_requested_and_realised_apart_and_leave_out_noise(runs, rest):
    parent, children = runs
    for child in children:
        params = _params(child)
        assert params["policy.structure"] in ("channel", "unstructured") and params["policy.criterion"]
        assert all(k.startswith("policy.") or k in ("budget_fraction", "space_error") for k in params), params
        if params["policy.scope"] == "per_layer":
            assert any(k.startswith("policy.ratios.") for k in params)
    params = _params(parent)
    assert params["budget.kind"] == "flops" and params["budget.fraction"] == "0.5" and params["searcher"] == "tpe"
    assert not set(NOISE) & set(params)
    assert not [k for k in params if k.startswith("dense.")]
    for key, value in params.items():  # numbers shown to 4 significant digits at most
        if re.fullmatch(r"-?\d+\.\d+", value):
            assert len(value.replace("-", "").replace(".", "").lstrip("0")) <= 4, (key, value)
    metrics = _metrics(parent)
    for key in (
        "dense_val_acc",
        "dense_test_acc",
        "dense_flops",
        "dense_params",
        "dense_latency_measured_ms",
        "best_val_acc",
    ):
        assert _steps(rest, parent, key) == [0], key
    for key in ("best_latency_predicted_ms", "best_latency_measured_ms", "best_speedup", "best_predicted_speedup"):
        assert key in metrics, key


def test_the_search_run_has_its_charts_model_and_system_metrics(viewed, runs, rest):
    parent, children = runs
    run_id = parent["info"]["run_id"]
    files = {f["path"] for f in rest("/api/2.0/mlflow/artifacts/list", run_id=run_id).get("files", [])}
    assert {"accuracy_vs_cost.png", "criteria.png", "summary.json", "best_model"} <= files
    model_files = {f["path"] for f in rest("/api/2.0/mlflow/artifacts/list", run_id=run_id, path="best_model")["files"]}
    assert "best_model/model.pt" in model_files  # the search's own model stays an artifact
    for child in children:
        listed = rest("/api/2.0/mlflow/artifacts/list", run_id=child["info"]["run_id"]).get("files", [])
        assert {"policy.json", "ratios.png"} <= {f["path"] for f in listed}
    # the registered MLflow model, logged into the search run
    registered = rest("/api/2.0/mlflow/registered-models/search", filter="name='autoprune-view'")["registered_models"]
    [version] = registered[0]["latest_versions"]
    assert version["run_id"] == run_id and version["source"].startswith("models:/")
    logged = rest("/api/2.0/mlflow/logged-models/search", {"experiment_ids": [viewed.result.experiment_id]})
    [model] = logged["models"]
    assert model["info"]["name"] == "best_model" and model["info"]["source_run_id"] == run_id
    # system metrics, sampled while the search ran
    metrics = _metrics(parent)
    assert "system/cpu_utilization_percentage" in metrics and "system/system_memory_usage_megabytes" in metrics
    assert parent["info"]["status"] == "FINISHED"
