"""User-facing errors: the CLI prints them without a traceback and exits with status 2."""

from __future__ import annotations


class AutopruneError(Exception):
    """Something the user asked for is wrong; the message says what and what is allowed."""


def first_line(exc: BaseException, limit: int | None = None) -> str:
    """The first line of ``exc``'s message (its type's name when it has none), cut to ``limit``."""
    return (str(exc).splitlines() or [type(exc).__name__])[0][:limit]


def check_fraction(name: str, value: float) -> float:
    """A budget-like fraction must lie in (0, 1]."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise AutopruneError(f"{name} must be a number in (0, 1], got {value!r}") from None
    if not 0.0 < value <= 1.0:
        raise AutopruneError(f"{name} must be in (0, 1] (the fraction of the dense cost to keep), got {value}")
    return value
