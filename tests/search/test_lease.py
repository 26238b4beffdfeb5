"""The search-name lease on its own: held, refused, taken over from a holder that is gone
(the whole flow with real searches is in test_runner.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import pytest

from autoprune.errors import AutopruneError
from autoprune.search.lease import LEASE, STALE_S, Lease, check_free


def _write(folder, **holder) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / LEASE).write_text(json.dumps({"since": time.time(), "beat": time.time(), **holder}))


def test_a_held_lease_refuses_a_second_holder_and_is_released(tmp_path):
    lease = Lease("n", str(tmp_path / "n")).take()
    try:
        record = json.loads((tmp_path / "n" / LEASE).read_text())
        assert record["pid"] == os.getpid() and (tmp_path / "n" / LEASE).stat().st_mode & 0o077 == 0
        other = subprocess.run(  # another process of this host, while this one lives
            [
                sys.executable,
                "-c",
                f"from autoprune.search.lease import Lease; Lease('n', {str(tmp_path / 'n')!r}).take()",
            ],
            capture_output=True,
            text=True,
        )
        assert other.returncode != 0 and f"search 'n' is in use by pid {os.getpid()}" in other.stderr
    finally:
        lease.release()
    assert not (tmp_path / "n" / LEASE).exists()


@pytest.mark.parametrize(
    "holder, alive",
    [
        ({"host": "elsewhere", "pid": 1}, True),  # another host, a fresh heartbeat
        ({"host": "elsewhere", "pid": 1, "beat": time.time() - 2 * STALE_S}, False),  # its heartbeat stopped
        ({"host": "here", "pid": 2**22 + 12345}, False),  # this host, no such pid
    ],
)
def test_a_holder_that_is_gone_is_taken_over_and_a_live_one_refused(tmp_path, holder, alive):
    import socket

    if holder["host"] == "here":
        holder = {**holder, "host": socket.gethostname()}
    _write(tmp_path / "n", **holder)
    said = []
    if alive:
        with pytest.raises(AutopruneError, match=f"in use by pid {holder['pid']} on {holder['host']}"):
            check_free("n", str(tmp_path / "n"))
        with pytest.raises(AutopruneError, match="in use"):
            Lease("n", str(tmp_path / "n")).take(said.append)
        return
    check_free("n", str(tmp_path / "n"))
    lease = Lease("n", str(tmp_path / "n")).take(said.append)
    try:
        assert said and f"held by pid {holder['pid']}" in said[0] and "taking it over" in said[0]
        assert json.loads((tmp_path / "n" / LEASE).read_text())["pid"] == os.getpid()
    finally:
        lease.release()


@pytest.mark.parametrize("where", ["takeover", "bucket"])
def test_two_searches_taking_one_lease_at_once_leave_exactly_one_holder(tmp_path, where):
    """A dead holder's lease taken over by two at once, or a new lease on storage without an
    exclusive create (a URI): the last writer holds it, the other is refused naming it."""
    folder = tmp_path / "n"
    if where == "takeover":
        _write(folder, host="elsewhere", pid=1, beat=time.time() - 2 * STALE_S)
        path = str(folder)
    else:
        path = folder.as_uri()  # through pyarrow's filesystem, as a bucket is
    start, outcome = threading.Barrier(2), []

    def take() -> None:
        lease = Lease("n", path)
        start.wait()
        try:
            outcome.append(lease.take(lambda line: None))
        except AutopruneError as exc:
            outcome.append(exc)

    threads = [threading.Thread(target=take) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    [held] = [o for o in outcome if isinstance(o, Lease)]
    [refused] = [o for o in outcome if isinstance(o, AutopruneError)]
    try:
        assert json.loads((folder / LEASE).read_text())["token"] == held.record["token"]
        assert f"in use by pid {os.getpid()}" in str(refused)
    finally:
        held.release()
    assert not (folder / LEASE).exists()
