"""A real multi-node Ray cluster on loopback, started by ``cluster/local.sh``: a head with no
CPUs and two single-CPU worker raylets; a search spreads its trials over the workers, and
``down`` leaves no process the script started."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).resolve().parents[2] / "cluster" / "local.sh"


def _free_port() -> int:
    """A free GCS port below Ray's worker range (10002-19999), with its two neighbours free too
    (the dashboard and the Ray client server take them)."""
    for port in range(7300, 9900, 37):
        try:
            for p in (port, port + 1, port + 2):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port")


# A dead raylet noticed after about 5 s (1 s health checks, 5 misses) rather than Ray's default of
# about 15 s: for the clusters whose workers a test kills.
QUICK_DEATH = {
    "RAY_health_check_period_ms": "1000",
    "RAY_health_check_timeout_ms": "1000",
    "RAY_health_check_failure_threshold": "5",
}


def _script(state: Path, *args: str, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, **(env or {}), "AUTOPRUNE_CLUSTER_DIR": str(state)}
    env["RAY"] = str(Path(sys.executable).with_name("ray"))
    for key in ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_TOKEN"):
        env.pop(key, None)
    proc = subprocess.run(["bash", str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def _client_env(state: Path) -> dict[str, str]:
    env = dict(os.environ)
    for line in _script(state, "env").stdout.splitlines():
        key, _, value = line.removeprefix("export ").partition("=")
        env[key] = value
    return env


def _alive(pids) -> list[int]:
    """The pids still running (a zombie has exited; this container's pid 1 may never reap it)."""
    out = []
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            continue
        if state != "Z":
            out.append(pid)
    return out


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    state = tmp_path_factory.mktemp("cluster")
    port = _free_port()
    _script(state, "up", "--workers", "2", "--worker-cpus", "1", "--port", str(port))
    recorded = [int(p) for p in (state / "pids").read_text().split()]
    yield state, port, recorded
    _script(state, "down", check=False)


def test_a_search_spreads_its_trials_over_the_worker_nodes(cluster, tmp_path, engine_cfg):
    from mlflow.tracking import MlflowClient

    state, port, _ = cluster
    env = _client_env(state)
    assert env["RAY_ADDRESS"] == f"127.0.0.1:{port}" and env["RAY_AUTH_MODE"] == "token"
    assert Path(env["RAY_AUTH_TOKEN_PATH"]).stat().st_mode & 0o077 == 0  # the token is private
    exe = Path(sys.executable).with_name("autoprune")
    args = [str(exe), "search", "--trials", "8", "--epochs", "1", "--final-epochs", "0", "--name", "c"]
    args += ["--storage", str(tmp_path / "st"), "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]
    args += ["--no-progress", "--cache-dir", engine_cfg.cache_dir, "--scheduler", "none"]
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("c").experiment_id], max_results=100)
    trials = [r for r in runs if r.data.tags.get("autoprune.role") == "trial"]
    assert len(trials) == 8 and all(r.info.status == "FINISHED" for r in trials)
    nodes = {r.data.tags["autoprune.node_id"] for r in trials}
    assert len(nodes) >= 2, nodes  # the head has no CPUs: trials ran on both workers
    # the trials' hardware (one CPU model here) got its latency table from a node a trial runs on
    summary = json.loads((tmp_path / "st" / "c" / "best" / "summary.json").read_text())
    [(hardware, table)] = summary["latency_tables"].items()
    assert hardware == summary["latency_table"]["device"] and table["dense_ms"] > 0
    info = _info(state)
    assert table["node_id"] in {info["worker1_node"], info["worker2_node"]}, (table, info)


def test_ray_job_submit_runs_a_search_on_the_cluster(cluster, tmp_path, engine_cfg):
    """The entrypoint by absolute path, without --working-dir (several raylets on one
    host can delete the working directory under the driver)."""
    from mlflow.tracking import MlflowClient

    state, port, _ = cluster
    env = _client_env(state)
    bin_dir = Path(sys.executable).parent
    search = [str(bin_dir / "autoprune"), "search", "--trials", "3", "--epochs", "1", "--final-epochs", "0"]
    search += ["--name", "job", "--storage", str(tmp_path / "st"), "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}"]
    search += ["--no-progress", "--cache-dir", engine_cfg.cache_dir]
    submit = [str(bin_dir / "ray"), "job", "submit", "--address", f"http://127.0.0.1:{port + 1}", "--", *search]
    proc = subprocess.run(submit, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0 and "succeeded" in proc.stdout + proc.stderr, (proc.stdout + proc.stderr)[-3000:]
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'm.db'}")
    runs = client.search_runs([client.get_experiment_by_name("job").experiment_id])
    assert sum(r.data.tags.get("autoprune.role") == "trial" for r in runs) == 3
    assert (tmp_path / "st" / "job" / "best" / "summary.json").is_file()


def test_a_search_runs_through_ray_client(cluster, tmp_path, engine_cfg):
    """--address ray://HOST:PORT: Ray Client to the head's client server (port + 2), with the
    cluster's token; Tune's loop then runs on the head, where the trials' node ids come from."""
    from mlflow.tracking import MlflowClient

    state, port, _ = cluster
    env = _client_env(state)
    env.pop("RAY_ADDRESS")
    exe = Path(sys.executable).with_name("autoprune")
    args = [str(exe), "search", "--address", f"ray://127.0.0.1:{port + 2}", "--trials", "3", "--epochs", "1"]
    args += ["--final-epochs", "0", "--name", "rc", "--storage", str(tmp_path / "st"), "--no-progress"]
    args += ["--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}", "--cache-dir", engine_cfg.cache_dir]
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'm.db'}")
    runs = client.search_runs([client.get_experiment_by_name("rc").experiment_id])
    trials = [r for r in runs if r.data.tags.get("autoprune.role") == "trial"]
    info = _info(state)
    assert len(trials) == 3 and all(r.info.status == "FINISHED" for r in trials)
    assert {r.data.tags["autoprune.node_id"] for r in trials} <= {info["worker1_node"], info["worker2_node"]}


def test_a_trial_no_node_can_hold_waits_then_stops_with_a_clear_error(cluster, tmp_path, engine_cfg):
    """GPU trials on this CPU-only cluster: an autoscaler could still add a GPU node, so the
    search says at once that none fits and waits --node-wait seconds, then stops, its run
    FAILED."""
    from mlflow.tracking import MlflowClient

    state, _, _ = cluster
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    args = [str(Path(sys.executable).with_name("autoprune")), "search", "--gpus-per-trial", "0.25", "--trials", "2"]
    args += ["--name", "nogpu", "--storage", str(tmp_path / "st"), "--tracking-uri", uri, "--no-progress"]
    args += ["--cache-dir", engine_cfg.cache_dir, "--node-wait", "3"]
    t0 = time.time()
    proc = subprocess.run(args, env=_client_env(state), capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode != 0
    assert "no node of the cluster can run a trial yet (one needs 1 CPU and 0.25 GPU" in proc.stderr
    assert "1 CPU / 0 GPU" in proc.stderr and "no node that can run a trial" in proc.stderr, proc.stderr[-2000:]
    assert time.time() - t0 < 180
    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("nogpu").experiment_id])
    assert [r.info.status for r in runs if r.data.tags.get("autoprune.role") == "search"] == ["FAILED"]


def _holding(prefix: str) -> list[int]:
    """Running processes with a file open under ``prefix`` (Ray's agents rename themselves)."""
    pids = set()
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        try:
            if any(os.readlink(fd).startswith(prefix) for fd in fd_dir.iterdir()):
                pids.add(int(fd_dir.parent.name))
        except OSError:
            continue
    return _alive(sorted(pids))


def _info(state: Path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in (state / "cluster").read_text().splitlines() if "=" in line)


def _started(state: Path, tmp: Path, args: list[str]):
    """``args`` (an ``autoprune search`` on the cluster, its store sqlite in ``tmp``) started
    in the background, and an MLflow client of its store."""
    from mlflow.tracking import MlflowClient

    # files, not pipes: nothing reads a pipe while the search runs, and a full one would stall it
    with (tmp / "search.out").open("w") as out, (tmp / "search.err").open("w") as err:
        search = subprocess.Popen(args, env=_client_env(state), cwd=tmp, stdout=out, stderr=err, text=True)
    return search, MlflowClient(tracking_uri=f"sqlite:///{tmp / 'mlflow.db'}")


def _ended(search: subprocess.Popen, tmp: Path, timeout: float) -> tuple[str, str]:
    """Waits for a search from :func:`_started`; its stdout and stderr."""
    search.wait(timeout=timeout)
    return (tmp / "search.out").read_text(), (tmp / "search.err").read_text()


def _wait_for_runs(client, name: str, search: subprocess.Popen, ready) -> bool:
    """Polls the runs of experiment ``name`` every 0.5 s, for up to 300 s while ``search``
    runs, until ``ready(runs)``; whether it came."""
    deadline = time.time() + 300
    while time.time() < deadline and search.poll() is None:
        exp = client.get_experiment_by_name(name)
        if ready(client.search_runs([exp.experiment_id]) if exp else []):
            return True
        time.sleep(0.5)
    return False


def _is_trial(run) -> bool:
    return run.data.tags.get("autoprune.role") == "trial"


def test_a_search_survives_losing_a_worker_node(tmp_path_factory, engine_cfg):
    """worker1's raylet is killed (SIGKILL, by its recorded pid) while a trial runs on it: the
    trial runs again on the surviving worker, every trial finishes, and MLflow holds each once."""

    state = tmp_path_factory.mktemp("cluster3")
    tmp = tmp_path_factory.mktemp("lossy")
    port = _free_port()
    _script(state, "up", "--workers", "2", "--port", str(port), env=QUICK_DEATH)
    try:
        info = _info(state)
        victim, victim_node = int(info["worker1_raylet"]), info["worker1_node"]
        uri = f"sqlite:///{tmp / 'mlflow.db'}"
        args = [str(Path(sys.executable).with_name("autoprune")), "search", "--trials", "4", "--epochs", "6"]
        args += ["--final-epochs", "0", "--scheduler", "none", "--name", "lossy", "--storage", str(tmp / "st")]
        args += ["--tracking-uri", uri, "--no-progress", "--cache-dir", engine_cfg.cache_dir, "--max-failures", "2"]
        search, client = _started(state, tmp, args)

        def on_victim(runs) -> bool:
            return any(r.info.status == "RUNNING" and r.data.tags.get("autoprune.node_id") == victim_node for r in runs)

        if not _wait_for_runs(client, "lossy", search, on_victim):
            pytest.fail("no trial ran on worker1 before the search ended")
        os.kill(victim, 9)
        out, err = _ended(search, tmp, 900)
        assert search.returncode == 0, err[-3000:]
        runs = client.search_runs([client.get_experiment_by_name("lossy").experiment_id])
        trials = [r for r in runs if r.data.tags.get("autoprune.role") == "trial"]
        assert sorted(r.data.tags["autoprune.trial_id"] for r in trials) == sorted(
            {r.data.tags["autoprune.trial_id"] for r in trials}
        )
        assert len(trials) == 4 and all(r.info.status == "FINISHED" for r in trials), [
            (r.info.status, r.data.tags.get("autoprune.node_id")) for r in trials
        ]
        assert "4 trials: 4 completed" in out
    finally:
        _script(state, "down", check=False)
    assert _holding(f"/tmp/apray-{port}/") == []  # the killed raylet's agents too


def test_a_search_that_loses_every_worker_stops_with_a_clear_error(tmp_path_factory, engine_cfg):
    state = tmp_path_factory.mktemp("cluster4")
    tmp = tmp_path_factory.mktemp("orphan")
    port = _free_port()
    _script(state, "up", "--workers", "2", "--port", str(port), env=QUICK_DEATH)
    try:
        info = _info(state)
        uri = f"sqlite:///{tmp / 'mlflow.db'}"
        args = [str(Path(sys.executable).with_name("autoprune")), "search", "--trials", "4", "--epochs", "40"]
        args += ["--scheduler", "none", "--name", "orphan", "--storage", str(tmp / "st"), "--tracking-uri", uri]
        args += ["--no-progress", "--cache-dir", engine_cfg.cache_dir, "--node-wait", "5", "--max-failures", "0"]
        search, client = _started(state, tmp, args)
        _wait_for_runs(client, "orphan", search, lambda runs: sum(_is_trial(r) for r in runs) >= 2)
        for name in ("worker1", "worker2"):
            os.kill(int(info[f"{name}_raylet"]), 9)
        lost = time.time()
        out, err = _ended(search, tmp, 300)
        assert search.returncode != 0
        assert "no node that can run a trial" in err and "--resume" in err, err[-2000:]
        assert time.time() - lost < 120  # the health check notices the dead nodes, then 5 s of --node-wait
        runs = client.search_runs([client.get_experiment_by_name("orphan").experiment_id])
        parent = [r for r in runs if r.data.tags.get("autoprune.role") == "search"]
        assert parent and parent[0].info.status == "FAILED"  # ended, not left RUNNING
        assert any(r.data.tags.get("autoprune.role") == "trial" for r in runs)  # what was recorded is kept
    finally:
        _script(state, "down", check=False)
    assert _holding(f"/tmp/apray-{port}/") == []


def test_status_names_the_nodes_and_down_leaves_nothing_it_started(tmp_path_factory):
    state = tmp_path_factory.mktemp("cluster2")
    port = _free_port()
    _script(state, "up", "--workers", "1", "--port", str(port))
    status = _script(state, "status").stdout
    assert "local cluster: up" in status and "head: pid" in status and "worker1: pid" in status
    recorded = [int(p) for p in (state / "pids").read_text().split()]
    tree = subprocess.run(["pgrep", "-f", f"/tmp/apray-{port}"], capture_output=True, text=True).stdout.split()
    started = set(recorded) | {int(p) for p in tree}
    assert len(started) > len(recorded)  # raylets, GCS, agents and workers beyond the recorded ones
    again = _script(state, "up", "--port", str(port), check=False)
    assert again.returncode == 2 and "already up" in again.stderr
    _script(state, "down")
    assert _alive(started) == []
    assert _holding(f"/tmp/apray-{port}/") == []  # nor any process with files in its temp folder
    assert _script(state, "status", check=False).returncode == 3
    assert (state / "auth_token").is_file()  # kept: the next `up` reuses it
