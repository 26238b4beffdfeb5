"""Searches that rank on a task's own metric, and the documented user task with its own recipe.

The three example tasks (segmentation on mean IoU, regression on RMSE where lower is better,
a token classifier on accuracy) are searched end to end on one Ray instance started here (a
caller's own instance is used as it is): the best trial is the best by the task's metric in
its direction, summary.json and MLflow name the metric. The guide's ``my_task.py`` is run as
written through the CLI (``prune``, then ``search``), with its train step wrapped to count
its calls in a file, so the count proves the user's step trained the dense model and every
trial."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from pathlib import Path

import pytest

from autoprune.config import Budget, EngineConfig, MeasureConfig, SearchConfig, TaskConfig
from autoprune.contract import better
from autoprune.engine.tasks import get_task
from autoprune.search.ranking import tied

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def _metric_history(uri: str, name: str, key: str) -> list[list[float]]:
    from mlflow.tracking import MlflowClient

    c = MlflowClient(tracking_uri=uri)
    exp = c.get_experiment_by_name(name)
    runs = c.search_runs([exp.experiment_id], max_results=100)
    trials = [r for r in runs if r.data.tags.get("autoprune.role") == "trial" and r.info.status == "FINISHED"]
    return [[m.value for m in c.get_metric_history(r.info.run_id, key)] for r in trials]


@pytest.fixture(scope="module")
def example_searches(tmp_path_factory):
    """The three example tasks searched on one Ray instance: 3 trials of 1 epoch each (the two
    baselines and one sampled policy), the best re-run once, no matched-compute baseline; and
    digits in the ``methods`` space, 12 trials."""
    from autoprune.rayenv import quiet_environment

    quiet_environment()  # token authentication on, before Ray is imported
    import ray

    from autoprune import run_search

    tmp = tmp_path_factory.mktemp("task-search")
    cases = {
        "diabetes": TaskConfig(name="diabetes", batch_size=32),
        "tokens": TaskConfig(name="tokens", batch_size=64),
        "shapes": TaskConfig(name="shapes", model="small_segnet", image_size=32, batch_size=32),
        "methods": TaskConfig(),  # digits, the methods space: 12 trials
    }
    from autoprune.search.ray_connection import no_usage_server, private_temp_dir, stop

    with no_usage_server():  # a local instance of this test's own, as a search starts one
        ray.init(
            address="local", num_cpus=2, include_dashboard=False, _temp_dir=private_temp_dir(), log_to_driver=False
        )
    try:
        out = {}
        for name, task in cases.items():
            engine = EngineConfig(
                task=task,
                train_epochs=1,
                cache_dir=str(tmp / "cache"),
                progress=False,
                measure=MeasureConfig(batch_sizes=(1,), warmup=1, repeats=3),
            )
            config = SearchConfig(
                name=name,
                budget=Budget("flops", 0.5),
                trials=12 if name == "methods" else 3,
                space="methods" if name == "methods" else "default",
                epochs=1,
                final_epochs=1,
                final_top_k=1,
                matched_baseline=False,
                storage=str(tmp / "results"),
                tracking_uri=f"sqlite:///{tmp / 'mlflow.db'}",
                engine=engine,
                progress=False,
            )
            result = run_search(config)
            out[name] = (json.loads((result.out / "summary.json").read_text()), result)
    finally:
        stop()
    return tmp, out


@pytest.mark.parametrize(
    ("name", "key", "mode"), [("diabetes", "rmse", "min"), ("tokens", "acc", "max"), ("shapes", "miou", "max")]
)
def test_a_search_ranks_on_the_tasks_metric(example_searches, name, key, mode):
    tmp, found = example_searches
    summary, result = found[name]
    assert summary["metric"] == f"val_{key}"
    assert summary["task_metric"] == {"name": key, "key": f"val_{key}", "mode": mode, "percent": key != "rmse"}
    assert {f"val_{key}", f"test_{key}"} <= set(summary["dense"]) and f"test_{key}" in summary["best"]
    assert summary["best"]["flops_ratio"] <= 0.5 + 1e-9
    # the trial it re-ran is the best completed one within the budget in the metric's direction
    # (accuracy: or one within the validation split's noise of it, a tie given to the simpler policy)
    done = [r for r in result.trials if r.status == "completed" and r.metrics["flops_ratio"] <= 0.5 + 1e-9]
    assert len(done) >= 2 and "final_reruns" not in summary
    best_value = (min if mode == "min" else max)(r.metrics[f"val_{key}"] for r in done)
    chosen = summary["best"][f"search_val_{key}"]
    if key == "acc":
        assert tied(chosen, best_value, len(get_task(TaskConfig(name=name)).val))
    else:
        assert chosen == pytest.approx(best_value)
        assert all(not better(f"val_{key}", r.metrics[f"val_{key}"], chosen) for r in done)
    # MLflow: every finished trial run has the metric's series over its epochs, under its own key
    series = _metric_history(f"sqlite:///{tmp / 'mlflow.db'}", name, f"epochs/val_{key}")
    assert series and all(len(s) == 1 and all(math.isfinite(v) for v in s) for s in series)
    assert not any(_metric_history(f"sqlite:///{tmp / 'mlflow.db'}", name, "epochs/val_acc")) or key == "acc"


def test_the_methods_space_compares_methods_and_logs_each_trials_method(example_searches):
    """``--space methods --trials 12`` on digits: each trial's MLflow run names its method and
    options, several methods are tried, and every completed trial met the budget."""
    from mlflow.tracking import MlflowClient

    from autoprune.engine.methods import METHODS

    tmp, found = example_searches
    summary, result = found["methods"]
    c = MlflowClient(tracking_uri=f"sqlite:///{tmp / 'mlflow.db'}")
    runs = c.search_runs([c.get_experiment_by_name("methods").experiment_id], max_results=100)
    trials = [r for r in runs if r.data.tags.get("autoprune.role") == "trial"]
    assert len(trials) == len(result.trials) >= 12
    methods = [r.data.params["policy.method"] for r in trials]
    assert set(methods) <= set(METHODS.names()) and len(set(methods) - {"oneshot"}) >= 3
    for r, method in zip(trials, methods):  # a run's name says its method unless it is the default
        said = r.info.run_name.split(" ")[1].split("/")[2:]  # "#7 snip/global/sfp": after criterion and scope
        assert said == ([method] if method != "oneshot" else []), r.info.run_name
    for r in trials:
        options = {k for k in r.data.params if k.startswith("policy.method_options.")}
        assert options == {f"policy.method_options.{k}" for k in METHODS.get(r.data.params["policy.method"]).space}
    done = [t for t in result.trials if t.status == "completed"]
    assert len(done) >= 10 and all(t.metrics["flops_ratio"] <= 0.5 + 1e-9 for t in done)
    assert summary["best"]["flops_ratio"] <= 0.5 + 1e-9


def _readme_task(tmp: Path) -> Path:
    """The guide's my_task.py as written, with its train step wrapped to count its calls."""
    block = re.search(
        r"```python\n(# my_task\.py.*?)```", (ROOT / "docs/src/guides/own-task.md").read_text(), re.S
    ).group(1)
    counting = (
        "\n\nimport os as _os\n\n_users_step = train_step\n\n\n"
        "def train_step(model, x, y):  # the test's wrapper: one byte per call\n"
        "    with open(_os.environ['STEPS_FILE'], 'a') as f:\n"
        "        f.write('.')\n"
        "    return _users_step(model, x, y)\n"
    )
    (tmp / "my_task.py").write_text(block + counting)
    return tmp / "steps"


def test_the_documented_user_task_runs_its_own_step_in_prune_and_search(tmp_path, cli):
    steps = _readme_task(tmp_path)
    env = {
        "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "AUTOPRUNE_CACHE": str(tmp_path / "cache"),
        "STEPS_FILE": str(steps),
    }
    per_epoch = math.ceil(1000 / 64)
    task = ["--task", "my_task:build", "--train-epochs", "1", "--budget-flops", "0.5"]
    proc = cli("prune", *task, "--finetune-epochs", "1", "--out", str(tmp_path / "p"), env=env)
    assert proc.returncode == 0, proc.stderr
    assert steps.read_text() == "." * (2 * per_epoch)  # one dense epoch and one of fine-tuning
    pruned = json.loads((tmp_path / "p" / "summary.json").read_text())
    assert pruned["pruned"]["flops_ratio"] <= 0.5 + 1e-9 and pruned["metric"]["key"] == "val_acc"

    steps.unlink()
    search = [*task, "--trials", "3", "--epochs", "1", "--final-epochs", "1", "--final-top-k", "1"]
    search += ["--no-matched-baseline"]
    where = ["--storage", str(tmp_path / "s"), "--name", "mine", "--no-progress"]
    proc = cli("search", *search, *where, env=env, timeout=900, cwd=tmp_path)  # its MLflow store there
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((tmp_path / "s" / "mine" / "best" / "summary.json").read_text())
    assert summary["best"]["flops_ratio"] <= 0.5 + 1e-9
    completed, failed = summary["trials"]["completed"], summary["trials"]["failed"]
    reran = summary.get("final_reruns", {"val_acc": {}, "seeds": 0})
    runs = completed + len(reran["val_acc"]) * reran["seeds"] + 1
    # the dense model is cached: every step counted is a trial's, a re-run's or the final run's
    assert completed >= 2 and failed == 0 and len(steps.read_text()) == runs * per_epoch


def test_a_metric_the_task_does_not_report_is_refused_before_any_work(tmp_path):
    from autoprune import run_search
    from autoprune.errors import AutopruneError

    engine = EngineConfig(task=TaskConfig(name="diabetes"), cache_dir=str(tmp_path / "cache"))
    config = SearchConfig(name="m", storage=str(tmp_path / "r"), engine=engine, metric="val_acc", progress=False)
    with pytest.raises(AutopruneError, match=r"unknown --metric 'val_acc' for task 'diabetes', which reports val_rmse"):
        run_search(config)
    assert not (tmp_path / "cache").exists() and not (tmp_path / "r" / "m").exists()
    amc = dataclasses.replace(config, metric=None, searcher="amc", epochs=0)
    with pytest.raises(AutopruneError, match="rewards a metric in 0..1 where higher is better"):
        run_search(amc)
