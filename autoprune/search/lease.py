"""One writer per search name: a lease file in the search's folder (``<storage>/<name>``).

The search that holds it writes its host, pid and a heartbeat (every ``BEAT_S``); a second
search of that name, new or ``--resume``, is refused at once, naming the holder. A holder
that is gone (its pid no longer runs, on this host; no heartbeat for ``STALE_S``, on another)
leaves a lease the next search takes over, saying so in one line. On a local folder a new
lease is created atomically. Where writes are not exclusive (a bucket, which has no
create-if-absent here, and the takeover of a dead holder's lease) the search writes its
record with a random token, waits ``SETTLE_S`` and reads it back: of searches that wrote at
once, only the last writer finds its own token, and the others are refused naming it.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import threading
import time
from pathlib import Path

from ..errors import AutopruneError
from ..paths import is_uri, join, read_text, remove_file, write_text

LEASE = ".autoprune-lease.json"
BEAT_S = 10.0  # how often the holder renews its heartbeat
STALE_S = 60.0  # a holder on another host with no heartbeat for this long is gone
SETTLE_S = {"local": 0.5, "bucket": 2.0}  # from a non-exclusive write to its read-back (see above)


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
        now = time.time()
        self.record = {"host": socket.gethostname(), "pid": os.getpid(), "since": now, "beat": now}
        self.record["token"] = secrets.token_hex(8)  # tells two holders in one process apart too
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def take(self, say=print) -> Lease:
        """Hold the lease, or raise naming the live holder; a dead holder's is taken over."""
        exclusive = self._create()
        if exclusive is None:
            holder = _holder(self.path)
            if holder is not None and _alive(holder):
                raise _refusal(self.name, holder)
            self._put()
            self._settle()
            if holder is not None:
                say(
                    f"note: search {self.name!r} was held by pid {holder['pid']} on {holder['host']}, which is no "
                    "longer running; taking it over"
                )
        elif not exclusive:
            self._settle()
        self._thread = threading.Thread(target=self._beat, name="autoprune-lease", daemon=True)
        self._thread.start()
        return self

    def _create(self) -> bool | None:
        """Create the lease if there is none: None when there is one already; True when it
        was created exclusively (a local folder), False when written without exclusion."""
        if is_uri(self.file):
            if read_text(self.file) is not None:
                return None
            write_text(self.file, json.dumps(self.record))
            return False
        Path(self.path).mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.file, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        except FileExistsError:
            return None
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(self.record))
        return True

    def _settle(self) -> None:
        """After a write without exclusion: wait, read back, and refuse if another search's
        record replaced this one's (the last writer holds the lease)."""
        time.sleep(SETTLE_S["bucket" if is_uri(self.file) else "local"])
        holder = _holder(self.path)
        for _ in range(10):  # unreadable: read back mid-way through another search's write
            if holder is not None:
                break
            time.sleep(0.1)
            holder = _holder(self.path)
        if holder is None or holder.get("token") != self.record["token"]:
            if holder is None:
                raise AutopruneError(f"search {self.name!r}: its lease at {self.file} went while being taken; retry")
            raise _refusal(self.name, holder)

    def _put(self) -> None:
        """Write the record whole (a local file stays readable by its owner only)."""
        if is_uri(self.file):
            write_text(self.file, json.dumps(self.record))
            return
        tmp = f"{self.file}.{self.record['token']}.tmp"
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
        if holder and holder.get("token") == self.record["token"]:
            remove_file(self.file)
