"""User-facing errors: the CLI prints them without a traceback and exits with status 2."""

from __future__ import annotations


class AutopruneError(Exception):
    """Something the user asked for is wrong; the message says what and what is allowed."""


def first_line(exc: BaseException, limit: int | None = None) -> str:
    """The first line of ``exc``'s message (its type's name when it has none), cut to ``limit``."""
    return (str(exc).splitlines() or [type(exc).__name__])[0][:limit]
