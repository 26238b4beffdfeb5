"""A real multi-node Ray cluster on loopback, started by ``cluster/local.sh``: a head with no CPUs
and two single-CPU worker raylets; a search spreads its trials over the workers, the cluster
listens on loopback only, and ``down`` (or an interrupted ``up``) leaves no process it started."""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).resolve().parents[2] / "cluster" / "local.sh"


def _free_port() -> int:
    """A free GCS port below Ray's worker range (10002-19999), and the other ports `up` binds."""
    for port in range(7300, 9900, 37):
        try:
            for p in (port, port + 1, port + 2, port + 10, port + 11, port + 12, port + 13):
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


def _env(state: Path, env: dict | None = None) -> dict[str, str]:
    env = {**os.environ, **(env or {}), "AUTOPRUNE_CLUSTER_DIR": str(state)}
    env["RAY"] = str(Path(sys.executable).with_name("ray"))
    for key in ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_TOKEN", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"):
        env.pop(key, None)
    return env


def _script(state: Path, *args: str, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        ["bash", str(SCRIPT), *args], env=_env(state, env), capture_output=True, text=True, timeout=300
    )
    if check:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def _client_env(state: Path) -> dict[str, str]:
    env = dict(os.environ)
    for line in _script(state, "env").stdout.splitlines():
        key, _, value = line.removeprefix("export ").partition("=")
        env[key] = value
    return env


def _running() -> dict[int, int]:
    """Running processes, each with its session id (a zombie has exited; pid 1 may never reap it)."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, _, _, session = stat.read_text().rsplit(")", 1)[1].split()[:4]
        except OSError:
            continue
        if state != "Z":
            found[int(stat.parent.name)] = int(session)
    return found


def _in_sessions(sessions) -> list[int]:
    """Running processes of the sessions ``sessions`` (each node's, named by its recorded pid)."""
    return [pid for pid, session in _running().items() if session in sessions]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    state = tmp_path_factory.mktemp("cluster")
    port = _free_port()
    _script(state, "up", "--workers", "2", "--worker-cpus", "1", "--port", str(port))
    yield state, port, _recorded(state)
    _script(state, "down", check=False)


def test_a_search_spreads_its_trials_over_the_worker_nodes_all_listening_on_loopback(cluster, tmp_path, engine_cfg):
    """While it runs, every TCP socket a process of the cluster or the driver listens on
    (sampled each second) is on 127.0.0.1."""
    state, port, sessions = cluster
    env = _client_env(state)
    assert env["RAY_ADDRESS"] == f"127.0.0.1:{port}" and env["RAY_AUTH_MODE"] == "token"
    assert Path(env["RAY_AUTH_TOKEN_PATH"]).stat().st_mode & 0o077 == 0  # the token is private
    exe = Path(sys.executable).with_name("autoprune")
    args = [str(exe), "search", "--trials", "8", "--epochs", "1", "--final-epochs", "0", "--name", "c"]
    args += ["--storage", str(tmp_path / "st"), "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]
    args += ["--no-progress", "--cache-dir", engine_cfg.cache_dir, "--scheduler", "none"]
    search, client = _started(state, tmp_path, args)
    listening = _listening_while(search, sessions)
    _, err = _ended(search, tmp_path, 900)
    assert search.returncode == 0, err[-3000:]
    assert [sock for sock in listening if not _loopback(sock[0])] == [], sorted(listening)
    assert {port, port + 1, port + 2, port + 10, port + 11, port + 12} <= {sock[1] for sock in listening}
    assert any(sock[2] == search.pid for sock in listening), sorted(listening)  # the driver's own server
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
    client = MlflowClient(tracking_uri=uri)  # stopped before its run opened (dense training waits too), or FAILED
    runs = client.search_runs([e.experiment_id]) if (e := client.get_experiment_by_name("nogpu")) else []
    assert [r.info.status for r in runs if r.data.tags.get("autoprune.role") == "search"] in ([], ["FAILED"])


def _recorded(state: Path) -> list[int]:
    """The pids `up` recorded: each node's `ray start`, whose pid is the node's session id."""
    pids = state / "pids"
    return [int(line.split()[0]) for line in pids.read_text().splitlines() if line.strip()] if pids.exists() else []


def _listening() -> list[tuple[str, int, int]]:
    """Every listening TCP socket here, as ``ss -ltnp`` lists them: address, port, pid."""
    import psutil

    return [(c.laddr.ip, c.laddr.port, c.pid) for c in psutil.net_connections("tcp") if c.status == "LISTEN" and c.pid]


def _listening_while(proc: subprocess.Popen, sessions: list[int]) -> set[tuple[str, int, int]]:
    """Listening sockets of the sessions ``sessions`` and ``proc``'s, sampled each second while it runs."""
    seen, deadline = set(), time.time() + 900
    while proc.poll() is None and time.time() < deadline:
        ours = set(_in_sessions([*sessions, proc.pid]))
        seen |= {sock for sock in _listening() if sock[2] in ours}
        time.sleep(1)
    return seen


def _loopback(host: str) -> bool:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False  # "*": every address
    return ip.is_loopback or bool(getattr(ip, "ipv4_mapped", None) and ip.ipv4_mapped.is_loopback)


def _holding(prefix: str) -> list[int]:
    """Running processes with a file open under ``prefix`` (Ray's agents rename themselves)."""
    pids = set()
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        try:
            if any(os.readlink(fd).startswith(prefix) for fd in fd_dir.iterdir()):
                pids.add(int(fd_dir.parent.name))
        except OSError:
            continue
    return sorted(pids & _running().keys())


def _info(state: Path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in (state / "cluster").read_text().splitlines() if "=" in line)


def _started(state: Path, tmp: Path, args: list[str]):
    """``args`` (an ``autoprune search`` on the cluster, its store sqlite in ``tmp``) started
    in the background, and an MLflow client of its store."""
    from mlflow.tracking import MlflowClient

    # files, not pipes: nothing reads a pipe while the search runs, and a full one would stall it
    with (tmp / "search.out").open("w") as out, (tmp / "search.err").open("w") as err:
        search = subprocess.Popen(args, env=_client_env(state), cwd=tmp, stdout=out, stderr=err, start_new_session=True)
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
        ids = [r.data.tags["autoprune.trial_id"] for r in trials]
        states = [(r.info.status, r.data.tags.get("autoprune.node_id")) for r in trials]
        assert len(ids) == len(set(ids)) == 4 and all(state == "FINISHED" for state, _ in states), states
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
    """`down` stops every process `up` started and nothing else (not a process of this user with
    the temp folder on its command line and a log open), and keeps Ray's logs."""
    state = tmp_path_factory.mktemp("cluster2")
    port = _free_port()
    _script(state, "up", "--workers", "1", "--port", str(port))
    status = _script(state, "status").stdout
    assert "local cluster: up" in status and "head: pid" in status and "worker1: pid" in status
    recorded = _recorded(state)
    tree = subprocess.run(["pgrep", "-f", f"/tmp/apray-{port}"], capture_output=True, text=True).stdout.split()
    started = set(recorded) | {int(p) for p in tree} | set(_in_sessions(recorded))
    assert len(started) > len(recorded)  # raylets, GCS, agents and workers beyond the recorded ones
    again = _script(state, "up", "--port", str(port), check=False)
    assert again.returncode == 2 and "already up" in again.stderr
    log = next(Path(f"/tmp/apray-{port}").glob("session_2*/logs/raylet.out"))
    reader = subprocess.Popen([sys.executable, "-c", "import sys, time; f = open(sys.argv[1]); time.sleep(99)", log])
    time.sleep(0.5)
    down = _script(state, "down")
    assert not started & _running().keys() and _in_sessions(recorded) == []
    assert reader.poll() is None  # not the cluster's
    reader.kill()
    reader.wait()
    assert _holding(f"/tmp/apray-{port}/") == []  # nor any process with files in its temp folder
    [kept] = (state / "logs").glob("ray-*")  # Ray's logs and each node's `ray start` output
    assert f"Ray's logs: {kept}" in down.stdout and not Path(f"/tmp/apray-{port}").exists()
    names = {p.name for p in kept.iterdir()}
    assert {"gcs_server.out", "raylet.out", "raylet.1.out", "head.log", "worker1.log"} <= names
    assert "Usage stats collection is disabled" in (kept / "head.log").read_text()
    assert _script(state, "status", check=False).returncode == 3
    assert (state / "auth_token").is_file()  # kept: the next `up` reuses it


def test_up_with_a_port_taken_fails_at_once_naming_it(tmp_path):
    port = _free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port + 1))
        taken.listen()
        t0 = time.time()
        proc = _script(tmp_path, "up", "--port", str(port), check=False)
    assert proc.returncode == 2 and time.time() - t0 < 10
    assert proc.stderr.count("\n") == 1 and f"port {port + 1} on 127.0.0.1, for the dashboard" in proc.stderr
    assert not (tmp_path / "pids").exists()  # nothing started
    assert subprocess.run(["pgrep", "-f", f"/tmp/apray-{port}"], capture_output=True).returncode == 1


@pytest.mark.parametrize("how, nodes", [("ctrl-c", 2), ("sigterm", 1)])
def test_an_interrupted_up_stops_what_it_started(tmp_path, how, nodes):
    """Ctrl-C (SIGINT to the script's process group) once the head is up and a worker's `ray
    start` runs, or SIGTERM while the head starts: the script stops what started, and exits."""
    port = _free_port()
    args = ["bash", str(SCRIPT), "up", "--workers", "1", "--port", str(port)]
    up = subprocess.Popen(args, env=_env(tmp_path), stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 120
    while len(sessions := _recorded(tmp_path)) < nodes or len(_in_sessions(sessions)) <= nodes:
        assert up.poll() is None and time.time() < deadline, up.communicate()
        time.sleep(0.2)
    if how == "ctrl-c":
        os.killpg(up.pid, signal.SIGINT)
    else:
        up.send_signal(signal.SIGTERM)
    _, err = up.communicate(timeout=120)
    assert up.returncode == (130 if how == "ctrl-c" else 143) and "interrupted" in err, err
    assert _in_sessions(sessions) == [] and _holding(f"/tmp/apray-{port}/") == []
