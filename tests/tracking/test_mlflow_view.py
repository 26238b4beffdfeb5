"""What the MLflow UI shows of a default search, read back over the REST API of a real
`autoprune ui` (the MLflow server) against the search's SQLite store: the deep link to the
runs table, which trial won and why, run names, params, metrics and their steps, charts,
system metrics and the registered best model."""

from __future__ import annotations

import json
import re
import urllib.request

import pytest

pytestmark = pytest.mark.slow

LINK = "/#/experiments/{}/runs?viewStateShareKey=trials&workflowType=machine_learning"
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


def _artifact(ui, run_id: str, path: str) -> str:
    """An artifact's text, as the UI downloads it."""
    with urllib.request.urlopen(f"{ui.base}/get-artifact?path={path}&run_uuid={run_id}", timeout=20) as reply:
        return reply.read().decode()


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


def test_ui_prints_its_links_once_the_server_answers_and_nothing_per_request(viewed):
    import socket
    import subprocess
    import sys
    from pathlib import Path

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    exe = Path(sys.executable).with_name("autoprune")
    proc = subprocess.Popen(
        [str(exe), "ui", "--port", str(port), "--tracking-uri", viewed.uri],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if f"{base}/#/experiments/" in line:  # a link: it opens now
                with urllib.request.urlopen(base + "/health", timeout=2) as reply:
                    assert reply.status == 200
                break
        assert lines and lines[0].startswith("starting the MLflow UI"), lines
        for _ in range(5):  # browsing: the UI's own calls
            urllib.request.urlopen(base + "/ajax-api/2.0/mlflow/experiments/search?max_results=5", timeout=10).read()
    finally:
        proc.terminate()
        rest_of_it = proc.communicate(timeout=60)[0]
    assert not re.search(r"GET /|POST /|HTTP/1\.1", rest_of_it), rest_of_it  # no line per request


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
    link = f"#/experiments/{eid}/runs/{best['info']['run_id']}?workflowType=machine_learning"  # not the GenAI view
    assert f"[{best['info']['run_name']}]({link})" in note
    for row in ("| validation accuracy |", "| test accuracy |", "| FLOPs |", "| params |", "| latency", "| speed-up |"):
        assert row in note, row
    tally = viewed.result.summary["trials"]
    assert "FLOPs at most 0.5 of dense" in note and "tpe on space `default`" in note
    assert f"{tally['completed']} completed, {tally['stopped_early']} stopped early" in note
    assert f"{tally['failed']} failed" in note


def test_child_runs_are_named_by_what_they_are(runs):
    _, children = runs
    names = sorted(c["info"]["run_name"] for c in children)
    # the number first, so that a name the table cuts keeps it: "#4 snip/global"
    policy = r"[a-z_0-9]+/(global|local|per_layer)( masks| x(4|8|16| auto))?"  # masks, or rounded widths
    form = rf"#[1-6] ((uniform|global) baseline \(magnitude/(local|global)\)|{policy})"
    assert all(re.fullmatch(form, n) for n in names), names
    assert sum(" baseline (" in n for n in names) == 2  # the baselines say what they are
    assert sorted(int(n.split()[0][1:]) for n in names) == [1, 2, 3, 4, 5, 6]
    for c in children:
        tags = _tags(c)
        assert tags["ray.trial_id"] == tags["autoprune.trial_id"]
        assert c["info"]["run_name"].startswith(f"#{tags['autoprune.trial_number']} ")


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
            assert _steps(rest, child, "epochs/val_acc") == [1] and "predicted_speedup" not in metrics
            assert _steps(rest, child, "latency_predicted_ms") == [0]  # predicted once pruned
            continue
        assert metrics["flops_ratio"] <= 0.5 + 1e-9
        # the curves over the epochs, under "epochs/" (the run page's first section); the
        # task's metric also as one value, its latest (the runs table's column)
        for key in ("epochs/val_acc", "epochs/loss", "epochs/val_loss"):
            assert sorted(_steps(rest, child, key)) == [1, 2], key
        assert set(_steps(rest, child, "val_acc")) == {0} and "loss" not in metrics
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
    # resolved, and only what applies: the epochs, structure and model the search used; no
    # agent settings on a sampler's search, nor where the results went; booleans as true/false
    assert params["epochs"] == "2" and params["structure"] == "channel" and params["metric"] == "val_acc"
    assert params["engine.task.model"] == "digits_resnet" and params["matched_baseline"] == "true"
    assert not [k for k in params if k.startswith("agent.")] and "out" not in params
    assert not [k for c in children for k, v in _params(c).items() if v in ("True", "False")]
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


def test_metrics_agree_with_the_summary_and_are_shown_short(viewed, runs):
    parent, children = runs
    metrics, summary = _metrics(parent), viewed.result.summary
    # the dense latency beside the best model's, as summary.json and the terminal have them
    assert metrics["dense_latency_measured_ms"] == pytest.approx(summary["dense"]["latency_measured_ms"], rel=1e-3)
    assert metrics["best_latency_measured_ms"] == pytest.approx(summary["best"]["latency_measured_ms"], rel=1e-3)
    speedup = summary["dense"]["latency_measured_ms"] / summary["best"]["latency_measured_ms"]
    assert metrics["best_speedup"] == pytest.approx(speedup, rel=2e-3)  # agrees with the two latencies
    for run in (parent, *children):  # 0.9896, not 0.98958333: four significant digits, counts whole
        for key, value in _metrics(run).items():
            if not key.startswith("system/") and value != int(value):
                assert len(f"{abs(value):.10g}".replace(".", "").lstrip("0")) <= 4, (key, value)


def test_every_speed_up_in_the_terminal_agrees_with_its_latencies(viewed):
    rows = re.findall(r"latency \(batch (\d+)\)\s+([\d.]+) ms\s+([\d.]+) ms\s+speed-up ([\d.]+)x", viewed.printed)
    assert len(rows) == 2, viewed.printed  # batch 1 and 8
    for _, dense, pruned, speedup in rows:
        assert float(speedup) == pytest.approx(float(dense) / float(pruned), abs=0.011)


def test_the_experiment_opens_on_its_trials_best_first_and_says_who_won(viewed, runs, rest):
    parent, children = runs
    eid = viewed.result.experiment_id
    tags = {
        t["key"]: t["value"] for t in rest("/api/2.0/mlflow/experiments/get", experiment_id=eid)["experiment"]["tags"]
    }
    view = json.loads(tags["mlflow.sharedViewState.trials"])  # what the printed link (viewStateShareKey) opens
    assert view["orderByKey"] == "metrics.`val_acc`" and view["orderByAsc"] is False
    assert view["selectedColumns"][0] == "tags.`autoprune.best`"
    assert {"metrics.`val_acc`", "metrics.`flops_ratio`", "params.`policy.criterion`"} <= set(view["selectedColumns"])
    # its filter keeps the trials only (flat rows, not under the folded search run), best first
    found = rest(
        "/api/2.0/mlflow/runs/search",
        {"experiment_ids": [eid], "filter": view["searchFilter"], "order_by": ["metrics.`val_acc` DESC"]},
    )["runs"]
    assert {r["info"]["run_id"] for r in found} == {c["info"]["run_id"] for c in children}
    accs = [_metrics(r).get("val_acc", 0.0) for r in found]
    assert accs == sorted(accs, reverse=True)
    for column in view["selectedColumns"]:  # every column names something the trials have
        kind, key = column.split(".", 1)
        assert any(key.strip("`") in {"metrics": _metrics, "params": _params, "tags": _tags}[kind](r) for r in found)
    # the description above the table: the winner first, then links that stay in the model-training view
    note = tags["mlflow.note.content"]
    assert note.startswith("**Best: ") and f"runs/{parent['info']['run_id']}?workflowType=machine_learning" in note
    assert all(link.endswith("?workflowType=machine_learning") for link in re.findall(r"\]\(([^)]+)\)", note))


def test_the_registered_version_is_described_and_tagged(viewed, runs, rest):
    parent, _ = runs
    got = rest("/api/2.0/mlflow/model-versions/get", name="autoprune-view", version="1")["model_version"]
    tags = {t["key"]: t["value"] for t in got.get("tags", [])}
    summary = viewed.result.summary
    assert got["description"].startswith("Best model of autoprune search `view`")
    assert tags["autoprune.search"] == "view" and tags["autoprune.trial_id"] == summary["best"]["trial_id"]
    assert tags["autoprune.source"] == summary["best"]["source"]
    assert tags["flops_ratio"] == f"{summary['best']['flops'] / summary['dense']['flops']:.3f}x"


def test_the_search_run_has_its_charts_model_and_system_metrics(viewed, runs, rest, ui):
    parent, children = runs
    run_id = parent["info"]["run_id"]
    files = {f["path"] for f in rest("/api/2.0/mlflow/artifacts/list", run_id=run_id).get("files", [])}
    assert {"accuracy_vs_cost.png", "optimisation_history.png", "summary.json", "best_model"} <= files
    # the space the searcher sampled, parameter by parameter, as the trials' params name them
    space = json.loads(_artifact(ui, run_id, "search_space.json"))
    assert space["scope"] == {"choices": ["global", "local", "per_layer"]}
    assert {"low": 0.0, "high": 0.8, "log": False, "step": None} in space.values()  # a group's ratio
    # the description lists the charts logged, those that had something to show
    note = _tags(parent)["mlflow.note.content"]
    listed = set(re.findall(r"`([a-z_]+\.png)`", note.split("Charts", 1)[1]))
    assert listed == {f for f in files if f.endswith(".png")}
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
