"""``--address auto`` is the user's own cluster: ``RAY_ADDRESS``, the cluster
``cluster/local.sh up`` started, or a ``ray start --head`` of theirs; never a local Ray
instance another process started on the same machine (Ray's own ``auto`` joins any it finds)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from autoprune.errors import AutopruneError
from autoprune.search.address import resolve_address

EMBEDDED = """
import signal, sys, time
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # Ray's atexit then stops the instance
from autoprune.rayenv import quiet_environment
quiet_environment()
import ray
from autoprune.search.ray_connection import loopback, no_usage_server, own_token
own_token()
loopback(ray)
with no_usage_server():
    ray.init(address="local", num_cpus=1, include_dashboard=False, _temp_dir=sys.argv[1], log_to_driver=False)
print("up", ray.get_runtime_context().gcs_address, flush=True)
time.sleep(600)
"""


LOOPBACK = ("127.0.0.1", "::1", "::ffff:127.0.0.1")


def _listening(pids: list[int]) -> list[tuple[str, int]]:
    """(address, port) of every listening TCP socket of ``pids`` and their descendants."""
    import psutil

    procs = [psutil.Process(p) for p in pids]
    procs += [c for p in list(procs) for c in p.children(recursive=True)]
    out = []
    for proc in procs:
        try:
            out += [c.laddr[:2] for c in proc.net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN]
        except psutil.NoSuchProcess:
            continue
    return out


@pytest.fixture
def nothing_of_ours(tmp_path, monkeypatch):
    """No RAY_ADDRESS, no local cluster state, Ray's temp folder somewhere empty."""
    for key in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AUTOPRUNE_CLUSTER_DIR", str(tmp_path / "state"))
    ray_tmp = tempfile.mkdtemp(prefix="aa", dir="/tmp")
    monkeypatch.setenv("RAY_TMPDIR", ray_tmp)
    yield tmp_path
    shutil.rmtree(ray_tmp, ignore_errors=True)


def test_auto_never_joins_another_processs_local_instance(nothing_of_ours, tmp_path, monkeypatch):
    """Another search's local instance runs on this machine; ``--address auto`` with no
    cluster of the user's is one clear line, before Ray starts, and joins nothing."""
    session = tempfile.mkdtemp(prefix="ae", dir="/tmp")
    home = tmp_path / "home"
    env = {**os.environ, "HOME": str(home)}
    other = subprocess.Popen([sys.executable, "-c", EMBEDDED, session], stdout=subprocess.PIPE, text=True, env=env)
    try:
        up, gcs = other.stdout.readline().split()
        assert up == "up"
        exe = Path(sys.executable).with_name("autoprune")
        args = [str(exe), "search", "--address", "auto", "--trials", "2", "--epochs", "1", "--no-progress"]
        args += ["--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}", "--storage", str(tmp_path / "st")]
        t0 = time.time()
        proc = subprocess.run(args, capture_output=True, text=True, timeout=300, cwd=tmp_path)
        assert proc.returncode == 2, proc.stdout + proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1, proc.stderr
        [line] = lines
        assert "--address auto found no cluster of yours" in line and "cluster/local.sh" in line
        assert time.time() - t0 < 60 and not (tmp_path / "st").exists()  # nothing started, nothing written
        # the other instance listens on loopback only: its driver, GCS, raylet, workers, agents
        listening = _listening([other.pid])
        assert listening and all(ip in LOOPBACK for ip, _ in listening), listening
        assert gcs.startswith("127.0.0.1:")

        # the other instance's token is its own, private (0600): not the shared ~/.ray/auth_token
        [token] = Path(os.environ["RAY_TMPDIR"], f"ap-ray-{os.getuid()}").glob(f"token-{other.pid}")
        assert token.stat().st_mode & 0o777 == 0o600 and not (home / ".ray" / "auth_token").exists()

        # pointed at it with a token that is not its own: refused, in one line saying what to do
        wrong = {**os.environ, "RAY_AUTH_TOKEN": "0" * 64}
        args[args.index("auto")] = gcs
        proc = subprocess.run(args, capture_output=True, text=True, timeout=300, cwd=tmp_path, env=wrong)
        assert proc.returncode == 2, proc.stdout + proc.stderr
        [line] = [x for x in proc.stderr.strip().splitlines() if x.startswith("autoprune")] or [proc.stderr]
        assert f"cannot join the Ray cluster at {gcs!r}" in line and "cluster/local.sh env" in line, line
    finally:
        other.terminate()
        try:
            other.wait(timeout=30)
        except subprocess.TimeoutExpired:
            other.kill()
            other.wait(timeout=30)
        shutil.rmtree(session, ignore_errors=True)


def test_auto_is_ray_address_then_the_local_cluster_then_a_ray_start_head(nothing_of_ours, tmp_path, monkeypatch):
    with pytest.raises(AutopruneError, match="found no cluster of yours"):
        resolve_address("auto")
    assert resolve_address("10.1.2.3:6379") == "10.1.2.3:6379"  # an address given is used as it is
    assert resolve_address(None) is None

    record = Path(os.environ["RAY_TMPDIR"]) / "ray" / "ray_current_cluster"  # what `ray start --head` writes
    record.parent.mkdir(parents=True)
    record.write_text("127.0.0.1:6411\n")
    assert resolve_address("auto") == "127.0.0.1:6411"

    state = tmp_path / "state"  # cluster/local.sh's state: its port, and the pids it started
    state.mkdir()
    (state / "cluster").write_text("port=6390\ntmp=/tmp/apray-6390\nworkers=2\n")
    (state / "pids").write_text("999999999\n")  # no such process: the cluster is down
    assert resolve_address("auto") == "127.0.0.1:6411"
    (state / "pids").write_text(f"{os.getpid()}\n")
    assert resolve_address("auto") == "127.0.0.1:6390"

    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:7000")  # what `eval "$(cluster/local.sh env)"` sets, or a Ray job
    assert resolve_address("auto") == "127.0.0.1:7000"


def test_local_instances_one_after_another_in_one_process_each_have_a_token(tmp_path):
    """Ray's core reads a process's token once: a search's own token, and the user's after it,
    are read again (an API user runs several searches, or Ray of their own, in one process)."""
    from autoprune.rayenv import private_temp_dir, quiet_environment

    quiet_environment()
    import ray

    from autoprune.search import ray_connection

    def start() -> int:
        with ray_connection.no_usage_server():
            ray.init(address="local", num_cpus=1, include_dashboard=False, _temp_dir=private_temp_dir())
        return ray.get(ray.remote(lambda: 1).remote())

    tokens, users = [], os.environ.get("RAY_AUTH_TOKEN_PATH")
    for _ in range(2):
        ray_connection.own_token()
        tokens.append(Path(os.environ["RAY_AUTH_TOKEN_PATH"]).read_text())
        assert start() == 1
        ray_connection.stop()
    assert tokens[0] != tokens[1] and os.environ.get("RAY_AUTH_TOKEN_PATH") == users
    assert start() == 1  # Ray of the user's own, with their token, after the searches
    ray_connection.stop()
