"""``autoprune search`` with a real local Ray instance, real Optuna and a real MLflow store."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest

from autoprune.config import Budget, SearchConfig
from autoprune.search.ranking import simplicity, standard_error, tied
from autoprune.search.verdict import rerun_seeds

pytestmark = pytest.mark.slow


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _runs(uri: str, name: str, deleted: bool = False):
    from mlflow.entities import ViewType

    c = _client(uri)
    exp = c.get_experiment_by_name(name)
    view = ViewType.ALL if deleted else ViewType.ACTIVE_ONLY
    return c.search_runs([exp.experiment_id], run_view_type=view, max_results=1000)


def _config(tmp: Path, name: str, engine_cfg, **kw) -> SearchConfig:
    base = dict(
        name=name,
        budget=Budget("flops", 0.5),
        trials=6,
        epochs=1,
        final_epochs=1,
        storage=str(tmp / "results"),
        tracking_uri=f"sqlite:///{tmp / 'mlflow.db'}",
        engine=engine_cfg,
        progress=False,
    )
    base.update(kw)
    return SearchConfig(**base)


@pytest.fixture(scope="module")
def searched(viewed):
    """The suite's end-to-end default search (tests/conftest.py): 6 trials of 2 epochs, ASHA on."""
    return viewed.tmp, viewed.result


def test_search_logs_one_parent_and_a_child_per_trial(searched):
    tmp, result = searched
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    runs = _runs(uri, "view")
    parents = [r for r in runs if r.data.tags.get("autoprune.role") == "search"]
    children = [r for r in runs if r.data.tags.get("autoprune.role") == "trial"]
    assert len(parents) == 1 and len(children) == 6 and len(runs) == 7
    parent = parents[0]
    assert parent.info.run_id == result.run_id == result.summary["mlflow"]["run_id"]
    assert parent.info.status == "FINISHED"
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    assert len({c.data.tags["autoprune.trial_id"] for c in children}) == 6
    # the two baselines are told apart in the runs table: tagged, and named for what they are
    baselines = {c.data.tags["autoprune.baseline"]: c for c in children if "autoprune.baseline" in c.data.tags}
    assert sorted(baselines) == ["global", "uniform"]
    for name, run in baselines.items():
        scope = "local" if name == "uniform" else "global"
        number = run.data.tags["autoprune.trial_number"]
        assert run.info.run_name == f"#{number} {name} baseline (magnitude/{scope})"
    assert not any("baseline" in c.info.run_name for c in children if c not in baselines.values())
    c = _client(uri)
    stopped = 0
    for child in children:
        assert child.info.status == "FINISHED"
        assert child.data.params["policy.criterion"]
        assert child.data.params["policy.structure"] == "channel"  # the default: really faster models
        assert child.data.tags["autoprune.node_id"]
        steps = [m.step for m in c.get_metric_history(child.info.run_id, "epochs/val_acc")]
        if child.data.tags["autoprune.stopped_early"] == "true":  # by ASHA after epoch 1: no final report
            stopped += 1
            assert steps == [1] and "predicted_speedup" not in child.data.metrics
            # pruned before it was stopped: its cost is logged, with the latency the table predicts
            assert "flops_ratio" in child.data.metrics and "latency_predicted_ms" in child.data.metrics
            continue
        assert child.data.tags["autoprune.stopped_early"] == "false"
        for key in (
            "val_acc",
            "epochs/val_loss",
            "flops_ratio",
            "params_ratio",
            "latency_predicted_ms",
            "latency_ratio",
        ):
            assert key in child.data.metrics, key
        for key in ("predicted_speedup", "latency_measured_ms"):
            assert key in child.data.metrics, key
        assert child.data.metrics["flops_ratio"] <= 0.5 + 1e-9
        assert any(k.startswith("realised_pruned_fraction.") for k in child.data.metrics)
        assert {a.path for a in c.list_artifacts(child.info.run_id)} >= {"policy.json", "ratios.png"}
        assert sorted(steps) == [1, 2]  # each epoch logged once
    assert stopped == result.summary["trials"]["stopped_early"]
    assert stopped == sum(r.status == "stopped" for r in result.trials)
    artifacts = {a.path for a in c.list_artifacts(parent.info.run_id)}
    assert {"accuracy_vs_cost.png", "criteria.png", "summary.json", "best_model"} <= artifacts
    assert "budget.fraction" in parent.data.params and "dense_val_acc" in parent.data.metrics
    assert parent.data.tags["autoprune.best_run_id"] in {c.info.run_id for c in children}


def test_search_summary_and_best_model_reproduce(searched, viewed, engine_cfg):
    from autoprune.jobs import evaluate_job

    tmp, result = searched
    summary = json.loads((result.out / "summary.json").read_text())
    assert summary["name"] == "view" and summary["searcher"] == "tpe"
    assert summary["budget"] == {"kind": "flops", "fraction": 0.5}
    assert summary["trials"]["total"] == 6 and summary["trials"]["failed"] == 0
    assert summary["trials"]["completed"] + summary["trials"]["stopped_early"] == 6
    best = summary["best"]
    for key in ("policy", "val_acc", "test_acc", "flops_ratio", "latency_predicted_ms", "latency_measured_ms"):
        assert best[key] is not None, key
    assert best["flops_ratio"] <= 0.5
    # the default search prunes channels, and its best model is faster, timed beside the dense one
    assert best["policy"]["structure"] == "channel" and summary["structures"] == ["channel"]
    assert best["speedup"] > 1, best
    lo, hi = best["speedup_spread"]
    assert lo <= best["speedup"] <= hi
    assert summary["latency_table"]["batch"] == 1 and summary["latency_table"]["dense_ms"] > 0
    # one machine: one kind of hardware, its table built here (no node id)
    assert summary["latency_tables"] == {
        summary["latency_table"]["device"]: {
            "node_id": None,
            "dense_ms": summary["latency_table"]["dense_ms"],
            "cached": summary["latency_table"]["cached"],
        }
    }
    assert summary["mlflow"]["experiment_id"] == result.experiment_id
    completed = [r for r in result.trials if r.status == "completed"]
    # the winner is one of the candidates re-run at the final length: the top 3 by validation
    # accuracy, the simplest of those within the split's noise of the best, and the uniform baseline
    n_val = summary["validation"]["samples"]
    top = max(r.metrics["val_acc"] for r in completed)
    simplest = min((r for r in completed if tied(r.metrics["val_acc"], top, n_val)), key=lambda r: simplicity(r.policy))
    candidates = sorted(completed, key=lambda r: -r.metrics["val_acc"])[:3] + [simplest]
    candidates += [r for r in completed if r.baseline == "uniform"]
    chosen = next(r for r in completed if r.trial_id == best["trial_id"])
    assert chosen in candidates and n_val == 432 and best["search_val_acc"] == chosen.metrics["val_acc"]
    assert best["search_val_se"] == pytest.approx(standard_error(best["search_val_acc"], n_val))
    # the baselines ran first (two at a time: in either order), each once, under the search's budget and epochs
    first = sorted(result.trials, key=lambda r: r.number)[:2]
    assert sorted((r.baseline, r.policy["scope"], r.policy["criterion"]) for r in first) == [
        ("global", "global", "magnitude"),
        ("uniform", "local", "magnitude"),
    ]
    assert [r.baseline for r in result.trials].count(None) == 4
    # the candidates were re-run on as many seeds as the trials' epochs paid for (here more than one)
    reran = summary["final_reruns"]
    spent = sum(r.metrics.get("epoch", 0) for r in result.trials)
    assert reran["epochs"] == 1 and chosen.trial_id in reran["val_acc"]
    assert set(reran["val_acc"]) <= {r.trial_id for r in candidates}
    assert reran["seeds"] == rerun_seeds(result.trials, len(reran["val_acc"]), 1) >= 2
    assert f"for 1 epoch(s) on {reran['seeds']} seeds to choose the best" in viewed.printed
    top_rerun = max(reran["val_acc"].values())
    assert tied(reran["val_acc"][chosen.trial_id], top_rerun, n_val)  # the winner is the best re-run, or tied
    # the winner against uniform pruning fine-tuned for the search's whole compute
    matched = summary["uniform_matched"]
    assert matched["policy"]["scope"] == "local"
    assert matched["epochs"] == spent + (len(reran["val_acc"]) * reran["seeds"] + 1) * 1
    gain = matched["gain"]
    assert gain["points"] == pytest.approx(100 * (best["test_acc"] - matched["test_acc"]), abs=1e-3)
    assert gain["se_points"] > 0 and matched["verdict"] in viewed.printed
    if matched["returned"]:  # no trial beat it beyond the validation noise: it is the search's model
        assert best["source"] == "uniform_matched" and best["policy"] == matched["policy"]
        assert "no policy beat uniform pruning" in matched["verdict"] and gain["points"] == 0
    else:
        assert best["source"] == "trial" and best["val_acc"] > matched["val_acc"]
        assert ("no gain" in matched["verdict"]) == (not gain["beyond_noise"])
    assert all(r.metrics["flops_ratio"] <= 0.5 + 1e-9 for r in completed)
    metrics = evaluate_job(best["model_path"], None, "cpu", None)
    assert metrics["test_acc"] == pytest.approx(best["test_acc"], abs=1e-12)
    assert metrics["flops"] == best["flops"]


def test_summary_json_is_the_search_summary_class(searched):
    """summary.json is written by SearchSummary and reads back into it: its keys are the
    class's fields (the optional ones where the search has them), with schema_version."""
    import dataclasses

    from autoprune.search.summary import OPTIONAL, SCHEMA_VERSION, SearchSummary

    tmp, result = searched
    raw = json.loads((result.out / "summary.json").read_text())
    fields = {f.name for f in dataclasses.fields(SearchSummary)}
    assert raw["schema_version"] == SCHEMA_VERSION
    assert fields - set(OPTIONAL) <= set(raw) <= fields
    assert "latency_table" in raw and "agent" not in raw  # a tpe search with a latency table
    summary = SearchSummary.read(result.out / "summary.json")
    assert summary.to_dict() == raw == result.summary


def test_ui_serves_the_search_runs_over_rest_on_this_machine_only(searched, ui):
    """(`autoprune ui` stopping its MLflow server on SIGTERM is checked when the shared server
    stops: tests/tracking/conftest.py.)"""
    tmp, result = searched
    body = json.dumps({"experiment_ids": [result.experiment_id], "max_results": 100}).encode()
    request = urllib.request.Request(
        ui.base + "/api/2.0/mlflow/runs/search", data=body, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=10) as reply:
        runs = json.loads(reply.read())["runs"]
    assert len(runs) == 7
    assert {r["info"]["run_id"] for r in runs} >= {result.run_id}
    listening = subprocess.run(["ss", "-ltnH", f"sport = :{ui.port}"], capture_output=True, text=True).stdout
    local = [line.split()[3] for line in listening.splitlines() if line.strip()]
    assert local and all(addr == f"127.0.0.1:{ui.port}" for addr in local), listening


SPACES = '''
def one_fails(trial, table):
    """Trial 1 asks for a criterion that cannot mask single weights: the trial raises."""
    if trial.number == 1:
        return {"structure": "unstructured", "criterion": "fpgm"}
    return {"criterion": trial.suggest_categorical("criterion", ["magnitude", "random"])}
'''


def test_a_failing_trial_is_recorded_and_the_search_goes_on(tmp_path, engine_cfg, digits_dense, monkeypatch):
    import autoprune

    (tmp_path / "user_spaces_fail.py").write_text(textwrap.dedent(SPACES))
    monkeypatch.syspath_prepend(str(tmp_path))
    result = autoprune.run_search(
        _config(tmp_path, "fails", engine_cfg, trials=4, searcher="random", space="user_spaces_fail:one_fails")
    )  # the two baselines, then the space's trials 0 and 1
    summary = json.loads((result.out / "summary.json").read_text())
    assert summary["trials"] == {"total": 4, "completed": 3, "stopped_early": 0, "failed": 1}
    assert summary["best"]["policy"]["criterion"] in ("magnitude", "random")
    runs = [
        r for r in _runs(f"sqlite:///{tmp_path / 'mlflow.db'}", "fails") if r.data.tags["autoprune.role"] == "trial"
    ]
    failed = [r for r in runs if r.info.status == "FAILED"]
    assert len(runs) == 4 and len(failed) == 1
    assert "fpgm" in failed[0].data.tags["autoprune.error"]
    # Tune ran the failing trial again (--max-failures 2): the runs of its earlier tries were
    # replaced, ended KILLED first; nothing is left RUNNING, deleted runs included
    every = _runs(f"sqlite:///{tmp_path / 'mlflow.db'}", "fails", deleted=True)
    assert len(every) > len(runs) + 1 and not [r for r in every if r.info.status == "RUNNING"]
    [record] = [r for r in result.trials if r.status == "failed"]
    assert "fpgm" in record.error and record.run_id == failed[0].info.run_id


@pytest.mark.parametrize("error", [OSError("No space left on device\nmore"), KeyboardInterrupt()])
def test_a_search_that_ends_before_its_first_record_leaves_its_name_free(
    error, tmp_path, engine_cfg, digits_dense, monkeypatch, capsys
):
    """Whatever ends a search ends its MLflow run (FAILED with the reason, or KILLED), never
    left RUNNING; before any trial is recorded there is nothing to resume, so the error is
    one line, no resume hint is printed, and the name is free for a new search."""
    import autoprune
    from autoprune.errors import AutopruneError
    from autoprune.rayenv import quiet_environment
    from autoprune.search.plan import prepare

    quiet_environment()  # token authentication, before Ray is imported
    from ray import tune

    def broken_fit(self):
        raise error

    monkeypatch.setattr(tune.Tuner, "fit", broken_fit)
    config = _config(tmp_path, "broken", engine_cfg, trials=2)
    expected = (AutopruneError, "failed before its first trial: OSError: No space left on device")
    if isinstance(error, KeyboardInterrupt):
        expected = (KeyboardInterrupt, None)
    with pytest.raises(expected[0], match=expected[1]) as raised:
        autoprune.run_search(config)
    assert "\n" not in str(raised.value) and "--resume" not in capsys.readouterr().err
    [run] = _runs(config.tracking_uri, "broken")
    assert run.data.tags["autoprune.role"] == "search"
    if isinstance(error, KeyboardInterrupt):
        assert run.info.status == "KILLED"
    else:
        assert run.info.status == "FAILED"
        assert run.data.tags["autoprune.error"] == "OSError: No space left on device"
        assert "No space left on device" in run.data.tags["mlflow.note.content"]
    assert not (tmp_path / "results" / "broken").exists()
    assert prepare(config).name == "broken"  # the name is free: no "already exists"


def test_nsga2_returns_a_mutually_non_dominated_front(tmp_path, engine_cfg, digits_dense):
    import autoprune
    from autoprune.contract import objectives

    result = autoprune.run_search(_config(tmp_path, "pareto", engine_cfg, trials=4, searcher="nsga2", concurrency=2))
    assert result.summary["scheduler"] == "none"
    done = [r for r in result.trials if r.status == "completed"]
    front = result.pareto
    assert front and len(done) == 4
    assert max(r.metrics["flops_ratio"] for r in done) - min(r.metrics["flops_ratio"] for r in done) > 0.02

    def dominates(a, b):
        pairs = [
            (a.metrics[k], b.metrics[k]) if d == "min" else (-a.metrics[k], -b.metrics[k])
            for k, d in objectives("flops")
        ]
        return all(x <= y for x, y in pairs) and any(x < y for x, y in pairs)

    for a in front:
        assert not any(dominates(b, a) for b in front if b is not a)
    ids = {r.trial_id for r in front}
    for r in done:  # everything off the front is dominated by a front member
        assert r.trial_id in ids or any(dominates(f, r) for f in front)
    assert [p["trial_id"] for p in result.summary["pareto"]] == [r.trial_id for r in front]


def _kill_tree(pid: int, ray_tmp: str) -> None:
    """SIGKILL the driver's session and every Ray process of its private temp dir."""
    victims = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().decode(errors="replace")
            sid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[3])
        except (OSError, ValueError, IndexError):
            continue
        if sid == pid or ray_tmp in cmdline:
            victims.add(int(entry))
    for v in victims:
        try:
            os.kill(v, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _recorded(storage: str, name: str) -> list[str]:
    """The trials a search recorded as ended (search.journal): what a resume keeps."""
    from autoprune.paths import join, names

    return [n.removesuffix(".json") for n in names(join(storage, name, "trials")) if n.endswith(".json")]


def _run_until(args: list[str], env: dict, log: Path, storage: str, recorded: int, cwd=None) -> None:
    """Start a search and kill it (SIGKILL, with its Ray processes) once ``recorded`` trials
    are recorded; it must not have ended by itself first."""
    ray_tmp = env["RAY_TMPDIR"]
    with log.open("wb") as out:
        proc = subprocess.Popen(args, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    seen = 0
    try:
        deadline = time.time() + 400  # a loaded 2-core machine with the bucket is slow
        while time.time() < deadline and proc.poll() is None and seen < recorded:
            try:
                seen = len(_recorded(storage, "kill"))
            except Exception:  # noqa: BLE001 - the folder may not exist yet
                seen = 0
            time.sleep(0.2)
    finally:
        _kill_tree(proc.pid, ray_tmp)
        proc.wait(timeout=30)
    assert recorded <= seen < 5, f"not killed mid-way ({seen} recorded): {log.read_text(errors='replace')[-3000:]}"


def _lose_head(args: list[str], env: dict, log: Path, storage: str, recorded: int, uri: str) -> None:
    """Start a search and, once ``recorded`` trials are recorded, kill its Ray head (the GCS
    of its local instance): the driver must end by itself, in one line naming the lost head
    and the resume command, with no MLflow run left RUNNING."""
    ray_tmp = env["RAY_TMPDIR"]
    with log.open("wb") as out:
        proc = subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 400
        while time.time() < deadline and proc.poll() is None and len(_recorded_or_none(storage)) < recorded:
            time.sleep(0.2)
        assert proc.poll() is None, log.read_text(errors="replace")[-3000:]
        every = [e for e in os.listdir("/proc") if e.isdigit()]
        gcs = [int(e) for e in every if ray_tmp in _cmdline(e) and "gcs_server" in _cmdline(e).split(" ")[0]]
        assert gcs, "no GCS process found"
        for pid in gcs:
            os.kill(pid, signal.SIGKILL)
        assert proc.wait(timeout=150) == 2
    finally:
        _kill_tree(proc.pid, ray_tmp)
        proc.wait(timeout=30)
    text = log.read_text(errors="replace")
    assert "autoprune: error: lost the Ray head at" in text and "--resume" in text, text[-3000:]
    assert not [r for r in _runs(uri, "kill", deleted=True) if r.info.status == "RUNNING"]


def _cmdline(pid: str) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").replace("\0", " ")
    except OSError:
        return ""


def _recorded_or_none(storage: str) -> list[str]:
    try:
        return _recorded(storage, "kill")
    except Exception:  # noqa: BLE001 - the folder may not exist yet
        return []


@pytest.mark.parametrize("where", ["folder", "bucket"])
def test_a_killed_search_resumes_without_rerunning_or_duplicating(where, tmp_path, engine_cfg, digits_dense, request):
    """Killed with SIGKILL mid-way (three times in a row, in a folder; the second time its Ray
    head is killed instead), resumed from its own
    records each time (Tune's own snapshot torn, as a kill while Tune rewrites it leaves it),
    it ends with exactly the trials it was asked for: each recorded trial
    kept as it was, none run twice, no run left RUNNING. From a bucket, the resume runs with
    another HOME and working folder, so all it has is the bucket (and the MLflow store, which
    on a cluster is the server on the head)."""
    from autoprune.paths import join, read_text

    exe = Path(sys.executable).with_name("autoprune")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    ray_tmp = tempfile.mkdtemp(prefix="rk", dir="/tmp")
    env = {**os.environ, "RAY_TMPDIR": ray_tmp}
    storage = str(tmp_path / "results")
    if where == "bucket":
        bucket = request.getfixturevalue("s3")
        storage = bucket.uri("kill", "results")
        env.update(bucket.env, HOME=str(tmp_path))
    args = [str(exe), "search", "--name", "kill", "--storage", storage, "--tracking-uri", uri, "--trials", "5"]
    args += ["--epochs", "1", "--final-epochs", "1", "--concurrency", "1", "--searcher", "random"]
    args += ["--budget-flops", "0.5", "--no-progress"]
    resume = [str(exe), "search", "--name", "kill", "--storage", storage, "--resume", "--no-progress"]
    kept: dict[str, str] = {}  # trial id -> its run, for every trial recorded before a kill
    for k, target in enumerate([2] if where == "bucket" else [1, 2, 3]):
        if k == 1:  # the second time, its Ray head is lost instead
            _lose_head(resume, env, tmp_path / f"killed{k}.log", storage, target, uri)
        else:
            _run_until(resume if k else args, env, tmp_path / f"killed{k}.log", storage, target)
        for r in _runs(uri, "kill"):
            tid = r.data.tags.get("autoprune.trial_id")
            if tid in _recorded(storage, "kill"):
                assert kept.setdefault(tid, r.info.run_id) == r.info.run_id  # kept, not run again

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    if where == "bucket":
        assert not (tmp_path / ".ray" / "auth_token").exists()  # each local instance had a token of its own
        env["HOME"] = str(elsewhere)
    else:  # a kill as Tune rewrote its snapshot: the resume reads its own records, never Tune's files
        snapshots = list((tmp_path / "results" / "kill" / "tune").glob("experiment_state-*.json"))
        assert snapshots
        for snapshot in snapshots:
            snapshot.write_text(snapshot.read_text()[:20])
    resumed = subprocess.run(resume, env=env, cwd=elsewhere, capture_output=True, text=True, timeout=400)
    try:
        assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    finally:
        _kill_tree(-1, ray_tmp)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert f"{len(kept)} finished before" in resumed.stdout, resumed.stdout
    summary = json.loads(read_text(join(storage, "kill", "best", "summary.json")))
    assert summary["trials"]["total"] == 5 and summary["trials"]["failed"] == 0
    from autoprune.search import journal
    from autoprune.search.baselines import baseline_of

    # each baseline ran once, across the kills and resumes
    ran = sorted(b for b in (baseline_of(r["config"]) for r in journal.load(join(storage, "kill"))) if b)
    assert ran == ["global", "uniform"]
    runs = _runs(uri, "kill")
    parents = [r for r in runs if r.data.tags.get("autoprune.role") == "search"]
    children = [r for r in runs if r.data.tags.get("autoprune.role") == "trial"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    ids = [r.data.tags["autoprune.trial_id"] for r in children]
    assert len(children) == 5 and len(set(ids)) == 5 and set(ids) == set(_recorded(storage, "kill"))
    assert all(r.info.status == "FINISHED" for r in children)
    assert not [r for r in _runs(uri, "kill", deleted=True) if r.info.status == "RUNNING"]
    assert sorted(int(r.data.tags["autoprune.trial_number"]) for r in children) == [1, 2, 3, 4, 5]
    c = _client(uri)
    for r in children:  # no epoch logged twice
        steps = [m.step for m in c.get_metric_history(r.info.run_id, "epochs/val_acc")]
        assert len(steps) == len(set(steps))
    for trial_id, run_id in kept.items():  # recorded trials were kept, not re-run
        [now] = [r for r in children if r.data.tags["autoprune.trial_id"] == trial_id]
        assert now.info.run_id == run_id


class _Payload:
    """A pickle that, when loaded, creates the folder ``marker``: what an attacker who can
    write the storage folder would put in Ray Tune's pickles."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_a_resume_reads_only_its_own_records_and_runs_no_code_from_storage(tmp_path, digits_dense, cli):
    """Tampered Tune pickles (``tuner.pkl``, ``searcher-state-*.pkl``) are never loaded; a saved
    setting naming a module is imported only if the command line names it again; a torn trial
    record is refused by name before any work, and the earlier best model is left byte for byte."""
    import pickle

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    storage = tmp_path / "st"
    args = ["search", "--name", "s1", "--storage", str(storage), "--tracking-uri", uri, "--trials", "2"]
    args += ["--epochs", "1", "--final-epochs", "0", "--searcher", "random", "--no-progress"]
    first = cli(*args, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    folder = storage / "s1"
    marker = tmp_path / "ran"
    tune_files = [folder / "tune" / "tuner.pkl", *(folder / "tune").glob("searcher-state-*.pkl")]
    tune_files += [folder / "tuner.pkl", folder / "searcher-state-2026-12-04_00-00-00.pkl"]
    for f in tune_files:
        f.write_bytes(pickle.dumps(_Payload(marker)))
    resume = ["search", "--name", "s1", "--storage", str(storage), "--resume", "--no-progress"]
    again = cli(*resume, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "2 finished before, 0 to run" in again.stdout and not marker.exists()

    (tmp_path / "evil.py").write_text(
        f"import os\nos.mkdir({str(marker)!r})\ndef space(trial, table):\n    return {{}}\n"
    )
    state = folder / "autoprune-search.json"
    saved = json.loads(state.read_text())
    saved["config"]["space"] = "evil:space"
    state.write_text(json.dumps(saved))
    refused = cli(*resume, env={"PYTHONPATH": str(tmp_path)})
    assert refused.returncode == 2 and not marker.exists(), refused.stderr
    assert "saved with --space 'evil:space', code from a module" in refused.stderr
    assert "add --space evil:space" in refused.stderr and len(refused.stderr.strip().splitlines()) == 1
    state.write_text(json.dumps({**saved, "config": {**saved["config"], "space": "default"}}))

    best = {p.name: p.read_bytes() for p in (folder / "best").iterdir()}
    assert {"model.pt", "summary.json", "policy.json"} <= set(best)
    [record, *_] = sorted((folder / "trials").glob("*.json"))
    with record.open("r+b") as f:
        f.truncate(100)
    torn = cli(*resume)
    assert torn.returncode == 2 and len(torn.stderr.strip().splitlines()) == 1, torn.stderr
    assert f"trial record {str(record)!r} is damaged or was altered" in torn.stderr
    assert {p.name: p.read_bytes() for p in (folder / "best").iterdir()} == best


def test_more_gpus_than_the_machine_has_fails_before_any_trial(cli, tmp_path):
    """(The rest of the search's bad input is in tests/test_bad_input.py.)"""
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    out = cli("search", "--storage", str(tmp_path / "results"), "--gpus-per-trial", "1", cwd=tmp_path, timeout=60)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "--gpus-per-trial 1 is more than this machine has" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "results").exists() and not (tmp_path / "mlflow.db").exists()


def test_an_existing_search_name_is_not_overwritten(cli, tmp_path):
    (tmp_path / "results" / "taken").mkdir(parents=True)
    (tmp_path / "results" / "taken" / "keep.txt").write_text("recorded")
    out = cli("search", "--storage", str(tmp_path / "results"), "--name", "taken", cwd=tmp_path, timeout=60)
    assert out.returncode == 2 and "already exists" in out.stderr and "--resume" in out.stderr
    assert (tmp_path / "results" / "taken" / "keep.txt").read_text() == "recorded"


def test_list_names_searchers_and_spaces(cli):
    searchers = cli("list", "searchers")
    assert searchers.returncode == 0
    from autoprune.search.searchers import SEARCHERS

    assert [line.split()[0] for line in searchers.stdout.splitlines()] == SEARCHERS.names()
    assert {"tpe", "nsga2", "random", "grid", "amc"} <= set(SEARCHERS.names())
    spaces = cli("list", "spaces")
    assert [line.split()[0] for line in spaces.stdout.splitlines()][:3] == ["default", "criteria", "pai"]


@pytest.mark.parametrize("sig, status", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_sigterm_stops_a_search_as_ctrl_c_does_and_leaves_no_run_running(sig, status, tmp_path, digits_dense):
    """SIGTERM mid-search (a scheduler's or `kill`'s): exit 143, the resume line, no C++ stack
    from Ray's own handler; Ctrl-C: 130. Either way the search run is KILLED and no trial run
    is left RUNNING."""
    exe = Path(sys.executable).with_name("autoprune")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = [str(exe), "search", "--name", "stop", "--storage", str(tmp_path / "st"), "--tracking-uri", uri]
    args += ["--trials", "6", "--epochs", "4", "--concurrency", "1", "--searcher", "random", "--no-progress"]
    log = tmp_path / "stop.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 300
        running = False
        while time.time() < deadline and proc.poll() is None and not running:
            try:
                runs = [r for r in _runs(uri, "stop") if r.data.tags.get("autoprune.role") == "trial"]
            except Exception:  # noqa: BLE001 - the store or experiment may not exist yet
                runs = []
            # a trial running with one recorded before it: there is something to resume
            running = any(r.info.status == "RUNNING" for r in runs) and _recorded(str(tmp_path / "st"), "stop")
            time.sleep(0.2)
        assert running, log.read_text(errors="replace")[-3000:]
        proc.send_signal(sig)
        assert proc.wait(timeout=120) == status, log.read_text(errors="replace")[-3000:]
    finally:
        if proc.poll() is None:
            _kill_tree(proc.pid, "no-such-folder")
    output = log.read_text(errors="replace")
    assert "--resume" in output and "SIGABRT" not in output and "Stack trace" not in output, output[-3000:]
    statuses = {(r.data.tags.get("autoprune.role"), r.info.status) for r in _runs(uri, "stop", deleted=True)}
    assert ("search", "KILLED") in statuses and not any(s == "RUNNING" for _, s in statuses), statuses


def test_one_search_per_name_and_a_dead_holders_lease_is_taken_over(tmp_path, digits_dense, cli, cli_here):
    """A second search of a running search's name (new or --resume) is refused at once,
    naming the first; once the first is killed, a resume takes its lease over and finishes."""
    from autoprune.search.lease import LEASE

    exe = Path(sys.executable).with_name("autoprune")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    ray_tmp = tempfile.mkdtemp(prefix="rl", dir="/tmp")
    args = ["search", "--name", "one", "--storage", str(tmp_path / "st"), "--tracking-uri", uri, "--trials", "3"]
    args += ["--epochs", "2", "--final-epochs", "0", "--concurrency", "1", "--searcher", "random", "--no-progress"]
    log = tmp_path / "first.log"
    with log.open("wb") as out:
        first = subprocess.Popen(
            [str(exe), *args],
            env={**os.environ, "RAY_TMPDIR": ray_tmp},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.time() + 300
        running = False
        while time.time() < deadline and first.poll() is None and not running:
            try:
                running = any(r.data.tags.get("autoprune.role") == "trial" for r in _runs(uri, "one"))
            except Exception:  # noqa: BLE001 - the store or experiment may not exist yet
                running = False
            time.sleep(0.2)
        assert running and (tmp_path / "st" / "one" / LEASE).is_file(), log.read_text(errors="replace")[-3000:]
        for extra in ([], ["--resume"]):
            t0 = time.time()
            second = cli_here(*args, *extra)
            assert second.returncode == 2 and time.time() - t0 < 5, second.stderr
            assert f"search 'one' is in use by pid {first.pid}" in second.stderr, second.stderr
    finally:
        _kill_tree(first.pid, ray_tmp)
        first.wait(timeout=30)
    resumed = cli(*args, "--resume", timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"held by pid {first.pid}" in resumed.stdout + resumed.stderr and "taking it over" in resumed.stdout
    assert not (tmp_path / "st" / "one" / LEASE).exists()  # released at the end
