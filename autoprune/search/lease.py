"""One writer per search name: a lease file in the search's folder (``<storage>/<name>``).

The search that holds it writes its host, pid and a heartbeat (every ``BEAT_S``); a second
search of that name, new or ``--resume``, is refused at once, naming the holder. A holder
that is gone (its pid no longer runs, on this host; no heartbeat for ``STALE_S``, on another)
leaves a lease the next search takes over, saying so in one line. On a local folder the
lease is created atomically; on a bucket it is an object written whole, which two searches
started within the same instant could both write (the heartbeat then tells the loser).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path

from ..errors import AutopruneError
from ..paths import is_uri, join, read_text, remove_file, write_text

LEASE = ".autoprune-lease.json"
BEAT_S = 10.0  # how often the holder renews its heartbeat
STALE_S = 60.0  # a holder on another host with no heartbeat for this long is gone


def _holder(path: str) -> dict | None:
    """The current holder's record; None when there is none (or it is unreadable)."""
    try:
        data = json.loads(read_text(join(path, LEASE)) or "null")
    except (OSError, ValueError, RecursionError, AutopruneError):  # torn, binary or absurdly nested
        return None
    return data if isinstance(data, dict) and {"host", "pid", "since", "beat"} <= set(data) else None


def _alive(holder: dict) -> bool:
    if holder["host"] == socket.gethostname():
        try:
            os.kill(int(holder["pid"]), 0)
        except ProcessLookupError:
            return False
        except (PermissionError, OverflowError, ValueError):
            return True
        return True
    return time.time() - float(holder["beat"]) < STALE_S


def _refusal(name: str, holder: dict) -> AutopruneError:
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(holder["since"])))
    return AutopruneError(
        f"search {name!r} is in use by pid {holder['pid']} on {holder['host']} (since {since}); wait for it "
        "to end, or choose another --name"
    )


def check_free(name: str, path: str) -> None:
    """Refuse at once if a live search holds ``name`` (before anything else is checked)."""
    holder = _holder(path)
    if holder is not None and holder["pid"] != os.getpid() and _alive(holder):
        raise _refusal(name, holder)


class Lease:
    """The lease of the search ``name`` at ``path``: :meth:`take` it, :meth:`release` it."""

    def __init__(self, name: str, path: str) -> None:
        self.name, self.path, self.file = name, path, join(path, LEASE)
        self.record = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.time(), "beat": time.time()}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def take(self, say=print) -> Lease:
        """Hold the lease, or raise naming the live holder; a dead holder's is taken over."""
        if not self._create():
            holder = _holder(self.path)
            if holder is not None and _alive(holder):
                raise _refusal(self.name, holder)
            if holder is not None:
                say(
                    f"note: search {self.name!r} was held by pid {holder['pid']} on {holder['host']}, which is no "
                    "longer running; taking it over"
                )
            self._put()
        self._thread = threading.Thread(target=self._beat, name="autoprune-lease", daemon=True)
        self._thread.start()
        return self

    def _create(self) -> bool:
        """Create the lease if there is none: atomically on a local folder."""
        if is_uri(self.file):
            if read_text(self.file) is not None:
                return False
            write_text(self.file, json.dumps(self.record))
            return True
        Path(self.path).mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.file, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(self.record))
        return True

    def _put(self) -> None:
        """Write the record whole (a local file stays readable by its owner only)."""
        if is_uri(self.file):
            write_text(self.file, json.dumps(self.record))
            return
        tmp = f"{self.file}.{os.getpid()}.tmp"
        with os.fdopen(os.open(tmp, os.O_CREAT | os.O_TRUNC | os.O_WRONLY, 0o600), "w") as f:
            f.write(json.dumps(self.record))
        os.replace(tmp, self.file)

    def _beat(self) -> None:
        while not self._stop.wait(BEAT_S):
            self.record["beat"] = time.time()
            try:
                if read_text(self.file) is None:  # the folder went (a search that failed before its first
                    return  # snapshot frees its name): never create it again
                self._put()
            except Exception:  # noqa: BLE001 - a missed beat only ages the lease
                continue

    def release(self) -> None:
        """Stop the heartbeat and remove the lease if it is still this search's."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        holder = _holder(self.path)
        if holder and holder["pid"] == self.record["pid"] and holder["host"] == self.record["host"]:
            remove_file(self.file)
