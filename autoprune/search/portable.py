"""Searcher state that survives Ray Tune's pickling: Tune pickles the searcher into
``tuner.pkl`` when the Tuner is built, and into ``searcher-state-*.pkl`` at every experiment
snapshot, and Optuna's samplers may hold thread locks, which pickle refuses."""

from __future__ import annotations

import io
import pickle
import threading
from typing import Any

from ..rayenv import quiet_environment

quiet_environment()
from ray import cloudpickle  # noqa: E402

_LOCKS = {type(threading.Lock()): threading.Lock, type(threading.RLock()): threading.RLock}


class _LockFreePickler(cloudpickle.Pickler):
    """Ray's cloudpickle (functions of ``__main__`` and closures by value, as Tune pickles),
    writing a thread lock as "a new, unheld lock of this kind". Optuna's samplers may hold
    locks (optuna 5.1's genetic samplers do), which pickle refuses; a lock guards one
    process's threads, so a copy in another process needs a fresh one."""

    def reducer_override(self, obj):
        make = _LOCKS.get(type(obj))
        return (make, ()) if make is not None else super().reducer_override(obj)


def portable_dumps(obj: Any) -> bytes:
    """``pickle.dumps(obj)``, with every thread lock inside it written as a fresh one."""
    buffer = io.BytesIO()
    _LockFreePickler(buffer, protocol=pickle.HIGHEST_PROTOCOL).dump(obj)
    return buffer.getvalue()


class PortableState:
    """A searcher whose state survives Ray Tune's pickling, whatever sampler objects it holds:
    Tune pickles the searcher into ``tuner.pkl`` when the Tuner is built, and into
    ``searcher-state-*.pkl`` at every experiment snapshot (``save``)."""

    def __getstate__(self) -> dict:
        return {"portable_state": portable_dumps(self.__dict__)}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(pickle.loads(state["portable_state"]))

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as f:
            f.write(portable_dumps(self.__dict__))

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            self.__dict__.update(pickle.load(f))
