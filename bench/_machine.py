"""What the benchmarks print about the machine they ran on."""

from __future__ import annotations

from autoprune.engine.measure import device_name


def cpu_name() -> str:
    return device_name("cpu")
