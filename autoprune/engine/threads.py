"""How many torch threads the search's driver trains with (the dense model, the final re-run),
and a context that holds torch to that count.

Torch's default is one thread per core. On a machine where other work runs, threads beyond
the cores left free wait on each other: two threads took 1.33-1.46 s a batch where one took
0.12-0.18 s. So the driver takes no more threads than a trial has CPUs, nor more than the
cores other work leaves free."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity), or the machine's cores where the
    system does not say."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def free_cores() -> int:
    """The usable cores less the 1-minute load average rounded down, at least 1. The load
    average counts every runnable process, this one included: read it before starting work,
    so that it measures the other work on the machine."""
    try:
        load = os.getloadavg()[0]
    except OSError:  # no load average on this system
        load = 0.0
    return max(1, usable_cores() - int(load))


def driver_threads(requested: int | None, cpus_per_trial: float) -> tuple[int, str]:
    """The torch threads for work the driver runs one job at a time, and a short reason to
    print: ``requested`` where given (at least 1); otherwise a trial's whole CPUs
    (``cpus_per_trial`` rounded down, at least 1), no more than :func:`free_cores`. Call it
    before the driver starts its own work (see :func:`free_cores`)."""
    if requested is not None:
        n = max(1, int(requested))
        return n, f"{_threads(n)} (as requested)"
    trial = max(1, int(cpus_per_trial))
    free = free_cores()
    if trial <= free:
        return trial, f"{_threads(trial)} (the trial's CPUs)"
    return free, f"{_threads(free)} ({free} of {usable_cores()} cores free)"


def _threads(n: int) -> str:
    return f"{n} torch thread{'s' if n != 1 else ''}"


@contextlib.contextmanager
def using_threads(n: int) -> Iterator[int]:
    """Torch's intra-op threads set to ``n`` inside the block, and set back to what they were
    when it ends (an exception included)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(max(1, int(n)))
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(saved)
