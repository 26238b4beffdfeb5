"""Promises about the repository itself."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_exactly_the_readme_test_command():
    blocks = re.findall(r"```bash\n(.*?)\n```", (ROOT / "README.md").read_text(), re.S)
    install_and_run, install_and_test = blocks[0].strip(), blocks[1].strip()
    assert "autoprune " in install_and_run
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line and not line.startswith("#")]
    assert ci[-1] == install_and_test


def test_import_is_light():
    code = "import sys, autoprune; print(any(m in sys.modules for m in ('torch', 'ray', 'mlflow', 'optuna')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_agents_and_spaces_install_under_the_autoprune_namespace():
    import autoprune.agents
    import autoprune.search_spaces

    assert Path(autoprune.agents.__file__).parent.name == "agents"
    assert Path(autoprune.search_spaces.__file__).parent.name == "search_spaces"


def test_readme_policy_example_is_a_valid_policy():
    import json

    from autoprune.config import Policy

    block = re.search(r"```json\n(.*?)```", (ROOT / "docs/src/guides/prune.md").read_text(), re.S).group(1)
    policy = Policy.from_dict(json.loads(block))
    assert policy.scope == "per_layer" and policy.ratios


def _modules_after(code: str) -> set[str]:
    """The heavy packages imported by running ``code`` in a fresh interpreter."""
    probe = (
        f"import sys\ntry:\n    {code}\nexcept SystemExit:\n    pass\n"
        "print(' '.join(sorted(m for m in ('torch', 'ray', 'mlflow', 'optuna') if m in sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=ROOT)
    return set(out.stdout.split())


def test_plain_data_and_help_stay_light():
    assert _modules_after("from autoprune.config import Policy; Policy()") == set()
    assert _modules_after("from autoprune.contract import TrialConfig; TrialConfig()") == set()
    for argv in (["--help"], ["ui", "--help"], ["search", "--help"], ["prune", "--help"]):
        assert "ray" not in _modules_after(f"from autoprune.cli import main; main({argv!r})"), argv


def test_no_module_is_a_crowd():
    """The house rule: no module under autoprune/ (or the installed top-level folders) passes 400 lines."""
    long = {
        str(p.relative_to(ROOT)): n
        for folder in ("autoprune", "search_spaces", "agents")
        for p in (ROOT / folder).rglob("*.py")
        if (n := len(p.read_text().splitlines())) > 400
    }
    assert not long, long


def test_no_function_is_a_saga():
    """The house rule beside it: no function under autoprune/ passes 80 lines (docstring
    included); a longer one is split into named steps."""
    import ast

    long = {
        f"{p.relative_to(ROOT)}:{node.name}": node.end_lineno - node.lineno + 1
        for folder in ("autoprune", "search_spaces", "agents")
        for p in (ROOT / folder).rglob("*.py")
        for node in ast.walk(ast.parse(p.read_text()))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 80
    }
    assert not long, long


def test_import_contracts_hold():
    """The layers, the engine's independence and the absence of cycles (pyproject.toml's
    [tool.importlinter]); CI runs the same command before the tests."""
    lint = Path(sys.executable).with_name("lint-imports")  # the test extra installs it beside python
    out = subprocess.run([str(lint), "--no-logo", "--no-cache"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stdout[-3000:]
    assert "0 broken" in out.stdout


def test_the_constraints_pin_every_dependency_within_its_bounds():
    """`.ci/run` installs with `.ci/constraints.txt`: each dependency that pyproject.toml
    declares (the test extra's too) is pinned there, at a version its bounds allow."""
    import tomllib
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = {}
    for line in (ROOT / ".ci" / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[canonicalize_name(name)] = version.strip()
    for spec in project["dependencies"] + project["optional-dependencies"]["test"]:
        req = Requirement(spec)
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is not pinned in .ci/constraints.txt"
        assert req.specifier.contains(pins[name], prereleases=True), f"{req.name}=={pins[name]} is outside {spec!r}"


def test_every_package_of_the_source_tree_is_installed():
    """A package missing from pyproject's list works in a development checkout and is absent
    from an installed autoprune."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {"autoprune.agents", "autoprune.search_spaces"}
    for init in (ROOT / "autoprune").rglob("__init__.py"):
        found.add(".".join(init.parent.relative_to(ROOT).parts))
    assert found == listed
