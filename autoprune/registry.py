"""A tiny registry per kind of plug-in (tasks, models, criteria, ...), in the style of timm."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from .errors import AutopruneError

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to plug-ins. ``get`` fails early with the list of valid names."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = obj
            return obj

        return deco

    def get(self, name: str) -> T:
        try:
            return self._entries[name]
        except KeyError:
            shown = repr(name) if len(repr(name)) <= 80 else repr(name)[:77] + "..."
            raise AutopruneError(f"unknown {self.kind} {shown}; choose one of: {', '.join(self.names())}") from None

    def names(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)


def load_object(spec: str, kind: str) -> object:
    """Import ``package.module:attribute`` (a user plug-in), with a clear error."""
    import importlib

    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise AutopruneError(f"a user {kind} is given as package.module:function, got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise AutopruneError(f"cannot import module {module_name!r} for {kind} {spec!r}: {exc}") from None
    try:
        return getattr(module, attr)
    except AttributeError:
        raise AutopruneError(f"module {module_name!r} has no attribute {attr!r} ({kind} {spec!r})") from None
