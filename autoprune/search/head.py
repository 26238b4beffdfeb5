"""The head of the search's Ray, watched while the trials run: a head that goes away ends
the search in one line, with its MLflow runs ended and the command that continues it."""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import threading
import time

from .plan import Plan

HEAD_LOST_S = 20.0  # a head whose GCS refuses connections this long is lost (Ray's own driver dies after 60 s)


class HeadWatch:
    """Watches the head's GCS port from a thread while the trials run. Ray's driver dies inside
    its C++ core about a minute after the head goes, with no word of the search; this notices
    first and calls ``on_lost`` with one line saying what happened (which ends the process)."""

    def __init__(self, address: str, on_lost, lost_s: float = HEAD_LOST_S) -> None:
        host, _, port = address.removeprefix("ray://").rpartition(":")
        self.where = (host or "127.0.0.1", int(port))
        self.address, self.on_lost, self.lost_s = address, on_lost, lost_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="autoprune-head-watch", daemon=True)

    def start(self) -> HeadWatch:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _watch(self) -> None:
        answered = time.monotonic()
        while not self._stop.wait(1.0):
            try:
                socket.create_connection(self.where, timeout=2.0).close()
                answered = time.monotonic()
            except OSError as exc:
                if time.monotonic() - answered > self.lost_s and not self._stop.is_set():
                    self.on_lost(
                        f"lost the Ray head at {self.address}: its GCS has refused connections for "
                        f"{time.monotonic() - answered:.0f} s ({exc.strerror or exc})"
                    )
                    return


def head_address(plan: Plan) -> str | None:
    """The head's GCS address (host:port) of the connected Ray, or its client server's for Ray Client."""
    if plan.address and plan.address.startswith("ray://"):
        return plan.address
    import ray

    try:
        return ray.get_runtime_context().gcs_address
    except Exception:  # noqa: BLE001 - no address to watch: no watch
        return None


def resume_command(plan: Plan) -> str:
    return f"autoprune search --name {plan.name} --storage '{plan.storage}' --resume"


def fit_watched(plan: Plan, tuner, experiment_id: str, run_id: str, wait_s: float) -> None:
    """Tune's run of the trials, with the head watched: a head that goes away ends the search
    in one line with the resume command, its runs KILLED (:class:`HeadWatch`)."""
    from ..tracking import store
    from .callback import close_writers

    def lost(why: str) -> None:
        print(
            f"autoprune: error: {why}; the search stops and its MLflow runs end KILLED. Once the cluster is "
            f"back, continue it with: {resume_command(plan)}",
            file=sys.stderr,
            flush=True,
        )
        for end in (
            lambda: close_writers(wait_s),
            lambda: store.end_trial_runs(plan.tracking_uri, experiment_id, run_id, "KILLED"),
            lambda: store.end_search_run(plan.tracking_uri, run_id, "KILLED", why),
        ):
            with contextlib.suppress(Exception):
                end()
        os._exit(2)  # Tune's loop waits inside Ray's core, which cannot be interrupted

    address = head_address(plan)
    watch = HeadWatch(address, lost).start() if address else None
    try:
        tuner.fit()
    finally:
        if watch is not None:
            watch.stop()
