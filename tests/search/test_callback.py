"""The Tune callback that logs trials as child runs, driven by hand (no Ray cluster): run
names, params, which metrics are series over the epochs and which single values at step 0."""

from __future__ import annotations

import pytest

from autoprune.contract import FINAL
from autoprune.rayenv import quiet_environment

quiet_environment()  # token authentication, before the callback imports Ray

from autoprune.search import callback, journal  # noqa: E402
from autoprune.tracking import store  # noqa: E402


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


class _Trial:
    """What the logger reads of a Ray Tune trial (the real one needs a running Tuner)."""

    def __init__(self, trial_id: str, last_result: dict | None = None, policy: dict | None = None) -> None:
        self.trial_id = trial_id
        self.config = {"policy": {"criterion": "magnitude", "scope": "global"} if policy is None else policy}
        self.last_result = last_result


COST = {
    "flops": 1000.0,
    "params": 200.0,
    "flops_ratio": 0.5,
    "params_ratio": 0.4,
    "latency_predicted_ms": 1.5,
    "latency_ratio": 0.6,
    "ratios": {"g": 0.5, "h": 0.25},
}


@pytest.fixture(scope="module")
def uri(tmp_path_factory) -> str:
    """One store for the module (creating an SQLite store takes seconds); an experiment per test."""
    return f"sqlite:///{tmp_path_factory.mktemp('store') / 'mlflow.db'}"


def _logger(uri: str, tmp_path):
    experiment_id, parent = store.open_search_run(uri, tmp_path.name, {}, resume=False)
    logger = callback.TrialLogger(uri, experiment_id, parent, str(tmp_path))
    return experiment_id, parent, logger


def _history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in _client(uri).get_metric_history(run_id, key)]


def test_trial_logger_writes_off_tunes_loop_and_records_the_trial_on_it(uri, tmp_path):
    experiment_id, parent, logger = _logger(uri, tmp_path)
    final = {
        "epoch": 2,
        "val_acc": 0.9,
        "loss": 0.3,
        **COST,
        "predicted_speedup": 1.8,
        "latency_measured_ms": 1.6,
        "engine_s": 3.0,
        "report_s": 0.1,
        "final": True,
    }
    trial = _Trial("t1", final)
    logger.on_trial_start(0, [], trial)
    logger.on_trial_result(0, [], trial, {"epoch": 1, "val_acc": 0.8, "loss": 0.5, "node_id": "n1", **COST})
    logger.on_trial_result(0, [], trial, final)
    logger.on_trial_complete(0, [], trial)
    assert journal.load(str(tmp_path))  # the record is written on the loop, before the run ends
    assert logger.get_state() is None  # what Tune calls before writing its snapshot: it waits for nothing
    logger.flush()
    run = store.trial_runs(uri, experiment_id, parent)["t1"]
    assert run.info.status == "FINISHED"
    assert run.data.tags[store.NODE_ID] == "n1"
    assert run.data.metrics["realised_pruned_fraction.g"] == 0.5
    assert _history(uri, run.info.run_id, "epochs/val_acc") == [(1, 0.8), (2, 0.9)]  # per epoch
    assert _history(uri, run.info.run_id, "epochs/loss") == [(1, 0.5), (2, 0.3)]
    assert run.data.metrics["val_acc"] == 0.9 and "loss" not in run.data.metrics  # the table's value: the latest
    assert {s for s, _ in _history(uri, run.info.run_id, "val_acc")} == {0}
    # single values, at step 0, once (the cost came with epoch 1 and again unchanged with the final report)
    for key in ("flops", "params", "flops_ratio", "params_ratio", "realised_pruned_fraction.h"):
        assert len(_history(uri, run.info.run_id, key)) == 1 and _history(uri, run.info.run_id, key)[0][0] == 0, key
    for key in (
        "latency_predicted_ms",
        "predicted_speedup",
        "latency_measured_ms",
        "engine_s",
        "report_s",
        "trial_wall_s",
    ):
        [(step, _)] = _history(uri, run.info.run_id, key)
        assert step == 0, key
    assert run.data.tags["autoprune.stopped_early"] == "false"
    # the search's own record of it (what a resume reads), with its number and per-report curve
    [rec] = journal.load(str(tmp_path))
    assert (rec["trial_id"], rec["number"], rec["status"], rec["error"]) == ("t1", 1, "completed", None)
    assert [p["val_acc"] for p in rec["curve"]] == [0.8, 0.9] and rec["report"]["final"] is True
    assert rec["config"] == trial.config
    logger.close()
    assert not callback._WRITERS


def test_trial_logger_store_errors_reach_tunes_loop(uri, tmp_path):
    from autoprune.errors import AutopruneError

    _, parent = store.open_search_run(uri, tmp_path.name, {}, resume=False)
    logger = callback.TrialLogger(uri, "424242", parent, str(tmp_path))  # no such experiment
    logger.on_trial_start(0, [], _Trial("t1"))
    with pytest.raises(AutopruneError, match="MLflow logging to sqlite:///.* failed"):
        logger.flush()
    logger.close()


def test_a_stopped_trial_gets_its_cost_once_and_no_final_metrics(uri, tmp_path):
    experiment_id, parent, logger = _logger(uri, tmp_path)
    last = {"epoch": 1, "val_acc": 0.7, "loss": 0.6, "node_id": "n1", **COST}
    trial = _Trial("s1", last)
    logger.on_trial_start(0, [], trial)
    logger.on_trial_result(0, [], trial, last)
    logger.on_trial_complete(0, [], trial)  # the scheduler stopped it: its last report is not final
    logger.close()
    run = store.trial_runs(uri, experiment_id, parent)["s1"]
    assert run.data.tags["autoprune.stopped_early"] == "true"
    for key in ("flops", "params", "flops_ratio", "params_ratio", "realised_pruned_fraction.g"):
        assert _history(uri, run.info.run_id, key) == [(0, pytest.approx(last.get(key, 0.5)))], key
    assert _history(uri, run.info.run_id, "epochs/val_acc") == [(1, 0.7)]
    assert "predicted_speedup" not in run.data.metrics and "latency_measured_ms" not in run.data.metrics
    assert [s for s, _ in _history(uri, run.info.run_id, "trial_wall_s")] == [0]
    # it is recorded too: a resume counts it as ended, instead of running it again
    [rec] = journal.load(str(tmp_path))
    assert rec["status"] == "stopped" and rec["report"]["val_acc"] == 0.7


def test_a_failed_trial_is_recorded_and_a_retried_trial_leaves_no_run_running(uri, tmp_path):
    """Tune retries a failed trial (--max-failures): its earlier run is ended KILLED before it is
    deleted (MLflow keeps deleted runs, and would keep them RUNNING); the last failure is recorded."""
    from mlflow.entities import ViewType

    experiment_id, parent, logger = _logger(uri, tmp_path)
    trial = _Trial("f1", {})
    for _ in range(3):  # the first try and two retries
        logger.on_trial_start(0, [], trial)
    trial.pickled_error_file = None
    logger.on_trial_error(0, [], trial)
    logger.close()
    every = _client(uri).search_runs([experiment_id], run_view_type=ViewType.ALL)
    tries = [r for r in every if r.data.tags.get(store.PARENT) == parent]  # deleted ones too
    assert len(tries) == 3 and not [r for r in tries if r.info.status == "RUNNING"]
    assert store.trial_runs(uri, experiment_id, parent)["f1"].info.status == "FAILED"
    [rec] = journal.load(str(tmp_path))
    assert rec["status"] == "failed" and rec["error"] == "unknown error" and rec["number"] == 1


def test_a_report_before_pruning_logs_no_cost(uri, tmp_path):
    experiment_id, parent, logger = _logger(uri, tmp_path)
    trial = _Trial("p1", {"epoch": 1, "val_acc": 0.5, "loss": 1.0})
    logger.on_trial_start(0, [], trial)
    logger.on_trial_result(0, [], trial, {"epoch": 1, "val_acc": 0.5, "loss": 1.0})
    logger.on_trial_complete(0, [], trial)
    logger.close()
    metrics = store.trial_runs(uri, experiment_id, parent)["p1"].data.metrics
    assert set(metrics) == {"epochs/val_acc", "epochs/loss", "val_acc", "trial_wall_s"}


def test_child_runs_are_named_and_numbered_by_what_they_are(uri, tmp_path):
    experiment_id, parent, logger = _logger(uri, tmp_path)
    policies = [
        {"structure": "channel", "criterion": "snip", "scope": "global"},
        {"structure": "unstructured", "criterion": "magnitude", "scope": "local"},
        {},
    ]
    for i, policy in enumerate(policies):
        logger.on_trial_start(0, [], _Trial(f"t{i}", policy=policy))
    logger.close()
    runs = store.trial_runs(uri, experiment_id, parent)
    names = {tid: r.info.run_name for tid, r in runs.items()}
    # the number first, so a name the runs table cuts keeps it; masks said, channels the default
    assert names == {"t0": "#1 snip/global", "t1": "#2 magnitude/local masks", "t2": "#3 trial"}
    assert {tid: r.data.tags[store.NUMBER] for tid, r in runs.items()} == {"t0": "1", "t1": "2", "t2": "3"}
    assert all(r.data.tags["ray.trial_id"] == tid == r.data.tags[store.TRIAL_ID] for tid, r in runs.items())

    # a trial run again from scratch (Tune retries it) keeps its number under a fresh run; a
    # resumed search's logger numbers its trials after those recorded (the runner says from where)
    logger = callback.TrialLogger(uri, experiment_id, parent, str(tmp_path), first=4)
    logger.on_trial_start(0, [], _Trial("t9", policy=policies[0]))
    logger.on_trial_start(0, [], _Trial("t9", policy=policies[0]))
    logger.on_trial_start(0, [], _Trial("t10", policy=policies[1]))
    logger.close()
    runs = store.trial_runs(uri, experiment_id, parent)
    assert runs["t9"].info.run_name == "#4 snip/global"
    assert runs["t10"].info.run_name == "#5 magnitude/local masks"
    assert len(runs) == 5


def test_an_agents_episode_is_renamed_by_its_reward_when_it_ends(uri, tmp_path):
    experiment_id, parent, logger = _logger(uri, tmp_path)
    policy = {"structure": "channel", "criterion": "magnitude", "scope": "per_layer"}
    episode = _Trial("e1", last_result={**COST, "reward": 0.8312, "val_acc": 0.8312, FINAL: True}, policy=policy)
    sampled = _Trial("s2", last_result={**COST, "val_acc": 0.9, FINAL: True}, policy={**policy, "method": "sfp"})
    for trial in (episode, sampled):
        logger.on_trial_start(0, [], trial)
    logger.flush()
    assert {r.info.run_name for r in store.trial_runs(uri, experiment_id, parent).values()} == {
        "#1 magnitude/per_layer",
        "#2 magnitude/per_layer/sfp",
    }
    for trial in (episode, sampled):
        logger.on_trial_complete(0, [], trial)
    logger.close()
    runs = store.trial_runs(uri, experiment_id, parent)
    assert runs["e1"].info.run_name == "#1 r=0.83 f=0.50"  # reward and FLOPs kept (COST's flops_ratio)
    assert runs["s2"].info.run_name == "#2 magnitude/per_layer/sfp"  # no reward: named as it started


def test_trial_params_say_requested_and_realised_apart(uri, tmp_path):
    experiment_id, parent, logger = _logger(uri, tmp_path)
    policy = {
        "structure": "channel",
        "criterion": "taylor",
        "scope": "per_layer",
        "ratios": {"layer1": 0.123456, "layer2": 0.5},
        "bn_warmup": True,
        "finetune": {"lr": 0.0123456789},
        "keep": [],
    }
    trial = _Trial("r1", policy=policy)
    trial.config["budget_fraction"] = 0.3333333
    logger.on_trial_start(0, [], trial)
    logger.on_trial_result(0, [], trial, {"epoch": 1, "val_acc": 0.5, "loss": 1.0, **COST})
    logger.close()
    run = store.trial_runs(uri, experiment_id, parent)["r1"]
    assert run.data.params == {
        "policy.structure": "channel",
        "policy.criterion": "taylor",
        "policy.scope": "per_layer",
        "policy.ratios.layer1": "0.1235",  # requested (before the solver scales it to the budget)
        "policy.ratios.layer2": "0.5",
        "policy.bn_warmup": "true",
        "policy.finetune.lr": "0.01235",
        "policy.method": "oneshot",  # logged when the searcher left the default, too
        "budget_fraction": "0.3333",
    }
    realised = {k: v for k, v in run.data.metrics.items() if k.startswith("realised_pruned_fraction.")}
    assert realised == {"realised_pruned_fraction.g": 0.5, "realised_pruned_fraction.h": 0.25}
    assert {a.path for a in _client(uri).list_artifacts(run.info.run_id)} == {"policy.json"}


def test_a_failed_trial_records_its_error(uri, tmp_path):
    experiment_id, parent, logger = _logger(uri, tmp_path)
    trial = _Trial("f1")
    error = tmp_path / "error.txt"
    error.write_text("Traceback ...\nValueError: fpgm cannot mask single weights\n")
    trial.error_file = str(error)
    logger.on_trial_start(0, [], trial)
    logger.on_trial_error(0, [], trial)
    logger.close()
    run = store.trial_runs(uri, experiment_id, parent)["f1"]
    assert run.info.status == "FAILED"
    assert run.data.tags["autoprune.error"] == "ValueError: fpgm cannot mask single weights"
    assert [s for s, _ in _history(uri, run.info.run_id, "trial_wall_s")] == [0]
