"""An autoscaling cluster on this machine: Ray's fake multi-node provider (``provider: type:
fake_multinode``, Ray's own harness for testing autoscaling locally) with a head that holds no
trial and one worker type advertising a GPU, none running at first. A search asking for GPU
trials makes the autoscaler start that node from zero; the trials run there (on its CPU: a
fake GPU has no CUDA device behind it) and the idle node is removed after the search."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from test_local_cluster import _free_port  # this folder: pytest puts it on the path

pytestmark = pytest.mark.slow

CONFIG = Path(__file__).resolve().parent / "data" / "fake-multinode.yaml"
BIN = Path(sys.executable).parent

# A client of its own (the test process never imports Ray) that watches the cluster's nodes:
# it looks at them once, prints "ready", then every 0.5 s, noting each node's resources while
# it is alive (a dead node's record has none) and when it died, until the file given after the
# address exists and every node seen but the head is dead (or 90 s after the file appeared);
# then it prints what it saw as JSON.
WATCH = """
import json, os, sys, time
import ray
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
seen = {}
def look():
    now = time.time()
    for n in ray.nodes():
        node = seen.setdefault(n["NodeID"], {"first_seen": now, "head": "node:__internal_head__" in n["Resources"]})
        if n["Alive"]:
            node["resources"] = {k: v for k, v in n["Resources"].items() if k in ("CPU", "GPU")}
        elif "dead_at" not in node:
            node["dead_at"] = now
    return now
look()
print("ready", flush=True)
stop_at = None
while True:
    time.sleep(0.5)
    now = look()
    if stop_at is None and os.path.exists(sys.argv[2]):
        stop_at = now
    if stop_at is not None and (all("dead_at" in n for n in seen.values() if not n["head"]) or now > stop_at + 90):
        break
print(json.dumps(seen))
"""


def _client_env(token: Path) -> dict[str, str]:
    """This environment with the cluster's token, and nothing that points elsewhere."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_FAKE_CLUSTER")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token))
    return env


def _ours(temp: Path) -> list[int]:
    """Running processes of the cluster: those with its temp folder in their command line or a
    file open under it (Ray's agents rename themselves). The fake nodes are started by the
    autoscaler and outlive it, so the head's pid alone does not reach them."""
    pids = set()
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            args = (proc / "cmdline").read_bytes().decode(errors="replace").split("\0")
            if any(a == str(temp) or a.endswith(f"={temp}") or f"{temp}/" in a for a in args):
                pids.add(int(proc.name))
            elif any(os.readlink(fd).startswith(f"{temp}/") for fd in (proc / "fd").iterdir()):
                pids.add(int(proc.name))
        except OSError:
            continue
    pids.discard(os.getpid())
    alive = []
    for pid in sorted(pids):
        try:  # a zombie has exited; this container's pid 1 may never reap it
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                alive.append(pid)
        except OSError:
            continue
    return alive


def _signal(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _stop(head: subprocess.Popen, temp: Path) -> None:
    """The head's ``ray start --block`` first (it stops its own processes), then whatever of
    the cluster is left, by pid; never ``ray stop``, which would stop every Ray on the machine."""
    head.terminate()
    try:
        head.wait(timeout=30)
    except subprocess.TimeoutExpired:
        head.kill()
        head.wait(timeout=10)
    deadline = time.time() + 10
    while (left := _ours(temp)) and time.time() < deadline:
        _signal(left, signal.SIGTERM)
        time.sleep(0.5)
    _signal(_ours(temp), signal.SIGKILL)


@pytest.fixture
def fake_cluster(tmp_path):
    """The head of an autoscaling cluster from ``data/fake-multinode.yaml``, on a free port with
    token authentication and a private temp folder; its address and a client environment."""
    port = _free_port()
    temp = Path(f"/tmp/apfake-{port}")  # short: Ray's socket paths under it must stay < 107 bytes
    shutil.rmtree(temp, ignore_errors=True)
    token = tmp_path / "auth_token"
    token.touch(mode=0o600)
    token.write_text(os.urandom(32).hex())
    config = yaml.safe_load(CONFIG.read_text())
    config["provider"]["gcs_address"] = f"127.0.0.1:{port}"
    (tmp_path / "autoscaling.yaml").write_text(yaml.safe_dump(config))
    env = _client_env(token)
    head_env = {**env, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"}
    args = [str(BIN / "ray"), "start", "--head", "--block", f"--autoscaling-config={tmp_path / 'autoscaling.yaml'}"]
    args += ["--node-ip-address", "127.0.0.1", "--port", str(port), "--num-cpus", "0", "--num-gpus", "0"]
    args += ["--temp-dir", str(temp), "--include-dashboard", "false", "--dashboard-port", str(port + 1)]
    args += ["--ray-client-server-port", str(port + 2), "--dashboard-agent-listen-port", "0"]
    args += ["--min-worker-port", "0", "--max-worker-port", "0", "--object-store-memory", "100000000"]
    args += ["--disable-usage-stats"]
    with (tmp_path / "head.log").open("w") as log:
        head = subprocess.Popen(args, env=head_env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 60
        while head.poll() is None and time.time() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.5)
        assert head.poll() is None and time.time() < deadline, (tmp_path / "head.log").read_text()[-3000:]
        yield f"127.0.0.1:{port}", env, temp
    finally:
        _stop(head, temp)
        left = _ours(temp)
        shutil.rmtree(temp, ignore_errors=True)
    assert left == []  # nothing the cluster started is left running


def _watched(address: str, env: dict, tmp: Path, run):
    """``run()`` while ``WATCH`` watches the cluster; what it returned, and the nodes seen."""
    stop = tmp / "stop-watching"
    with (tmp / "watch.err").open("w") as err:
        watch = subprocess.Popen(
            [sys.executable, "-c", WATCH, address, str(stop)], env=env, stdout=subprocess.PIPE, stderr=err, text=True
        )
    try:
        assert watch.stdout.readline().strip() == "ready", (tmp / "watch.err").read_text()[-3000:]
        result = run()
    finally:
        stop.touch()
        try:
            out = watch.communicate(timeout=180)[0]
        except subprocess.TimeoutExpired:
            watch.kill()
            raise
    assert watch.returncode == 0, (tmp / "watch.err").read_text()[-3000:]
    return result, json.loads(out.strip().splitlines()[-1])


def test_the_autoscaler_starts_a_gpu_node_for_gpu_trials_and_removes_it(
    fake_cluster, tmp_path, engine_cfg, digits_dense
):
    """The search's dense model is the session's ``digits_dense``, cached before the cluster starts."""
    from mlflow.tracking import MlflowClient

    address, env, temp = fake_cluster
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = [str(BIN / "autoprune"), "search", "--address", address, "--gpus-per-trial", "1", "--cpus-per-trial", "1"]
    args += ["--trials", "2", "--epochs", "1", "--final-epochs", "0", "--scheduler", "none", "--no-progress"]
    args += ["--storage", str(tmp_path / "st"), "--tracking-uri", uri, "--cache-dir", engine_cfg.cache_dir]
    args += ["--name", "fake-gpu", "--node-wait", "120", "--no-matched-baseline"]
    times = {}

    def search():
        times["started"] = time.time()
        proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
        times["ended"] = time.time()
        return proc

    proc, seen = _watched(address, env, tmp_path, search)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # the search found no node for a GPU trial at first and waited for the autoscaler
    assert "no node of the cluster can run a trial yet (one needs 1 CPU and 1 GPU" in proc.stderr, proc.stderr
    assert "2 trials: 2 completed" in proc.stdout

    [head] = [n for n in seen.values() if n["head"]]
    assert head["first_seen"] < times["started"] and not head["resources"]  # no CPU, no GPU: holds no trial
    workers = {node_id: n for node_id, n in seen.items() if not n["head"]}
    assert workers and all(n["first_seen"] > times["started"] for n in workers.values())  # none before the search

    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("fake-gpu").experiment_id])
    trials = [r for r in runs if r.data.tags.get("autoprune.role") == "trial"]
    assert len(trials) == 2 and all(r.info.status == "FINISHED" for r in trials)
    used = {r.data.tags["autoprune.node_id"] for r in trials}
    assert used <= set(workers), (used, seen)  # the trials ran on the started node(s)
    for node_id in used:
        assert workers[node_id]["resources"] == {"CPU": 1, "GPU": 1}, seen  # of the GPU type
    # the driver's heavy work (dense model, final re-run) ran there too, not on the head
    summary = json.loads((tmp_path / "st" / "fake-gpu" / "best" / "summary.json").read_text())
    assert set(summary["ran_on"]) == {"dense", "final"} and set(summary["ran_on"].values()) <= set(workers), summary
    # every node it started, the autoscaler removed once idle, soon after the search (its own log says why)
    monitor = (temp / "session_latest" / "logs" / "monitor.log").read_text()
    assert "nodes, type ray.worker.gpu" in monitor
    for node_id, node in workers.items():
        assert "dead_at" in node and node["dead_at"] - times["ended"] < 60, seen  # idle after 6 s
        assert re.search(rf"Terminating the node with id {node_id} .*\(idle\)", monitor), monitor[-3000:]
    raylets = [p for p in _ours(temp) if "raylet/raylet" in Path(f"/proc/{p}/cmdline").read_text(errors="replace")]
    assert len(raylets) == 1  # the head's alone: the removed node's processes are gone
