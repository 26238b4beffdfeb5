"""Output locations are checked before any work: a run never trains for minutes and then
fails to write its result. Nothing is created by the checks (a probe file in an existing
folder is removed at once)."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import threading
from pathlib import Path

from .errors import AutopruneError


def check_output_dir(
    path: str | Path,
    flag: str,
    target: Path | None = None,
    fresh: bool = False,
    instead: str = "pass --overwrite to write over it",
) -> Path:
    """``path`` is a writable folder, or one that can be created; returns it expanded.
    ``target``: what the user named, if not the folder itself (a file in it). ``fresh``: the
    folder must also be empty (or new): earlier results are never replaced without a word
    (``instead``: what else the user may do)."""
    if str(path) == "":
        raise AutopruneError(f"{flag} is empty: name a folder")
    p = Path(path).expanduser()
    _no_dangling_link(p, flag)
    target = target or p
    if p.exists():
        if not p.is_dir():
            if target == p:
                raise AutopruneError(f"{flag} {str(p)!r} exists and is not a directory")
            raise AutopruneError(f"{flag} {str(target)!r} cannot be created: {str(p)!r} is a file, not a directory")
        held = sorted(entry.name for entry in p.iterdir()) if fresh else []
        if held:
            shown = ", ".join(held[:3]) + (f" and {len(held) - 3} more" if len(held) > 3 else "")
            raise AutopruneError(f"{flag} {str(p)!r} already holds {shown}: choose a new or empty folder, or {instead}")
        _probe(p, target, flag)
        return p
    ancestor = _nearest_existing(p)
    if not ancestor.is_dir():
        raise AutopruneError(f"{flag} {str(target)!r} cannot be created: {str(ancestor)!r} is a file, not a directory")
    _probe(ancestor, target, flag)
    return p


def check_output_file(path: str | Path, flag: str, fresh: bool = False) -> Path:
    """``path`` can be written as a file (its folder exists and is writable, or can be created);
    ``fresh``: it must not exist yet."""
    if str(path) == "":
        raise AutopruneError(f"{flag} is empty: name a file")
    p = Path(path).expanduser()
    _no_dangling_link(p, flag)
    if p.is_dir():
        raise AutopruneError(f"{flag} {str(p)!r} is a directory; give a file path, such as {str(p / 'model.pt2')!r}")
    if fresh and p.exists():
        raise AutopruneError(f"{flag} {str(p)!r} exists: choose another name, or pass --overwrite to replace it")
    check_output_dir(p.parent, flag, target=p)
    return p


def _no_dangling_link(p: Path, flag: str) -> None:
    if p.is_symlink() and not p.exists():
        raise AutopruneError(f"{flag} {str(p)!r} is a link to {os.readlink(p)!r}, which does not exist")


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


# --- Locations: a local folder or a bucket URI (s3://, gs://, abfs://, file://) --------------
# Search state lives at a location so that it outlives the node that wrote it. Bucket URIs go
# through pyarrow's filesystems, as Ray Tune's own storage does, so one URI (query parameters
# such as ``?endpoint_override=...`` included) means the same place to both.


def is_uri(location: str) -> bool:
    return "://" in location


def join(location: str, *names: str) -> str:
    """``location/names...``: an absolute local path, or the URI with the names inserted
    before its query."""
    if not is_uri(location):
        return str(Path(location).expanduser().resolve().joinpath(*names))
    base, q, query = location.partition("?")
    return "/".join([base.rstrip("/"), *names]) + q + query


def _fs(location: str, flag: str = ""):
    import pyarrow.fs

    try:
        return pyarrow.fs.FileSystem.from_uri(location)
    except (pyarrow.ArrowInvalid, pyarrow.ArrowNotImplementedError, OSError) as exc:
        raise AutopruneError(
            f"{flag + ' ' if flag else ''}{location!r} is not a storage location pyarrow can open "
            f"({str(exc).splitlines()[0]}); give a folder or a URI such as "
            "s3://bucket/path, gs://bucket/path or abfs://container@account/path"
        ) from None


def read_text(location: str) -> str | None:
    """The text of the file at ``location``; None if there is none."""
    if not is_uri(location):
        p = Path(location)
        return _decoded(p.read_bytes(), location) if p.is_file() else None
    import pyarrow.fs

    fs, path = _fs(location)
    if fs.get_file_info(path).type != pyarrow.fs.FileType.File:
        return None
    with fs.open_input_stream(path) as f:
        return _decoded(f.read(), location)


def _decoded(data: bytes, location: str) -> str:
    try:
        return data.decode()
    except UnicodeDecodeError:
        raise AutopruneError(f"{str(location)!r} is not UTF-8 text: it is damaged or was altered") from None


def write_text(location: str, text: str) -> None:
    """Write ``text`` to ``location`` whole: a reader never sees half of it (a local file is
    replaced; an object is only visible once written)."""
    if not is_uri(location):
        p = Path(location)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(f"{p.name}.{_writer()}.tmp")  # writers side by side each write their own
        tmp.write_text(text)
        tmp.replace(p)
        return
    fs, path = _fs(location)
    fs.create_dir(path.rpartition("/")[0], recursive=True)
    local = fs.type_name == "local"  # a file:// URI: written in place, so a reader could see half
    with fs.open_output_stream(f"{path}.{_writer()}.tmp" if local else path) as f:
        f.write(text.encode())
    if local:
        fs.move(f"{path}.{_writer()}.tmp", path)


def _writer() -> str:
    """This process and thread, to name a file being written."""
    return f"{os.getpid()}-{threading.get_ident()}"


def texts(location: str, suffix: str) -> dict[str, str]:
    """The files directly in the folder ``location`` whose names end with ``suffix``: name
    without the suffix -> text."""
    if not is_uri(location):
        return {p.name[: -len(suffix)]: _decoded(p.read_bytes(), str(p)) for p in Path(location).glob(f"*{suffix}")}
    import pyarrow.fs

    fs, path = _fs(location)
    found = fs.get_file_info(pyarrow.fs.FileSelector(path, allow_not_found=True))
    out = {}
    for info in found:
        if info.type == pyarrow.fs.FileType.File and info.base_name.endswith(suffix):
            with fs.open_input_stream(info.path) as f:
                out[info.base_name[: -len(suffix)]] = _decoded(f.read(), join(location, info.base_name))
    return out


def names(location: str) -> list[str]:
    """The names of what the folder ``location`` holds directly; [] if it does not exist."""
    if not is_uri(location):
        p = Path(location)
        return sorted(c.name for c in p.iterdir()) if p.is_dir() else []
    import pyarrow.fs

    fs, path = _fs(location)
    return sorted(i.base_name for i in fs.get_file_info(pyarrow.fs.FileSelector(path, allow_not_found=True)))


def remove_file(location: str) -> None:
    """Remove the file at ``location`` if it is there."""
    if not is_uri(location):
        Path(location).unlink(missing_ok=True)
        return
    import pyarrow.fs

    fs, path = _fs(location)
    if fs.get_file_info(path).type == pyarrow.fs.FileType.File:
        fs.delete_file(path)


def has_files(location: str) -> bool:
    """Whether the folder ``location`` exists and holds anything."""
    return bool(names(location))


def remove_dir(location: str) -> None:
    """Delete the folder ``location`` and everything in it (nothing if it does not exist)."""
    if not is_uri(location):
        shutil.rmtree(location, ignore_errors=True)
        return
    fs, path = _fs(location)
    with contextlib.suppress(FileNotFoundError):
        fs.delete_dir(path)


def check_location(location: str, flag: str, timeout_s: float = 60.0) -> str:
    """A folder (see :func:`check_output_dir`) or a bucket URI that can be written: a probe
    object is written and deleted, so a wrong endpoint, bucket or credential fails here, before
    any work, as does a store that does not answer within ``timeout_s`` (a cloud client looking
    for credentials without a network can wait for minutes). Returns the location, a local one
    absolute."""
    import threading
    import urllib.request

    if location.startswith("file://"):  # a local folder written as a URI
        folder = urllib.request.url2pathname(location[len("file://") :])
        if not folder.startswith("/"):
            raise AutopruneError(f"{flag} {location!r} is not an absolute file:/// URI; give a folder")
        location = folder
    if not is_uri(location):
        return str(check_output_dir(location, flag).resolve())
    outcome: list[BaseException | None] = []

    def probe() -> None:
        try:
            fs, path = _fs(location, flag)
            name = path.rstrip("/") + "/.autoprune-probe"
            fs.create_dir(path, recursive=True)
            with fs.open_output_stream(name) as f:
                f.write(b"")
            fs.delete_file(name)
            outcome.append(None)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
            outcome.append(exc)

    worker = threading.Thread(target=probe, daemon=True)
    worker.start()
    worker.join(timeout_s)
    if not outcome:
        raise AutopruneError(
            f"{flag} {location!r} did not answer within {timeout_s:g} s; check the network, the endpoint and "
            "the credentials"
        )
    if isinstance(outcome[0], OSError):
        raise AutopruneError(
            f"{flag} {location!r} cannot be written ({str(outcome[0]).splitlines()[0]}); check the bucket, the "
            "endpoint and the credentials (for s3: AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or an instance role)"
        ) from None
    if outcome[0] is not None:
        raise outcome[0]
    return location


def upload_dir(folder: Path, location: str) -> None:
    """Copy the local ``folder`` to ``location`` (a URI)."""
    import pyarrow.fs

    fs, path = _fs(location)
    fs.create_dir(path, recursive=True)
    pyarrow.fs.copy_files(str(folder), path, source_filesystem=pyarrow.fs.LocalFileSystem(), destination_filesystem=fs)


def check_free_space(folder: str | Path, need: int, flag: str) -> None:
    """The disk under ``folder`` (or its nearest existing parent) has ``need`` bytes free:
    what a run will write there is known before its work starts, and a full disk then says
    so at once instead of after the work."""
    where = _nearest_existing(Path(folder).expanduser())
    free = shutil.disk_usage(where).free
    if free < need:
        raise AutopruneError(
            f"{flag} {str(folder)!r}: the disk has {free / 2**20:.1f} MiB free, and the results need about "
            f"{need / 2**20:.1f} MiB; free some space or choose another folder"
        )
