"""The `autoprune` command line, run as a user runs it: a real subprocess, or in this process
through ``cli.main`` (``cli_here``) where a new interpreter adds nothing but its start-up."""

from __future__ import annotations

import json
import os
import re

import pytest
import torch

from autoprune.engine.methods import METHODS


@pytest.fixture(scope="module")
def channel_run(cli, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "d"
    proc = cli(
        "prune",
        "--criterion",
        "magnitude",
        "--scope",
        "local",
        "--structure",
        "channel",
        "--budget-flops",
        "0.5",
        "--finetune-epochs",
        "2",
        "--out",
        str(out),
    )
    assert proc.returncode == 0, proc.stderr
    return out, proc


@pytest.mark.slow
def test_prune_meets_budget_and_keeps_accuracy(channel_run):
    out, proc = channel_run
    summary = json.loads((out / "summary.json").read_text())
    for key in ("task", "model", "policy", "ratios", "dense", "pruned"):
        assert key in summary
    for part in ("dense", "pruned"):
        for key in ("flops", "params", "val_acc", "test_acc", "latency_measured_ms"):
            assert summary[part][key] is not None
        assert 0 <= summary[part]["test_acc"] <= 1
    for key in ("flops_ratio", "params_ratio", "speedup"):
        assert key in summary["pruned"]
    assert 0.49 <= summary["pruned"]["flops_ratio"] <= 0.50
    # uniform magnitude at half the FLOPs, 2 epochs: within 3 points of dense (2.2 with a dense
    # model trained on 1 torch thread: the float sums, hence the weights, differ with the threads)
    assert abs(summary["pruned"]["test_acc"] - summary["dense"]["test_acc"]) <= 0.03
    assert set(summary["ratios"]) and all(0 <= r < 1 for r in summary["ratios"].values())
    # the table a person reads
    for word in ("test accuracy", "FLOPs", "params", "latency (batch 1)", "ideal speed-up"):
        assert word in proc.stdout
    assert re.search(r"latency \(batch 1\).*speed-up \d+\.\d\dx", proc.stdout)  # measured, per batch
    assert (out / "policy.json").is_file() and (out / "model.pt").is_file()


@pytest.mark.slow
def test_evaluate_reproduces_accuracy_and_flops_exactly(cli, channel_run):
    out, _ = channel_run
    summary = json.loads((out / "summary.json").read_text())
    proc = cli("evaluate", str(out / "model.pt"), "--json")
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    assert got["test_acc"] == summary["pruned"]["test_acc"]
    assert got["val_acc"] == summary["pruned"]["val_acc"]
    assert got["flops"] == summary["pruned"]["flops"]
    assert got["params"] == summary["pruned"]["params"]
    table = cli("evaluate", str(out / "model.pt"), "--task", "digits")
    assert table.returncode == 0 and "test accuracy" in table.stdout


@pytest.mark.slow
def test_policy_file_replays(cli, channel_run, tmp_path):
    out, _ = channel_run
    proc = cli(
        "prune",
        "--policy",
        str(out / "policy.json"),
        "--finetune-epochs",
        "0",
        "--budget-flops",
        "0.7",
        "--out",
        str(tmp_path / "again"),
    )
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((tmp_path / "again" / "summary.json").read_text())
    assert summary["policy"]["criterion"] == "magnitude"
    assert summary["policy"]["finetune"]["epochs"] == 0
    assert 0.69 <= summary["pruned"]["flops_ratio"] <= 0.70


@pytest.mark.slow
def test_unstructured_meets_effective_budget(cli, tmp_path):
    proc = cli(
        "prune",
        "--criterion",
        "magnitude",
        "--scope",
        "local",
        "--structure",
        "unstructured",
        "--budget-flops",
        "0.3",
        "--finetune-epochs",
        "2",
        "--out",
        str(tmp_path / "u"),
    )
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((tmp_path / "u" / "summary.json").read_text())
    assert 0.29 <= summary["pruned"]["flops_ratio"] <= 0.30
    state = torch.load(tmp_path / "u" / "model.pt", weights_only=True)["state_dict"]
    zeros = sum(int((v == 0).sum()) for k, v in state.items() if k.endswith("weight") and v.dim() > 1)
    assert zeros > 0.5 * sum(v.numel() for k, v in state.items() if k.endswith("weight") and v.dim() > 1)


@pytest.mark.slow
def test_export_pt2_and_onnx(cli, channel_run, tmp_path):
    from autoprune.engine.checkpoint import load_model

    out, _ = channel_run
    model, task, _ = load_model(out / "model.pt")
    x = next(iter(task.loader("test")))[0][:1]
    proc = cli("export", str(out / "model.pt"), "--format", "pt2", "--out", str(tmp_path / "m.pt2"))
    assert proc.returncode == 0, proc.stderr
    program = torch.export.load(str(tmp_path / "m.pt2"))
    torch.testing.assert_close(program.module()(x), model(x))
    onnx = pytest.importorskip("onnx")
    proc = cli("export", str(out / "model.pt"), "--format", "onnx", "--out", str(tmp_path / "m.onnx"))
    assert proc.returncode == 0, proc.stderr
    graph = onnx.load(str(tmp_path / "m.onnx"))
    onnx.checker.check_model(graph)
    conv_channels = [init.dims[0] for init in graph.graph.initializer if len(init.dims) == 4]
    assert conv_channels and max(conv_channels) < 64  # the exported graph is the thin one


@pytest.mark.parametrize(
    "what, expected",
    [
        (
            "criteria",
            [
                "random",
                "magnitude",
                "fpgm",
                "bn_scale",
                "taylor",
                "snip",
                "grasp",
                "synflow",
                "fisher",
                "hutchinson",
                "probes=10",
                "temperature=200",
            ],
        ),
        ("structures", ["channel", "unstructured"]),
        ("scopes", ["global", "local", "per_layer"]),
        ("methods", METHODS.names()),
        ("tasks", ["digits", "cifar10", "imagefolder", "package.module:function"]),
        ("groups", ["stem.0", "layers.0.conv1"]),
    ],
)
def test_list(cli_here, what, expected):
    proc = cli_here("list", what)
    assert proc.returncode == 0, proc.stderr
    for name in expected:
        assert name in proc.stdout


ALL_CRITERIA = ["random", "magnitude", "fpgm", "bn_scale", "taylor", "snip", "grasp", "synflow", "fisher", "hutchinson"]


@pytest.mark.parametrize("name", ALL_CRITERIA)
def test_prune_with_every_criterion_meets_the_budget(cli_here, tmp_path, name):
    out = tmp_path / "d"
    proc = cli_here("prune", "--criterion", name, "--budget-flops", "0.5", "--finetune-epochs", "0", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["policy"]["criterion"] == name
    assert 0.49 <= summary["pruned"]["flops_ratio"] <= 0.50
    collapse = summary["collapse"]
    assert set(collapse["kept_fraction"]) == set(summary["ratios"])
    assert all(abs(collapse["kept_fraction"][g] - (1 - r)) < 1e-12 for g, r in summary["ratios"].items())
    assert [e["target"] for e in summary["prune_events"]] == [0.5]


def test_criterion_options_reach_the_criterion(cli_here, tmp_path):
    out = tmp_path / "d"
    proc = cli_here(
        "prune",
        "--criterion",
        "magnitude",
        "--criterion-option",
        "p=2",
        "--structure",
        "unstructured",
        "--budget-flops",
        "0.5",
        "--finetune-epochs",
        "0",
        "--out",
        str(out),
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads((out / "policy.json").read_text())["criterion_options"] == {"p": 2}


def test_prune_and_export_write_over_earlier_results_only_when_told(cli_here, tmp_path):
    out = tmp_path / "d"
    prune = ["prune", "--finetune-epochs", "0", "--out", str(out)]
    assert cli_here(*prune).returncode == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    again = cli_here(*prune, "--budget-flops", "0.6")
    assert again.returncode == 2 and "already holds" in again.stderr and "--overwrite" in again.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing replaced
    assert cli_here(*prune, "--budget-flops", "0.6", "--overwrite").returncode == 0
    assert json.loads((out / "policy.json").read_text()) and (out / "model.pt").read_bytes() != before["model.pt"]
    target = tmp_path / "m.pt2"
    export = ["export", str(out / "model.pt"), "--out", str(target)]
    assert cli_here(*export).returncode == 0
    first = target.read_bytes()
    refused = cli_here(*export)
    assert refused.returncode == 2 and "exists" in refused.stderr and target.read_bytes() == first
    assert cli_here(*export, "--overwrite").returncode == 0


# Bad input (flags, policy files, checkpoints, model files) is tested table-driven in
# tests/test_bad_input.py.


def test_unsupported_layer_is_reported_before_training(cli, tmp_path):
    pkg = tmp_path / "usertask_bad"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(
        "import torch\n"
        "from torch import nn\n"
        "from autoprune.engine.tasks import digits_task\n"
        "from autoprune.config import TaskConfig\n"
        "class Odd(nn.Module):  # a conv with its own weight: the graph cannot follow it\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.w = nn.Parameter(torch.randn(16, 16, 3, 3))\n"
        "    def forward(self, x):\n"
        "        return torch.nn.functional.conv2d(x, self.w, padding=1)\n"
        "class Net(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.conv = nn.Conv2d(1, 16, 3, padding=1)\n"
        "        self.odd = Odd()\n"
        "        self.fc = nn.Linear(16 * 64, 10)\n"
        "    def forward(self, x):\n"
        "        return self.fc(self.odd(self.conv(x)).flatten(1))\n"
        "def task():\n"
        "    t = digits_task(TaskConfig())\n"
        "    t.model_factory = Net\n"
        "    t.model_name = 'odd'\n"
        "    return t\n"
    )
    cache = tmp_path / "cache"
    env = {"AUTOPRUNE_CACHE": str(cache), "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = cli("prune", "--task", "usertask_bad:task", "--out", str(tmp_path / "o"), env=env)
    assert proc.returncode == 2, proc.stderr
    assert "group 'conv' breaks the forward pass" in proc.stderr and "--keep 'conv'" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not cache.exists() or not any(cache.iterdir())
