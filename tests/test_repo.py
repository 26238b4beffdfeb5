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
    code = "import sys, autoprune; print(any(m in sys.modules for m in ('ray', 'mlflow', 'optuna')))"
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

    block = re.search(r"```json\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    policy = Policy.from_dict(json.loads(block))
    assert policy.scope == "per_layer" and policy.ratios
