"""The cloud configs' commands, run on this machine the way Ray runs them on a node: through
Ray's own shell wrapper (``bash --login -c -i``), in a fresh virtual environment, twice in a
row (``ray up`` again must be safe), then a worker joining."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from test_launch_files import CLUSTER, _container_env, _prepared  # this folder: pytest puts it on the path

# ---- the cloud configs' commands, run on this machine the way Ray runs them on a node ----

# `ray` on the test nodes' PATH. Every call is recorded; `start` runs the real Ray, from the
# node's own Python, on a private temp folder and free ports (the config's fixed ports and the
# cloud autoscaler's bootstrap file are swapped out); `stop` stops only the processes of that
# node, found by a marker in their environment. So a real head starts and restarts, and
# nothing else on this shared machine is touched (a real `ray stop` would stop every Ray).
SHIM = r"""#!{python}
import json, os, re, sys, time
import psutil

argv, node = sys.argv[1:], os.environ["SHIM_NODE"]
ports = json.loads(os.environ["SHIM_PORTS"])
keys = ("RAY_AUTH_MODE", "RAY_USAGE_STATS_ENABLED", "RAY_OVERRIDE_RESOURCES", "MLFLOW_DISABLE_TELEMETRY")
with open(os.environ["SHIM_LOG"], "a") as log:
    log.write(json.dumps({{"node": node, "argv": argv, "env": {{k: os.environ.get(k) for k in keys}}}}) + "\n")
if argv[:1] == ["stop"]:
    def gone(p):  # (a zombie has exited; it only waits for a parent to reap it)
        try:
            return p.status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True
    procs = []
    for p in psutil.process_iter():
        try:
            if p.environ().get("SHIM_RAY_OF") == os.environ["SHIM_NODE_MARK"]:
                procs.append(p)
                p.terminate()
        except psutil.Error:
            pass
    deadline = time.monotonic() + 3  # (the real `ray stop` waits longer, then kills too)
    while not all(gone(p) for p in procs) and time.monotonic() < deadline:
        time.sleep(0.2)
    for p in procs:
        if not gone(p):
            p.kill()
    sys.exit(0)
if argv[:1] == ["start"]:
    new = ["start"]
    for a in argv[1:]:
        if a.startswith("--autoscaling-config="):
            continue  # the cloud's autoscaler has no cloud here
        a = re.sub(r"^--port=6379$", "--port=%d" % ports["gcs"], a)
        a = re.sub(r"^(--address=.*):6379$", r"\g<1>:%d" % ports["gcs"], a)
        new.append(re.sub(r"^--object-manager-port=8076$", "--object-manager-port=%d" % ports[node + "_om"], a))
    new += ["--temp-dir", os.environ["SHIM_TEMP"], "--node-ip-address", "127.0.0.1",
            "--dashboard-agent-listen-port", str(ports[node + "_agent"]), "--min-worker-port", "0", "--max-worker-port", "0"]
    if "--head" in argv:
        new += ["--dashboard-port", str(ports["dashboard"]), "--ray-client-server-port", str(ports["client"])]
    argv = new
    os.environ["SHIM_RAY_OF"] = os.environ["SHIM_NODE_MARK"]  # marks every process of this node's Ray
python = os.environ["SHIM_PYTHON"]
os.execv(python, [python, "-m", "ray.scripts.scripts", *argv])
"""


def _free_ports(names: list[str]) -> dict[str, int]:
    import socket

    socks, ports = [], {}
    for name in names:  # held together, so that no two are the same
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports[name] = s.getsockname()[1]
    for s in socks:
        s.close()
    return ports


def _fresh_venv(path: Path) -> Path:
    """A new virtual environment that sees this one's packages (torch, Ray, MLflow) as its
    system site packages would, so that nothing is downloaded; autoprune itself is not in it."""
    import site
    import sys

    subprocess.run(
        [getattr(sys, "_base_executable", sys.executable), "-m", "venv", "--without-pip", str(path)], check=True
    )
    (purelib,) = path.glob("lib/python3*/site-packages")
    (purelib / "outer.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    return path / "bin" / "python"


def _ray_runner_argv(command: str, home: Path, env_vars: dict | None = None) -> list[str]:
    """The command line Ray's docker command runner runs a node command with (`docker exec ...
    /bin/bash -c "bash --login -c -i '...'"`), from Ray's own helpers."""
    from ray.autoscaler._private.command_runner import _with_environment_variables, _with_interactive

    if env_vars:
        command = _with_environment_variables(command, env_vars)
    command = command.replace("~/", f"{home}/")  # what the runner does to ~/ in a container
    return ["/bin/bash", "-c", " ".join(_with_interactive(command))]


def _run_on(node: dict, command: str, env_vars: dict | None = None) -> None:
    proc = subprocess.run(
        _ray_runner_argv(command, node["home"], env_vars),
        env=node["env"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, (
        f"{command!r} failed on the {node['name']}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    )


def _processes(mark: str, value: str):
    import psutil

    for p in psutil.process_iter():
        try:
            if p.environ().get(mark) == value:
                yield p
        except psutil.Error:
            pass


def _make_node(name: str, root: Path, run_id: str, token: str, common: dict) -> dict:
    """A node's home: the token where file_mounts puts it, and a ~/.bashrc that puts the node's
    Python first on PATH (as the image's environment does)."""
    home = root / name
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text(token)
    (home / ".ray" / "auth_token").chmod(0o600)
    shim_dir, python = Path(common["SHIM_DIR"]), Path(common["SHIM_PYTHON"])
    (home / ".bashrc").write_text(f'export PATH="{shim_dir}:{python.parent}:$PATH"\n')
    env = {"HOME": str(home), "PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", **common}
    env.update(SHIM_NODE=name, SHIM_NODE_MARK=f"{run_id}-{name}", SHIM_TEMP=str(Path(common["SHIM_ROOT"]) / name))
    return {"name": name, "home": home, "env": env}


def _get(url: str, token: str | None = None) -> tuple[int, bytes]:
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, b""
    except OSError:  # not listening yet
        return 0, b""


def _gcs_pid(node: dict) -> int:
    (pid,) = [p.pid for p in _processes("SHIM_RAY_OF", node["env"]["SHIM_NODE_MARK"]) if p.name() == "gcs_server"]
    return pid


def _prepare_nodes(tmp_path: Path, config: dict, run_id: str, token: str, ports: dict, short: Path, volume: Path):
    """The head and a worker of the AWS config, as homes on this machine sharing a fresh
    environment, a `ray` that stays inside the test, and offline pip settings."""
    import shutil
    import sys

    python = _fresh_venv(tmp_path / "venv")
    shim = tmp_path / "shim" / "ray"
    shim.parent.mkdir()
    shim.write_text(SHIM.format(python=sys.executable))
    shim.chmod(0o755)
    common = {
        "AUTOPRUNE_TEST_MARK": run_id,
        "PIP_NO_INDEX": "1",  # offline: everything autoprune needs is already there,
        "PIP_NO_DEPS": "1",  # (visible to the new environment), so nothing to resolve
        "PIP_NO_BUILD_ISOLATION": "0",  # (pip's spelling of "build without isolation")
        "SHIM_DIR": str(shim.parent),
        "SHIM_PYTHON": str(python),
        "SHIM_ROOT": str(short),
        "SHIM_LOG": str(tmp_path / "ray-calls.jsonl"),
        "SHIM_PORTS": json.dumps(ports),
    }
    head = _make_node("head", tmp_path, run_id, token, common)
    worker = _make_node("worker", tmp_path, run_id, token, common)
    ignore = [p.rsplit("/", 1)[-1] for p in config["rsync_exclude"]]  # the config's file mount
    shutil.copytree(CLUSTER.parent, head["home"] / "autoprune", ignore=shutil.ignore_patterns(*ignore))
    container = _container_env(config["docker"]["head_run_options"])  # the head's docker --env
    head["env"].update({k: v.replace("/mnt/autoprune-mlflow", str(volume)) for k, v in container.items()})
    head["env"]["AUTOPRUNE_MLFLOW_PORT"] = str(ports["mlflow"])
    if os.stat(volume).st_dev == os.stat(tmp_path).st_dev:  # no second filesystem to stand for the disk
        head["env"]["AUTOPRUNE_MLFLOW_EPHEMERAL"] = "1"
    return head, worker


def test_cloud_commands_set_up_a_head_twice_the_way_ray_runs_them(tmp_path):
    """`ray up` twice, on this machine: the AWS config's setup, head setup and head start
    commands, each through Ray's own shell wrapper (`bash --login -c -i`), in a fresh
    environment, with the config's container variables; then a worker joins. Both passes
    succeed; the second restarts Ray (after `ray stop`) and leaves the MLflow server running."""
    import secrets
    import shutil
    import tempfile

    from ray._common.usage.usage_constants import USAGE_STATS_ENABLED_ENV_VAR
    from ray._private.ray_constants import RESOURCES_ENVIRONMENT_VARIABLE
    from ray.autoscaler._private.util import with_head_node_ip

    config = _prepared("aws")
    run_id, token = secrets.token_hex(6), secrets.token_hex(32)
    ports = _free_ports(["gcs", "dashboard", "client", "head_om", "head_agent", "worker_om", "worker_agent", "mlflow"])
    short = Path(tempfile.mkdtemp(prefix="apc", dir="/tmp"))  # Ray's socket paths must stay short
    volume = Path(tempfile.mkdtemp(prefix="apc-volume", dir="/dev/shm" if Path("/dev/shm").is_dir() else None))
    gcs, mlflow = [], []
    head = worker = None
    try:
        head, worker = _prepare_nodes(tmp_path, config, run_id, token, ports, short, volume)
        head_vars = {
            USAGE_STATS_ENABLED_ENV_VAR: 1,
            RESOURCES_ENVIRONMENT_VARIABLE: config["available_node_types"]["head"]["resources"],
        }
        worker_vars = {RESOURCES_ENVIRONMENT_VARIABLE: config["available_node_types"]["gpu_a10g"]["resources"]}
        for _ in range(2):  # `ray up`, then `ray up` again
            for command in config["head_setup_commands"]:  # (Ray puts setup_commands first)
                _run_on(head, command)
            for command in config["head_start_ray_commands"]:
                _run_on(head, command, head_vars)
            gcs.append(_gcs_pid(head))
            mlflow.append(int((head["home"] / ".autoprune" / "mlflow-server" / "server.pid").read_text()))
        for command in with_head_node_ip(config["worker_start_ray_commands"], "127.0.0.1"):
            _run_on(worker, command, worker_vars)
        _check_the_cluster(head, ports, token, gcs, mlflow, volume, tmp_path / "ray-calls.jsonl")
    finally:  # every process the test started, by pid: each node's Ray, MLflow, anything left
        for node in (head, worker):
            if node:
                subprocess.run([f"{node['env']['SHIM_DIR']}/ray", "stop"], env=node["env"], timeout=60)
        if head:
            subprocess.run(["bash", str(CLUSTER / "mlflow-server.sh"), "stop"], env=head["env"], timeout=60)
        for process in _processes("AUTOPRUNE_TEST_MARK", run_id):
            process.kill()
        shutil.rmtree(short, ignore_errors=True)
        shutil.rmtree(volume, ignore_errors=True)
    assert not list(_processes("AUTOPRUNE_TEST_MARK", run_id))


def _check_the_cluster(head, ports, token, gcs, mlflow, volume, calls_file) -> None:
    import time

    import psutil

    # Ray: `ray stop` before each `ray start`; the second pass restarted the head
    calls = [json.loads(line) for line in calls_file.read_text().splitlines()]
    assert [(c["node"], c["argv"][0]) for c in calls] == [("head", "stop"), ("head", "start")] * 2 + [
        ("worker", "stop"),
        ("worker", "start"),
    ]
    assert all(c["env"]["RAY_AUTH_MODE"] == "token" for c in calls if c["argv"][0] == "start")
    bootstrap = f"--autoscaling-config={head['home']}/ray_bootstrap_config.yaml"
    assert all(bootstrap in c["argv"] for c in calls if c["node"] == "head" and c["argv"][0] == "start")
    assert gcs[0] != gcs[1] and not psutil.pid_exists(gcs[0])
    environ = psutil.Process(gcs[1]).environ()
    assert environ["RAY_AUTH_MODE"] == "token"
    assert environ["RAY_USAGE_STATS_ENABLED"] == "0"  # although the runner passed this machine's 1
    # token authentication: the dashboard answers only with the token
    dashboard = f"http://127.0.0.1:{ports['dashboard']}"
    for _ in range(120):  # the dashboard comes up a little after `ray start` returns
        if _get(f"{dashboard}/api/version", token)[0] == 200:
            break
        time.sleep(0.5)
    assert _get(f"{dashboard}/api/jobs/")[0] == 401
    # the head and the worker, each with the resources its node type states (RAY_OVERRIDE_RESOURCES)
    status, body = _get(f"{dashboard}/api/v0/nodes?detail=1", token)
    nodes = {n["is_head_node"]: n for n in json.loads(body)["data"]["result"]["result"] if n["state"] == "ALIVE"}
    assert status == 200 and len(nodes) == 2
    assert nodes[True]["resources_total"].get("CPU", 0) == 0
    assert {k: nodes[False]["resources_total"][k] for k in ("CPU", "GPU")} == {"CPU": 8, "GPU": 1}
    # MLflow: the first pass's server still runs, alone, on 127.0.0.1, without telemetry
    assert mlflow[0] == mlflow[1]
    server = psutil.Process(mlflow[1])
    tree = [server, *server.children(recursive=True)]
    assert _get(f"http://127.0.0.1:{ports['mlflow']}/health")[0] == 200
    assert {c.laddr.ip for p in tree for c in p.net_connections() if c.status == psutil.CONN_LISTEN} == {"127.0.0.1"}
    assert {p.environ().get("MLFLOW_DISABLE_TELEMETRY") for p in tree} == {"true"}
    assert (volume / "mlflow.db").is_file() and (volume / "artifacts").is_dir()
    # autoprune and MLflow come from the node's fresh environment
    venv_bin = Path(head["env"]["SHIM_PYTHON"]).parent
    assert (venv_bin / "autoprune").is_file() and Path(server.cmdline()[0]).parent == venv_bin
    assert (head["home"] / ".bashrc").read_text().count("# >>> autoprune") == 1
