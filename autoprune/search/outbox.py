"""The trials' MLflow writes, kept in order on the driver's disk until the store has them.

Tune's loop notes every trial event (a trial started, reported, ended) by appending one JSON
line to ``mlflow-outbox.jsonl`` and handing it to the writer thread; it never waits for the
store. The writer applies the events in order and counts the ones the store has in
``mlflow-outbox.done`` (written whole, then renamed). A tracking server that stops answering
only makes the outbox longer: the writer tries again until it answers, and a driver that dies
meanwhile leaves the rest for ``--resume``, which applies it before anything else."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from ..paths import is_uri

FILE = "mlflow-outbox.jsonl"
DONE = "mlflow-outbox.done"


def folder_for(path: str, cache_dir: str) -> Path:
    """Where the outbox of the search at ``path`` lives: its own folder, or, for a bucket
    search, a folder of the driver's cache named after the bucket path (a resume from
    another machine finds no outbox there: the trials' records still say what ended)."""
    if not is_uri(path):
        return Path(path)
    key = hashlib.sha256(path.encode()).hexdigest()[:16]
    return Path(cache_dir).expanduser() / "outbox" / key


class Outbox:
    """An append-only list of ``(op, args)`` events with a count of those applied."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.file = self.folder / FILE
        self.done_file = self.folder / DONE
        self.done = self._read_done()
        self.written = self._count()
        self._out = None

    def _read_done(self) -> int:
        try:
            return max(0, int(self.done_file.read_text().strip() or 0))
        except (FileNotFoundError, ValueError):
            return 0

    def _count(self) -> int:
        try:
            with open(self.file, "rb") as f:
                return sum(1 for line in f if line.endswith(b"\n"))
        except FileNotFoundError:
            return 0

    def append(self, op: str, args: list[Any]) -> None:
        """Note one event (on Tune's loop: a buffered append, no wait for the store)."""
        if self._out is None:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._out = open(self.file, "a", encoding="utf-8")  # noqa: SIM115 - open for the search's life
        self._out.write(json.dumps([op, args], default=str) + "\n")
        self._out.flush()
        self.written += 1

    def pending(self) -> list[tuple[str, list]]:
        """The events not yet applied, in order (a torn last line, from a driver killed while
        appending it, is dropped: its event never reached the writer either)."""
        try:
            lines = self.file.read_text(encoding="utf-8").splitlines(keepends=True)
        except FileNotFoundError:
            return []
        out = []
        for line in lines[self.done :]:
            if not line.endswith("\n"):
                break
            try:
                op, args = json.loads(line)
            except (ValueError, TypeError):
                break
            out.append((op, args))
        return out

    def applied(self) -> None:
        """One more event is in the store."""
        self.done += 1
        tmp = self.done_file.with_suffix(".tmp")
        tmp.write_text(f"{self.done}\n")
        os.replace(tmp, self.done_file)

    @property
    def behind(self) -> int:
        return max(0, self.written - self.done)

    def clear(self) -> None:
        """Everything is in the store: the files go."""
        self.close()
        for f in (self.file, self.done_file):
            f.unlink(missing_ok=True)
        self.done = self.written = 0

    def close(self) -> None:
        if self._out is not None:
            self._out.close()
            self._out = None
