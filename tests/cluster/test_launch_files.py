"""The cluster launch files: the autoscaler configs pass Ray's own validation offline, the
KubeRay manifests run `autoprune search`, and nothing disables token authentication."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

CLUSTER = Path(__file__).resolve().parents[2] / "cluster"


@pytest.mark.parametrize("name", ["aws", "gcp"])
def test_autoscaler_configs_pass_rays_validation(name):
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((CLUSTER / f"{name}.yaml").read_text())
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)  # raises on a schema error
    types = prepared["available_node_types"]
    assert types[prepared["head_node_type"]]["resources"] == {"CPU": 0}  # no trials on the head
    assert sum(1 for t in types if t.startswith("gpu")) == 2  # two GPU worker types
    setup = " ".join(prepared["setup_commands"])
    assert "pip install" in setup and "autoprune" in setup
    assert "mlflow-server.sh start" in " ".join(prepared["head_setup_commands"])
    starts = prepared["head_start_ray_commands"] + prepared["worker_start_ray_commands"]
    assert all("RAY_AUTH_MODE=token" in c for c in starts)
    assert not any("ray stop" in c for c in starts)
    assert prepared["file_mounts"]["~/.ray/auth_token"]  # every node gets the same token


@pytest.mark.parametrize("name", ["raycluster", "rayjob"])
def test_kuberay_manifests(name):
    doc = yaml.safe_load((CLUSTER / "kuberay" / f"{name}.yaml").read_text())
    assert doc["apiVersion"] == "ray.io/v1"
    spec = doc["spec"] if name == "raycluster" else doc["spec"]["rayClusterSpec"]
    if name == "rayjob":
        assert doc["kind"] == "RayJob" and doc["spec"]["entrypoint"].startswith("autoprune search --address auto")
    else:
        assert doc["kind"] == "RayCluster"
    pods = [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]
    for pod in pods:
        env = {e["name"]: e["value"] for e in pod["spec"]["containers"][0]["env"]}
        assert env["RAY_AUTH_MODE"] == "token"
    gpus = [
        g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu")
        for g in spec["workerGroupSpecs"]
    ]
    assert all(gpus)


def test_scripts_are_valid_bash_and_refuse_unknown_options(tmp_path):
    import subprocess

    for script in ("local.sh", "mlflow-server.sh"):
        assert subprocess.run(["bash", "-n", str(CLUSTER / script)]).returncode == 0
        proc = subprocess.run(["bash", str(CLUSTER / script), "status", "--bogus"], capture_output=True, text=True)
        assert proc.returncode == 2 and "unknown option '--bogus'" in proc.stderr


@pytest.mark.slow
def test_the_mlflow_server_binds_loopback_and_stops(tmp_path):
    import os
    import socket
    import subprocess
    import sys
    import urllib.request

    import psutil

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "AUTOPRUNE_MLFLOW_DIR": str(tmp_path), "MLFLOW": str(Path(sys.executable).with_name("mlflow"))}
    script = str(CLUSTER / "mlflow-server.sh")
    start = subprocess.run(
        ["bash", script, "start", "--port", str(port)], env=env, capture_output=True, text=True, timeout=120
    )
    try:
        assert start.returncode == 0, start.stderr
        assert urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5).status == 200
        pid = int((tmp_path / "server.pid").read_text())
        tree = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
        listening = {c.laddr for p in tree for c in p.net_connections() if c.status == psutil.CONN_LISTEN}
        assert listening and {a.ip for a in listening} == {"127.0.0.1"}
        assert (tmp_path / "mlflow.db").is_file()  # the database backend
    finally:
        subprocess.run(["bash", script, "stop"], env=env, timeout=60)
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in tree)
