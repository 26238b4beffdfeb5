"""``autoprune ui``: MLflow's server and UI over a search store, on 127.0.0.1 unless told
otherwise, checked before it starts and stopped as a whole (its process group)."""

from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

from ..errors import AutopruneError
from .store import check_tracking_uri, resolve_tracking_uri, search_experiments, tracking_down
from .view import runs_link


def serve(tracking_uri: str | None, host: str, port: int) -> int:
    """``autoprune ui``: the MLflow UI for the search store, bound to 127.0.0.1 by default."""
    uri = resolve_tracking_uri(tracking_uri)
    check_tracking_uri(uri)
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///") :]).is_file():
        raise AutopruneError(f"no MLflow store at {uri}; run `autoprune search` here first, or pass --tracking-uri")
    if not 0 < port < 65536:
        raise AutopruneError(f"--port must be in 1..65535, got {port}")
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except (socket.gaierror, UnicodeError, TypeError, ValueError):  # not a name, or not one an OS can encode
            raise AutopruneError(f"--host {host!r} is not an address of this machine (e.g. 127.0.0.1)") from None
        except OSError as exc:
            hint = "choose another --port" if exc.errno == errno.EADDRINUSE else "check --host and --port"
            raise AutopruneError(f"cannot listen on {host}:{port} ({exc.strerror}); {hint}") from None
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        uri,
        "--registry-store-uri",
        uri,
        "--host",
        host,
        "--port",
        str(port),
        "--workers",
        "1",
        "--uvicorn-opts",
        "--log-level warning",  # errors still show; one INFO line a request does not
    ]
    # MLflow's background job runners (GenAI evaluation jobs) are not needed to browse runs
    # and cost seven processes; the server gets its own process group, stopped as a whole.
    # Deprecation notices of MLflow's own dependencies are not the user's to act on.
    quiet = ["ignore::DeprecationWarning", "ignore:starlette.middleware.wsgi is deprecated"]
    warnings = ",".join(filter(None, [os.environ.get("PYTHONWARNINGS"), *quiet]))
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "PYTHONWARNINGS": warnings}
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)

    def stop(*_):
        raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        print(f"starting the MLflow UI for {uri} on {host}:{port} ...", flush=True)
        if _answered(proc, host, port):
            _say_links(uri, host, port)
        return proc.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


START_WAIT_S = 180.0  # how long the server may take to answer its first request


def _answered(proc: subprocess.Popen, host: str, port: int) -> bool:
    """Whether the server answers ``/health`` before it exits or :data:`START_WAIT_S` pass
    (its links are printed only then: a link printed earlier does not open)."""
    import time

    where = "127.0.0.1" if host in ("", "0.0.0.0") else "::1" if host == "::" else host
    url = f"http://{f'[{where}]' if ':' in where else where}:{port}"
    deadline = time.monotonic() + START_WAIT_S
    while proc.poll() is None and time.monotonic() < deadline:
        if not tracking_down(url):  # the store's own health check
            return True
        time.sleep(0.25)
    if proc.poll() is None:
        print(f"warning: the MLflow UI did not answer on {url} within {START_WAIT_S:.0f} s", file=sys.stderr)
    return False


def _say_links(uri: str, host: str, port: int) -> None:
    """The searches in the store, each a link to its runs table, then the UI's address."""
    try:
        searches = search_experiments(uri)
    except Exception as exc:  # noqa: BLE001 - the server shows the store whatever this makes of it
        searches = []
        print(f"warning: could not list the searches in {uri} ({type(exc).__name__}: {exc})", file=sys.stderr)
    if searches:
        print("searches in this store, newest first (each link opens its trials):")
        for experiment_id, name in searches:
            print(f"  {name}: {runs_link(experiment_id, host, port)}")
    print(f"MLflow UI for {uri}: http://{host}:{port}  (Ctrl-C stops it)", flush=True)
