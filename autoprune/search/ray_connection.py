"""The search's Ray: a local instance sized to this machine, or a cluster at ``--address``."""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import time
from pathlib import Path

from ..errors import AutopruneError, first_line, on_sigterm
from ..rayenv import private_temp_dir, quiet_environment
from .plan import Plan


def connect(plan: Plan) -> None:
    """Start a local Ray instance sized to this machine, or join ``address``, and check
    that the cluster can run a trial. SIGTERM then stops the search as Ctrl-C does (Ray's
    own handler would exit at once, leaving the runs RUNNING)."""
    quiet_environment()
    import ray

    common = dict(log_to_driver=False, logging_level="ERROR", configure_logging=True)
    try:
        _start(ray, plan, common)
    finally:
        on_sigterm()


def _start(ray, plan: Plan, common: dict) -> None:
    if plan.address:
        host = plan.address.removeprefix("ray://").rpartition(":")[0]
        if host in ("127.0.0.1", "localhost", "[::1]", "::1"):  # a cluster on this machine: this driver too
            loopback(ray)
        _join(ray, plan.address, common)
        # No node able to run a trial is not an error yet: an autoscaler adds nodes for pending
        # trials (the cloud configs scale workers from zero). --node-wait bounds the wait.
        cpus, gpus = plan.config.cpus_per_trial, plan.config.gpus_per_trial
        if not fitting_nodes(cpus, gpus):
            nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
            print(
                f"note: no node of the cluster can run a trial yet (one needs {cpus:g} CPU and {gpus:g} GPU; the "
                f"nodes have {_largest(nodes)}); the search waits up to --node-wait {plan.config.node_wait:g} s "
                "for one (an autoscaler adds nodes for pending trials)",
                file=sys.stderr,
            )
        return
    own_token()
    loopback(ray)
    try:
        with no_usage_server():
            ray.init(
                address="local",
                num_cpus=plan.local_cpus,
                num_gpus=plan.local_gpus,
                include_dashboard=False,
                _temp_dir=private_temp_dir(),
                **common,
            )
    except BaseException:
        _drop_token()
        raise


def loopback(ray) -> None:
    """A local instance listens on 127.0.0.1 only. Ray binds a node's servers (GCS, raylet,
    workers, agents, metrics) to the node's address, and on Linux turns 127.0.0.1 into the
    host's routable address unless told this is not a cluster (what
    ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` sets at import); a process that joins a cluster
    keeps Ray's default. The autoscaler's metrics take a free port rather than 44217, which
    another instance on the machine may hold."""
    global _cluster_flag
    if _cluster_flag is None:
        _cluster_flag = ray._private.ray_constants.ENABLE_RAY_CLUSTER
    ray._private.ray_constants.ENABLE_RAY_CLUSTER = False
    os.environ.setdefault("AUTOSCALER_METRIC_PORT", "0")
    os.environ.setdefault("DASHBOARD_METRIC_PORT", "0")


_cluster_flag: bool | None = None  # Ray's own, while a local instance runs


_TOKEN_ENV = ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")
_saved_env: dict[str, str | None] | None = None


def own_token() -> None:
    """A local instance's token is its own: a new one per instance, in a file of mode 0600 in
    this user's private Ray folder, named to its processes by ``RAY_AUTH_TOKEN_PATH``. Not
    ``~/.ray/auth_token``, which every local instance of the user would share (so any of them
    could join another's)."""
    global _saved_env
    import secrets

    folder = Path(private_temp_dir()).parent
    path = folder / f"token-{os.getpid()}"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32) + "\n")
    if _saved_env is None:
        _saved_env = {k: os.environ.get(k) for k in _TOKEN_ENV}
    os.environ.pop("RAY_AUTH_TOKEN", None)
    os.environ["RAY_AUTH_TOKEN_PATH"] = str(path)
    _forget_token()


def _forget_token() -> None:
    """Ray's core reads a process's token once and keeps it: make it read the token again
    (this instance's, or after it the user's own)."""
    from ray._raylet import AuthenticationTokenLoader

    AuthenticationTokenLoader.instance().reset_cache()


def _drop_token() -> None:
    global _saved_env
    if _saved_env is None:
        return
    Path(os.environ.get("RAY_AUTH_TOKEN_PATH", "")).unlink(missing_ok=True)
    for key, value in _saved_env.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    _saved_env = None
    _forget_token()


def stop() -> None:
    """Stop (or, on a cluster, leave) Ray; a local instance's session folder and token go with it."""
    import ray

    node = getattr(ray._private.worker, "_global_node", None)
    session = node.get_session_dir_path() if node is not None and node.head else None
    ray.shutdown()
    _drop_token()
    global _cluster_flag
    if _cluster_flag is not None:
        ray._private.ray_constants.ENABLE_RAY_CLUSTER, _cluster_flag = _cluster_flag, None
    if session and Path(session).name.startswith("session_"):
        shutil.rmtree(session, ignore_errors=True)
        latest = Path(session).parent / "session_latest"
        if latest.is_symlink() and not latest.exists():
            latest.unlink(missing_ok=True)


@contextlib.contextmanager
def no_usage_server():
    """A local instance without its dashboard process. With the dashboard off, Ray still
    starts that process for one module, its usage statistics, which (even with statistics
    disabled) probes the AWS, Azure and GCP metadata addresses to name the cloud it runs on.
    Nothing of a search needs the process, so it is not started."""
    from ray._private import node

    original = node.Node.start_api_server

    def start_api_server(self, *, include_dashboard, raise_on_failure):
        if include_dashboard:
            return original(self, include_dashboard=include_dashboard, raise_on_failure=raise_on_failure)
        self._webui_url = None
        return None

    node.Node.start_api_server = start_api_server
    try:
        yield
    finally:
        node.Node.start_api_server = original


TOKEN_HINT = (
    'a cluster asks for its own token: for a cluster/local.sh cluster run `eval "$(cluster/local.sh env)"`; '
    "for another, set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN_PATH to the file of the token its head was started with"
)
CLIENT_ATTEMPTS = 3  # Ray Client connections tried before the search gives up


def _join(ray, address: str, common: dict) -> None:
    """``ray.init(address)``. Through Ray Client, a connection the server failed to set up
    is tried again: the head's proxier starts a server process per client, and that process
    sometimes dies as it starts (ray-project/ray#63202), which a second connection survives."""
    for attempt in range(1, CLIENT_ATTEMPTS + 1):
        try:
            ray.init(address=address, **common)
            return
        except (ConnectionError, RuntimeError, ray.exceptions.AuthenticationError) as exc:
            setup_failed = isinstance(exc, ConnectionAbortedError) and "Initialization failure" in str(exc)
            if not (address.startswith("ray://") and setup_failed) or attempt == CLIENT_ATTEMPTS:
                raise AutopruneError(
                    f"cannot join the Ray cluster at {address!r} ({first_line(exc)}); {TOKEN_HINT}"
                ) from None
            print(
                f"note: the Ray Client server failed to start a session ({attempt}/{CLIENT_ATTEMPTS}); again",
                file=sys.stderr,
            )
            ray.shutdown()
            time.sleep(2.0 * attempt)


def fitting_nodes(cpus: float, gpus: float) -> list[str]:
    """The ids of the alive nodes of the connected cluster that can hold a trial needing
    ``cpus`` CPUs and ``gpus`` GPUs."""
    import ray

    return [
        n["NodeID"]
        for n in ray.nodes()
        if n.get("Alive") and n["Resources"].get("CPU", 0) >= cpus and n["Resources"].get("GPU", 0) >= gpus
    ]


def _largest(nodes: list[dict]) -> str:
    if not nodes:
        return "none alive"
    return ", ".join(sorted({f"{n.get('CPU', 0):g} CPU / {n.get('GPU', 0):g} GPU" for n in nodes}))


def concurrency(plan: Plan) -> int:
    if plan.config.concurrency:
        return plan.config.concurrency
    import ray

    res = ray.cluster_resources()
    n = int(res.get("CPU", 1) // plan.config.cpus_per_trial)
    if plan.config.gpus_per_trial:
        n = min(n, int(res.get("GPU", 0) // plan.config.gpus_per_trial))
    if n == 0 and plan.address:
        return plan.trials  # nothing fits yet (a cluster scaling from zero): pending trials ask for nodes
    return max(1, min(n, plan.trials))
