"""The cluster launch files: the autoscaler configs pass Ray's own validation offline and say
what a working cluster needs (pinned image, GPU resources, driver, cloud SDK, storage that
outlives the head, token authentication), and the scripts refuse what they do not understand
(their commands run in test_cloud_commands.py)."""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

CLUSTER = Path(__file__).resolve().parents[2] / "cluster"


def _prepared(name: str) -> dict:
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(copy.deepcopy(yaml.safe_load((CLUSTER / f"{name}.yaml").read_text())))
    validate_config(config)  # raises on a schema error
    return config


def _container_env(options: list[str]) -> dict[str, str]:
    """The variables a docker run option list sets with --env."""
    pairs = [shlex.split(o)[1] for o in options if o.startswith("--env ")]
    return dict(p.split("=", 1) for p in pairs)


@pytest.mark.parametrize("name", ["aws", "gcp"])
def test_autoscaler_configs_pass_rays_validation(name):
    import ray

    config = _prepared(name)
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"] == {"CPU": 0}  # no trials on the head
    gpu_types = [t for key, t in types.items() if key.startswith("gpu")]
    assert len(gpu_types) == 2
    for t in gpu_types:  # stated, so that the autoscaler can scale a type up from zero
        assert t["resources"]["GPU"] >= 1 and t["resources"]["CPU"] >= 1 and t["min_workers"] == 0
        assert any("nvidia-smi" in c for c in t["initialization_commands"])  # the driver is there
    # Ray's own image of the installed Ray version and Python 3.11, on every node
    assert config["docker"]["image"] == f"rayproject/ray:{ray.__version__}-py311-gpu"
    assert config["docker"]["head_image"] == f"rayproject/ray:{ray.__version__}-py311-cpu"
    if name == "aws":  # an AMI of its own, not Ray's default; workers get a profile for the bucket
        assert all(t["node_config"]["ImageId"] for t in types.values())
        assert all(t["node_config"]["IamInstanceProfile"]["Name"] == "autoprune-worker" for t in gpu_types)
    else:  # a driver for the GPU types, and a service account for the bucket
        for t in gpu_types:
            assert {"key": "install-nvidia-driver", "value": "True"} in t["node_config"]["metadata"]["items"]
            assert t["node_config"]["serviceAccounts"][0]["email"].startswith("autoprune-worker@")
    install = "bash $HOME/autoprune/cluster/node-setup.sh install"
    assert config["worker_setup_commands"] == [install]  # (Ray puts setup_commands first)
    assert config["head_setup_commands"] == [install, f"bash $HOME/autoprune/cluster/node-setup.sh head {name}"]
    # MLflow's store lives on a volume mounted from a disk that is not the head's own
    env = _container_env(config["docker"]["head_run_options"])
    volume = "/mnt/autoprune-mlflow"
    assert env["AUTOPRUNE_MLFLOW_BACKEND"] == f"sqlite:///{volume}/mlflow.db"
    assert env["AUTOPRUNE_MLFLOW_ARTIFACTS"].startswith(volume)
    assert f"--volume {volume}:{volume}" in config["docker"]["head_run_options"]
    assert any(f"mount $dev {volume}" in c for c in head["initialization_commands"])
    # every Ray start is after a `ray stop` (a second `ray up` restarts), with token auth
    for commands in (config["head_start_ray_commands"], config["worker_start_ray_commands"]):
        assert commands[0] == "ray stop" and len(commands) == 2
        assert commands[1].startswith("RAY_AUTH_MODE=token ray start ")
    assert "--disable-usage-stats" in config["head_start_ray_commands"][1]
    assert "--dashboard-host=127.0.0.1" in config["head_start_ray_commands"][1]
    assert config["file_mounts"]["~/.ray/auth_token"]  # every node gets the same token
    everything = [c for t in types.values() for c in t.get("initialization_commands", [])]
    everything += config["head_setup_commands"]
    for command in everything + config["head_start_ray_commands"] + config["worker_start_ray_commands"]:
        assert not re.search(r"[\"']~", command), command  # a quoted ~ is never expanded
        assert subprocess.run(["bash", "-n", "-c", command]).returncode == 0, command


def test_the_two_clouds_run_the_same_node_commands():
    """What the end-to-end test below runs for AWS is what GCP runs, but for the cloud's name."""
    aws, gcp = _prepared("aws"), _prepared("gcp")
    for key in ("setup_commands", "head_start_ray_commands", "worker_start_ray_commands", "file_mounts"):
        assert aws[key] == gcp[key], key
    assert [c.replace(" aws", " gcp") for c in aws["head_setup_commands"]] == gcp["head_setup_commands"]
    assert _container_env(aws["docker"]["head_run_options"]) == _container_env(gcp["docker"]["head_run_options"])


def test_scripts_are_valid_bash_and_refuse_unknown_options(tmp_path):
    for script in ("local.sh", "mlflow-server.sh", "node-setup.sh", "aws-setup.sh"):
        assert subprocess.run(["bash", "-n", str(CLUSTER / script)]).returncode == 0
    for script, args in [
        ("local.sh", ["status", "--bogus"]),
        ("mlflow-server.sh", ["status", "--bogus"]),
        ("aws-setup.sh", ["--bucket", "b-1", "--bogus"]),
    ]:
        proc = subprocess.run(["bash", str(CLUSTER / script), *args], capture_output=True, text=True)
        assert proc.returncode == 2 and "unknown option '--bogus'" in proc.stderr, script
    proc = subprocess.run(["bash", str(CLUSTER / "node-setup.sh"), "head", "azure"], capture_output=True, text=True)
    assert proc.returncode == 2 and "aws or gcp" in proc.stderr


def test_aws_setup_scopes_each_profile_to_the_bucket():
    """The worker profile may use the bucket and nothing else; the head may also hand the
    workers their role (that role only) and read the public AMI parameter."""
    proc = subprocess.run(
        ["bash", str(CLUSTER / "aws-setup.sh"), "--bucket", "my-bucket", "--dry-run"],
        capture_output=True,
        text=True,
        check=True,
    )
    policies = {}
    for line in proc.stdout.splitlines():
        argv = shlex.split(line)
        if argv[:3] == ["aws", "iam", "put-role-policy"]:
            policies[argv[argv.index("--role-name") + 1]] = json.loads(argv[argv.index("--policy-document") + 1])
    bucket = {"arn:aws:s3:::my-bucket", "arn:aws:s3:::my-bucket/*"}
    assert {s["Resource"] for s in policies["autoprune-worker"]["Statement"]} == bucket
    head = {s["Resource"]: s["Action"] for s in policies["autoprune-head"]["Statement"]}
    assert head["arn:aws:iam::*:role/autoprune-worker"] == "iam:PassRole"
    assert set(head) - bucket == {
        "arn:aws:iam::*:role/autoprune-worker",
        "arn:aws:ssm:*::parameter/aws/service/deeplearning/*",
    }
    assert "Name=tag:Name" not in proc.stdout  # a dry run asks AWS nothing
    assert "autoprune-mlflow" in proc.stdout.splitlines()[-1]  # the volume MLflow's database lives on


def test_node_setup_refuses_mlflow_storage_on_the_heads_own_disk(tmp_path):
    env = {
        "HOME": str(tmp_path),
        "PATH": os.environ["PATH"],
        "AUTOPRUNE_MLFLOW_BACKEND": f"sqlite:///{tmp_path}/mlflow/mlflow.db",
        "AUTOPRUNE_MLFLOW_ARTIFACTS": "s3://bucket/mlflow",
    }
    proc = subprocess.run(
        ["bash", str(CLUSTER / "node-setup.sh"), "head", "aws"], env=env, capture_output=True, text=True
    )
    assert proc.returncode == 2 and "'ray down' deletes" in proc.stderr
    assert not (tmp_path / "mlflow").exists()


@pytest.mark.slow
def test_the_mlflow_server_binds_loopback_and_stops(tmp_path):
    import socket
    import sys
    import urllib.request

    import psutil

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "AUTOPRUNE_MLFLOW_DIR": str(tmp_path), "MLFLOW": str(Path(sys.executable).with_name("mlflow"))}
    env.pop("MLFLOW_DISABLE_TELEMETRY", None)
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
        assert {p.environ().get("MLFLOW_DISABLE_TELEMETRY") for p in tree} == {"true"}  # off by default
        # started again with the same settings: left as it is; with others: refused
        again = subprocess.run(["bash", script, "start", "--port", str(port)], env=env, capture_output=True, text=True)
        assert again.returncode == 0 and "already running" in again.stdout
        assert int((tmp_path / "server.pid").read_text()) == pid
        other = subprocess.run(
            ["bash", script, "start", "--port", str(port), "--artifacts", str(tmp_path / "elsewhere")],
            env=env,
            capture_output=True,
            text=True,
        )
        assert other.returncode == 2 and "restart" in other.stderr
    finally:
        subprocess.run(["bash", script, "stop"], env=env, timeout=60)
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in tree)
