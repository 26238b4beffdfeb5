"""The driver's torch thread count: a request wins, otherwise a trial's CPUs within the cores
other work leaves free (read from this machine), and torch's count is set back after."""

from __future__ import annotations

import os

import pytest
import torch

from autoprune.engine.threads import driver_threads, free_cores, usable_cores, using_threads


def test_a_request_wins_over_the_trial_and_the_machine():
    n, reason = driver_threads(usable_cores() + 3, 1.0)
    assert n == usable_cores() + 3
    assert reason == f"{n} torch threads (as requested)"
    assert driver_threads(1, 8.0) == (1, "1 torch thread (as requested)")


def test_a_trial_of_one_cpu_gets_one_thread():
    for cpus in (0.5, 1.0, 1.9):
        assert driver_threads(None, cpus) == (1, "1 torch thread (the trial's CPUs)")


def test_the_threads_stay_within_the_free_cores():
    cores = usable_cores()
    assert cores == len(os.sched_getaffinity(0))
    assert 1 <= free_cores() <= cores
    n, reason = driver_threads(None, 10_000.0)  # more CPUs than any machine: the free cores decide
    assert 1 <= n <= cores
    assert reason == f"{n} torch thread{'s' if n > 1 else ''} ({n} of {cores} cores free)"
    load = os.getloadavg()[0]
    assert n >= max(1, cores - int(load) - 1)  # the load average may tick between the two reads


def test_using_threads_sets_the_count_and_restores_it():
    before = torch.get_num_threads()
    other = 2 if before == 1 else 1
    with using_threads(other) as n:
        assert n == other and torch.get_num_threads() == other
    assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError, match="inside"):
        with using_threads(other):
            raise RuntimeError("inside")
    assert torch.get_num_threads() == before
