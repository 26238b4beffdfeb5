"""The public Python surface: ``autoprune.__all__``, its lazy names and the deprecated
``autoprune.tasks`` alias."""

from __future__ import annotations

import inspect
import subprocess
import sys
import warnings

import pytest

import autoprune
from autoprune.config import Budget, FinetuneConfig, Policy


def _in_fresh_interpreter(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return out.stdout.strip()


def test_old_task_import_works_and_warns_once():
    """A task file written for the old layout (``from autoprune.tasks import Task``) still
    loads: the alias warns once per process, naming the new import, and hands out the
    engine's own classes and functions."""
    code = (
        "import warnings\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    from autoprune.tasks import Task\n"
        "    from autoprune.tasks import get_task, labels_of\n"
        "    import autoprune.tasks\n"
        "import autoprune.engine.tasks as new\n"
        "assert Task is new.Task and get_task is new.get_task and labels_of is new.labels_of\n"
        "for w in caught:\n"
        "    print(w.category.__name__, '|', w.message)\n"
    )
    lines = [line for line in _in_fresh_interpreter(code).splitlines() if "autoprune.tasks" in line]
    assert len(lines) == 1, lines
    category, message = lines[0].split(" | ", 1)
    assert category == "DeprecationWarning"
    assert "autoprune.engine.tasks" in message


def test_old_task_module_exports_what_it_exported():
    import autoprune.engine.tasks as new

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import autoprune.tasks as old

    assert set(new.__all__) <= set(old.__all__)
    for name in old.__all__:
        assert hasattr(old, name), name
    for name in ("Task", "TASKS", "get_task", "check_task_config", "labels_of", "stratified_split"):
        assert getattr(old, name) is getattr(new, name), name


def test_task_is_the_engines_task():
    import autoprune.engine.tasks

    assert autoprune.Task is autoprune.engine.tasks.Task
    assert autoprune.get_task is autoprune.engine.tasks.get_task


@pytest.mark.parametrize("name", autoprune.__all__)
def test_every_public_name_resolves_and_is_documented(name):
    value = getattr(autoprune, name)
    if name == "__version__":
        assert isinstance(value, str) and value
        return
    assert inspect.isclass(value) or inspect.isfunction(value), name
    doc = value.__dict__.get("__doc__") if inspect.isclass(value) else value.__doc__
    assert doc and doc.strip(), f"autoprune.{name} has no docstring"
    assert not doc.startswith(f"{name}("), f"autoprune.{name} has only the dataclass's generated docstring"


def test_all_is_what_dir_offers():
    assert set(autoprune.__all__) <= set(dir(autoprune))
    with pytest.raises(AttributeError):
        autoprune.no_such_name  # noqa: B018


def test_the_lazy_names_stay_unimported():
    """``import autoprune`` imports no torch, Ray, MLflow nor Optuna; ``autoprune.Task``
    brings torch only."""
    heavy = "print(' '.join(m for m in ('torch', 'ray', 'mlflow', 'optuna') if m in sys.modules))"
    assert _in_fresh_interpreter(f"import sys, autoprune\n{heavy}") == ""
    assert _in_fresh_interpreter(f"import sys, autoprune\nautoprune.Task\n{heavy}") == "torch"


@pytest.mark.slow  # trains the dense digits model unless the session already has
def test_prune_is_the_python_apis_one_call(engine_cfg, digits_dense):
    """``autoprune.prune``: the task's cached dense model, pruned to the budget and measured."""
    policy = Policy(criterion="magnitude", finetune=FinetuneConfig(epochs=0))
    budget = Budget("flops", 0.5)
    result = autoprune.prune(policy, budget, engine_cfg)
    assert isinstance(result, autoprune.RunResult)
    assert result.pruned["flops_ratio"] <= budget.fraction + budget.tolerance
    assert "test_acc" not in result.pruned


@pytest.mark.parametrize("switch, disabled", [(None, "true"), ("on", None)])
def test_library_telemetry_is_off_unless_the_user_opts_in(switch, disabled):
    """MLflow 3 sends usage telemetry by default: importing autoprune turns it (and Ray's
    usage stats) off, unless AUTOPRUNE_TELEMETRY=on leaves the libraries to decide."""
    import json
    import os

    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_DISABLE_TELEMETRY", "RAY_USAGE_STATS_ENABLED")}
    if switch is not None:
        env["AUTOPRUNE_TELEMETRY"] = switch
    code = (
        "import json, os, autoprune; "
        "print(json.dumps([os.environ.get('MLFLOW_DISABLE_TELEMETRY'), os.environ.get('RAY_USAGE_STATS_ENABLED')]))"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert json.loads(out) == [disabled, None if disabled is None else "0"]
