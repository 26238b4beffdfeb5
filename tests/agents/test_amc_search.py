"""``autoprune search --searcher amc`` end to end: real Ray, real MLflow, the AMC agent
proposing every episode and learning from the trials' rewards."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.slow

EPISODES = 12
BUDGET = 0.5


@pytest.fixture(scope="module")
def amc_search(tmp_path_factory, engine_cfg):
    import subprocess
    import sys
    from pathlib import Path

    tmp = tmp_path_factory.mktemp("amc")
    exe = Path(sys.executable).with_name("autoprune")
    args = [str(exe), "search", "--searcher", "amc", "--trials", str(EPISODES), "--budget-flops", str(BUDGET)]
    args += ["--name", "amc", "--storage", str(tmp / "results"), "--tracking-uri", f"sqlite:///{tmp / 'mlflow.db'}"]
    args += ["--final-epochs", "1", "--warmup-episodes", "4", "--no-progress", "--cache-dir", engine_cfg.cache_dir]
    args += ["--no-matched-baseline"]  # the agent's own best episode is the model (tests/search: the comparison)
    proc = subprocess.run(args, capture_output=True, text=True, timeout=900, cwd=tmp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp, proc


def test_every_episode_is_a_child_run_with_its_actions_and_reward(amc_search):
    from mlflow.tracking import MlflowClient

    tmp, proc = amc_search
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp / 'mlflow.db'}")
    exp = client.get_experiment_by_name("amc")
    runs = client.search_runs([exp.experiment_id], max_results=100)
    parents = [r for r in runs if r.data.tags.get("autoprune.role") == "search"]
    children = [r for r in runs if r.data.tags.get("autoprune.role") == "trial"]
    assert len(parents) == 1 and len(children) == EPISODES
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
    assert parents[0].data.params["searcher"] == "amc"
    groups = None
    for child in children:
        assert child.info.status == "FINISHED"
        params, metrics = child.data.params, child.data.metrics
        ratios = {
            k.removeprefix("policy.ratios."): float(v) for k, v in params.items() if k.startswith("policy.ratios.")
        }
        groups = groups or set(ratios)
        assert set(ratios) == groups and len(groups) >= 5  # every group has its action
        assert params["policy.exact"] == "true" and params["policy.scope"] == "per_layer"
        # the reward (form acc) is the accuracy after BN recalibration, without fine-tuning
        assert metrics["reward"] == pytest.approx(metrics["recal_acc"]) and 0 < metrics["recal_acc"] <= 1
        assert metrics["flops_ratio"] <= BUDGET + 1e-6  # the legal-action clip kept the hard budget
        assert metrics["latency_predicted_ms"] > 0 and metrics["latency_ratio"] < 1
        # the realised fractions are the agent's (exact) allocation
        for g, r in ratios.items():
            assert metrics[f"realised_pruned_fraction.{g}"] == pytest.approx(r, abs=1e-4)  # params keep 4 digits
    actions = {tuple(sorted(c.data.params[f"policy.ratios.{g}"] for g in groups)) for c in children}
    assert len(actions) == EPISODES  # every episode proposed its own allocation


def test_the_best_episode_is_fine_tuned_and_saved_within_budget(amc_search):
    tmp, proc = amc_search
    summary = json.loads((tmp / "results" / "amc" / "best" / "summary.json").read_text())
    assert summary["searcher"] == "amc" and summary["agent"]["reward"] == "acc"
    # the best episode uses its budget: its allocation is filled to within 1% below it
    assert BUDGET - 0.01 <= summary["best"]["flops_ratio"] <= BUDGET + 1e-6
    assert summary["best"]["policy"]["exact"] is True
    # the agent's learning curve: every episode's reward, in order, the best episode's among them
    curve = summary["reward_curve"]
    assert len(curve) == EPISODES and all(0 < r <= 1 for r in curve)
    assert "uniform_matched" not in summary and summary["best"]["source"] == "trial"
    assert (tmp / "results" / "amc" / "best" / "model.pt").is_file()
    assert f"{EPISODES} trials: {EPISODES} completed" in proc.stdout


def test_prune_replays_the_best_episode_exactly(amc_search, cli):
    tmp, _ = amc_search
    best = tmp / "results" / "amc" / "best"
    summary = json.loads((best / "summary.json").read_text())
    out = tmp / "replay"
    args = ("--policy", str(best / "policy.json"), "--budget-flops", str(BUDGET), "--finetune-epochs", "0")
    proc = cli("prune", *args, "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    replayed = json.loads((out / "summary.json").read_text())
    assert replayed["ratios"] == pytest.approx(summary["best"]["ratios"])  # exact: the same channels per group
    assert replayed["pruned"]["flops_ratio"] == pytest.approx(summary["best"]["flops_ratio"])


def test_the_mlflow_view_of_an_agent_speaks_of_episodes_and_rewards(amc_search):
    import re

    from mlflow.tracking import MlflowClient

    tmp, _ = amc_search
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp / 'mlflow.db'}")
    exp = client.get_experiment_by_name("amc")
    runs = client.search_runs([exp.experiment_id], max_results=100)
    [parent] = [r for r in runs if r.data.tags.get("autoprune.role") == "search"]
    for child in (r for r in runs if r is not parent):  # named by what tells episodes apart
        name, metrics = child.info.run_name, child.data.metrics
        assert re.fullmatch(r"#\d+ r=\d\.\d\d f=\d\.\d\d", name), name
        assert name.split()[1:] == [f"r={metrics['reward']:.2f}", f"f={metrics['flops_ratio']:.2f}"]
    params = parent.data.params  # the agent's settings as it ran, not a sampler's
    assert params["agent.warmup_episodes"] == "4" and params["epochs"] == "0"
    assert "space" not in params and "metric" not in params
    note = parent.data.tags["mlflow.note.content"]
    assert "the highest reward" in note and "before any fine-tuning" in note and "space" not in note
    files = {f.path for f in client.list_artifacts(parent.info.run_id)}
    assert {"reward.png", "optimisation_history.png", "accuracy_vs_cost.png"} <= files
    assert "criteria.png" not in files  # one criterion: no chart of one bar
    view = json.loads(exp.tags["mlflow.sharedViewState.trials"])
    assert view["orderByKey"] == "metrics.`reward`" and "metrics.`reward`" in view["selectedColumns"]
