"""Where a search's Ray is: ``--address`` (or ``RAY_ADDRESS``) resolved and checked before
Ray is imported. ``auto`` is the user's own cluster, never another process's instance."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from ..errors import AutopruneError


def resolve_address(address: str | None) -> str | None:
    """``auto`` means the cluster the user started, found without looking at other processes:
    ``RAY_ADDRESS``; else the cluster ``cluster/local.sh up`` started (its state folder); else
    the head a ``ray start --head`` of this user recorded (Ray's ``ray_current_cluster`` file).
    Never another process's local instance (Ray's own ``auto`` would join any it finds)."""
    if address != "auto":
        return address
    env = os.environ.get("RAY_ADDRESS")
    if env and env != "auto":
        return env
    for found in (_local_cluster(), _ray_start_head()):
        if found:
            return found
    raise AutopruneError(
        "--address auto found no cluster of yours: RAY_ADDRESS is not set, no `cluster/local.sh up` cluster "
        'is running, and no `ray start --head` of yours is recorded; start one (then `eval "$(cluster/local.sh '
        'env)"`), give --address HOST:PORT, or leave --address out for a local instance'
    )


def _local_cluster() -> str | None:
    """The address of the cluster ``cluster/local.sh up`` started and still runs, if any."""
    state = Path(os.environ.get("AUTOPRUNE_CLUSTER_DIR") or Path.home() / ".autoprune" / "local-cluster")
    try:
        info = dict(line.split("=", 1) for line in (state / "cluster").read_text().splitlines() if "=" in line)
        pids = [int(p) for p in (state / "pids").read_text().split()]
    except (OSError, ValueError):
        return None
    alive = [p for p in pids if Path(f"/proc/{p}").exists() and Path(f"/proc/{p}").stat().st_uid == os.getuid()]
    return f"127.0.0.1:{info['port']}" if alive and info.get("port", "").isdigit() else None


def _ray_start_head() -> str | None:
    """The GCS address a ``ray start --head`` of this user recorded in Ray's temp folder."""
    roots = {Path(os.environ["RAY_TMPDIR"]) / "ray"} if os.environ.get("RAY_TMPDIR") else set()
    for record in [*roots, Path("/tmp/ray")]:
        path = record / "ray_current_cluster"
        try:
            if path.stat().st_uid != os.getuid():
                continue
            address = path.read_text().strip()
        except OSError:
            continue
        if address:
            return address
    return None


def check_address(address: str) -> None:
    """A Ray cluster's GCS must answer on host:port before Ray tries (it otherwise retries
    for minutes)."""
    if address in ("auto", "local"):
        return
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit():
        raise AutopruneError(f"--address {address!r} must be host:port (a Ray head's GCS address) or auto")
    try:
        speaks = _speaks_grpc(host or "127.0.0.1", int(port))
    except OSError as exc:
        raise AutopruneError(
            f"no Ray cluster answers at --address {address!r} ({exc}); start one with "
            "`ray start --head`, or leave --address out for a local instance"
        ) from None
    if not speaks:
        raise AutopruneError(
            f"--address {address!r} answers, but not as a Ray head (its GCS speaks gRPC; this does not): give the "
            "address `ray start --head` printed, or leave --address out for a local instance"
        )


def _speaks_grpc(host: str, port: int, timeout_s: float = 3.0) -> bool:
    """Whether ``host:port`` answers an HTTP/2 connection preface with a SETTINGS frame, as
    every gRPC server (a Ray head's GCS, its client server) does at once; Ray itself would
    retry something else for minutes. OSError: nothing accepts connections there."""
    with socket.create_connection((host, port), timeout=timeout_s) as conn:
        conn.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0]))
        head = b""
        try:
            while len(head) < 9:
                chunk = conn.recv(9 - len(head))
                if not chunk:
                    break
                head += chunk
        except OSError:  # no answer within the timeout
            return False
    return len(head) == 9 and head[3] == 4
