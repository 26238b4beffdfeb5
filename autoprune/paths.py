"""Output locations are checked before any work: a run never trains for minutes and then
fails to write its result. Nothing is created by the checks (a probe file in an existing
folder is removed at once)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .errors import AutopruneError


def check_output_dir(path: str | Path, flag: str, target: Path | None = None) -> Path:
    """``path`` is a writable folder, or one that can be created; returns it expanded.
    ``target``: what the user named, if not the folder itself (a file in it)."""
    p = Path(path).expanduser()
    target = target or p
    if p.exists():
        if not p.is_dir():
            if target == p:
                raise AutopruneError(f"{flag} {str(p)!r} exists and is not a directory")
            raise AutopruneError(f"{flag} {str(target)!r} cannot be created: {str(p)!r} is a file, not a directory")
        _probe(p, target, flag)
        return p
    ancestor = _nearest_existing(p)
    if not ancestor.is_dir():
        raise AutopruneError(f"{flag} {str(target)!r} cannot be created: {str(ancestor)!r} is a file, not a directory")
    _probe(ancestor, target, flag)
    return p


def check_output_file(path: str | Path, flag: str) -> Path:
    """``path`` can be written as a file (its folder exists and is writable, or can be created)."""
    p = Path(path).expanduser()
    if p.is_dir():
        raise AutopruneError(f"{flag} {str(p)!r} is a directory; give a file path, such as {str(p / 'model.pt2')!r}")
    check_output_dir(p.parent, flag, target=p)
    return p


def _nearest_existing(p: Path) -> Path:
    p = p.absolute()
    while not p.exists():
        p = p.parent
    return p


def _probe(folder: Path, target: Path, flag: str) -> None:
    try:
        fd, name = tempfile.mkstemp(dir=folder, prefix=".autoprune-probe-")
        os.close(fd)
        os.unlink(name)
    except OSError as exc:
        raise AutopruneError(
            f"{flag} {str(target)!r} is not writable: cannot write in {str(folder)!r} ({exc.strerror})"
        ) from None
