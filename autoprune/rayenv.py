"""Ray's environment, set before ``import ray`` (Ray reads some of it at import)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from . import errors

USER_SNAPSHOT_S = os.environ.get("TUNE_GLOBAL_CHECKPOINT_S")  # as the user set it, if they did
SNAPSHOT_S = 1  # Tune's experiment snapshot period for a search in a folder (a local write)
BUCKET_SNAPSHOT_S = 60  # ... in a bucket, where each snapshot re-uploads Tune's whole folder


def snapshot_period(bucket: bool) -> str:
    """Set how often Tune snapshots its experiment (it reads this when a Tuner runs): the
    user's ``TUNE_GLOBAL_CHECKPOINT_S``, else every second in a folder and every minute in a
    bucket. Nothing reads the snapshot back (a resume reads the trials' own records), so the
    period only bounds what a sync to a bucket costs (requests grow with the trials)."""
    period = USER_SNAPSHOT_S or str(BUCKET_SNAPSHOT_S if bucket else SNAPSHOT_S)
    os.environ["TUNE_GLOBAL_CHECKPOINT_S"] = period
    return period


def quiet_environment() -> None:
    """Before ``import ray``: token auth on, Tune's tables and per-error dumps off, quick
    failure on a dead address, a tracking server's silence noticed in seconds."""
    for key, value in {
        "RAY_AUTH_MODE": "token",
        "RAY_AIR_NEW_OUTPUT": "0",
        "TUNE_PRINT_ALL_TRIAL_ERRORS": "0",
        "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "60",
        "RAY_gcs_server_port_wait_time_s": "3",
        "RAY_DEDUP_LOGS": "0",
        "MLFLOW_LOGGING_LEVEL": "WARNING",
        "TUNE_DISABLE_SIGINT_HANDLER": "1",  # Ctrl-C interrupts the search (resumable), not a graceful finish
        # a tracking server that does not answer is noticed in seconds (the trials' writer then
        # keeps their results and tries again), not after MLflow's minutes of retries
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
        "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
    }.items():
        os.environ.setdefault(key, value)
    import logging
    import warnings

    for logger in ("ray", "ray.tune", "ray.tune.tune", "ray.train"):
        logging.getLogger(logger).setLevel(logging.ERROR)
    logging.getLogger("ray.tune.tune").setLevel(logging.CRITICAL)
    logging.getLogger("optuna").setLevel(logging.WARNING)
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*reported value is ignored.*")
    warnings.filterwarnings("ignore", category=UserWarning, module="optuna")
    warnings.filterwarnings("ignore", category=FutureWarning, module="ray")


def check_token() -> None:
    """The Ray token this process would present (``RAY_AUTH_TOKEN``, else the file
    ``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``), where there is one, is a token: one
    word of printable ASCII. Ray aborts the process with a gRPC assertion on anything else."""
    from pathlib import Path

    from .errors import AutopruneError

    where, token = "RAY_AUTH_TOKEN", os.environ.get("RAY_AUTH_TOKEN")
    if token is None:
        path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token").expanduser()
        if not path.is_file():
            return  # Ray makes one
        where = str(path)
        data = path.read_bytes()[:65537]
        try:
            token = data.decode("ascii")
        except UnicodeDecodeError:
            token = "\x00"
    word = token.strip()
    if not (8 <= len(word) <= 65536 and word.isprintable() and len(word.split()) == 1):
        raise AutopruneError(
            f"the Ray token in {where!r} is not a token (one word of printable ASCII); fix or remove it (Ray then "
            "makes a new one for a local instance), or set RAY_AUTH_TOKEN to the cluster's token"
        )


SOCKET_PATH_MAX = 107  # bytes in an AF_UNIX socket path (Linux)


def private_temp_dir(create: bool = True) -> str:
    """Where a local instance keeps its session (sockets, logs, object spill): a folder of
    this user's alone (mode 0700) under ``RAY_TMPDIR`` or the temporary folder, not Ray's
    shared, world-writable ``/tmp/ray``."""
    root = Path(os.environ.get("RAY_TMPDIR") or tempfile.gettempdir())
    folder = root / f"ap-ray-{os.getuid()}"
    longest = len(str(folder / "ray" / "session_2026-12-04_23-19-27_514872_4194304" / "sockets" / "plasma_store"))
    if longest > SOCKET_PATH_MAX:
        raise errors.AutopruneError(
            f"the temporary folder {str(root)!r} is too deep for Ray's sockets (their paths under it would be "
            f"{longest} bytes; at most {SOCKET_PATH_MAX}): set RAY_TMPDIR to a shorter folder, such as /tmp"
        )
    if not create:
        return str(folder / "ray")
    folder.mkdir(mode=0o700, exist_ok=True)
    info = folder.lstat()
    if folder.is_symlink() or info.st_uid != os.getuid():
        raise errors.AutopruneError(f"{str(folder)!r} belongs to another user; set RAY_TMPDIR to a folder of your own")
    if info.st_mode & 0o077:
        folder.chmod(0o700)
    return str(folder / "ray")  # Ray makes its own folder world-writable; this one's parent keeps others out
