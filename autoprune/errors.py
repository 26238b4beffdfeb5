"""User-facing errors: the CLI prints them without a traceback and exits with status 2."""

from __future__ import annotations


class AutopruneError(Exception):
    """Something the user asked for is wrong; the message says what and what is allowed. It
    is one line whatever it quotes: a line break or other control character in a name taken
    from a file or a flag is written as an escape (``\\n``)."""

    def __init__(self, message: object = "", *args: object) -> None:
        text = str(message)
        if not text.isprintable():
            text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
        super().__init__(text, *args)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread: the work stops as on Ctrl-C (runs end KILLED, a
    search keeps what it recorded and says how to resume it), and the exit status is 143.
    Code between may catch it and raise a plain ``KeyboardInterrupt`` (Tune does):
    :func:`terminated` says whether SIGTERM came."""


_SIGTERM: list[bool] = []  # set once SIGTERM has arrived


def terminated() -> bool:
    """Whether SIGTERM has arrived since :func:`on_sigterm`."""
    return bool(_SIGTERM)


def on_sigterm() -> None:
    """From now on SIGTERM raises :class:`Terminated` in the main thread (``ray.init`` sets
    its own handler, so the search calls this again after connecting)."""
    import signal
    import threading

    def raise_terminated(signum, frame):
        _SIGTERM.append(True)
        raise Terminated()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, raise_terminated)


def first_line(exc: BaseException, limit: int | None = None) -> str:
    """The first line of ``exc``'s message (its type's name when it has none), cut to ``limit``."""
    return (str(exc).splitlines() or [type(exc).__name__])[0][:limit]
