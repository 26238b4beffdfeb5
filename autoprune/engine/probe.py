"""What in a model's forward pass channel pruning cannot follow, found by running it once,
and a memory and time bound on tracing a model's channel groups.

torch-pruning's dependency graph follows layers and the element-wise and reshaping ops
between them, but a channel shuffle (channels split into groups by a view, the group axis
transposed, then merged again) interleaves the channels of different groups; the graph
fails on it with a bare arithmetic error. This module names the layer where it happens.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import threading
import time

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ..errors import AutopruneError
from ..schema import number
from .models import in_mode

_RESHAPES = {"view", "reshape"}
_MOVES = {"transpose", "permute", "swapaxes", "swapdims"}


class _ShuffleWatch(TorchFunctionMode):
    """Records the innermost module in which a tensor whose channel axis a view split into
    groups then has its axes 1 or 2 moved."""

    def __init__(self, current: list[str]) -> None:
        super().__init__()
        self.current = current  # the stack of running modules' names
        self.split: dict[int, torch.Tensor] = {}  # id -> tensor (kept alive while watched)
        self.found: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = getattr(func, "__name__", "")
        x = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if x is None or not isinstance(out, torch.Tensor):
            return out
        if name in _RESHAPES and x.dim() >= 3 and out.dim() == x.dim() + 1:
            if out.shape[0] == x.shape[0] and out.shape[1] > 1 and out.shape[1] * out.shape[2] == x.shape[1]:
                self.split[id(out)] = out
        elif name in _MOVES and id(x) in self.split:
            dims = [a for a in args[1:] if isinstance(a, int)]
            if {1, 2} & set(dims if name != "permute" else _moved(args[1:])):
                where = self.current[-1] if self.current else ""
                if where not in self.found:
                    self.found.append(where)
        return out


def _moved(order) -> list[int]:
    perm = list(order[0]) if len(order) == 1 and isinstance(order[0], (list, tuple)) else list(order)
    return [i for i, p in enumerate(perm) if i != p]


def channel_shuffles(model: nn.Module, example_input: torch.Tensor) -> list[str]:
    """Names of the modules (innermost, "" for the model itself) whose forward shuffles
    channels, from one forward pass without gradients; the model's mode is restored."""
    stack: list[str] = []

    def enter(name: str):
        return lambda module, args: stack.append(name)  # None: the inputs stay as they are

    def leave(module, args, output) -> None:  # None: the output stays as it is
        stack.pop()

    hooks = []
    for name, module in model.named_modules():
        hooks += [module.register_forward_pre_hook(enter(name)), module.register_forward_hook(leave)]
    watch = _ShuffleWatch(stack)
    try:
        with in_mode(model, train=False), torch.no_grad(), watch:
            model(example_input)
    except Exception:  # noqa: BLE001 - a model that does not run has no shuffle to report
        pass
    finally:
        for h in hooks:
            h.remove()
    return watch.found


GRAPH_MEMORY_GB = 4.0  # memory the channel groups' tracing may add (AUTOPRUNE_GRAPH_MEMORY_GB)
GRAPH_SECONDS = 600.0  # and the time it may take (AUTOPRUNE_GRAPH_SECONDS)


class _OverBound(BaseException):
    """Raised in the traced thread by the watchdog (a BaseException: no ``except Exception``
    on the way swallows it)."""


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


ENV_BOUND = number(0.0, most=1e6)  # the graph bounds' variables: GB and seconds


def env_number(name: str, default: float) -> float:
    """``$name`` checked like a flag (a number >= 0, at most 1e6), or ``default`` when unset."""
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        value: object = float(raw)
    except ValueError:
        value = raw
    return ENV_BOUND.check(value, f"${name}")


@contextlib.contextmanager
def bounded(what: str, hint: str = "use --structure unstructured"):
    """Run the block under a memory and time bound: a watchdog thread samples this process's
    resident memory every 50 ms and interrupts the block (between two Python bytecodes) once
    it has grown by more than ``AUTOPRUNE_GRAPH_MEMORY_GB`` or run for ``AUTOPRUNE_GRAPH_SECONDS``;
    the block then fails with an error naming ``what`` and the bound."""
    memory_gb = env_number("AUTOPRUNE_GRAPH_MEMORY_GB", GRAPH_MEMORY_GB)
    seconds = env_number("AUTOPRUNE_GRAPH_SECONDS", GRAPH_SECONDS)
    start, began = _rss(), time.monotonic()
    target, done, tripped = threading.get_ident(), threading.Event(), []
    lock = threading.Lock()

    def watch() -> None:
        while not done.wait(0.05):
            grown = (_rss() - start) / 2**30
            if grown > memory_gb or time.monotonic() - began > seconds:
                with lock:
                    if not done.is_set():
                        tripped.append(f"{grown:.1f} GB" if grown > memory_gb else f"{seconds:g} s")
                        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(target), ctypes.py_object(_OverBound))
                return

    def stop() -> None:
        with lock:
            done.set()
            if tripped:  # an interruption not delivered yet is withdrawn
                ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(target), None)
        watcher.join()

    watcher = threading.Thread(target=watch, name="autoprune-graph-bound", daemon=True)
    watcher.start()
    try:
        yield
    except BaseException:
        stop()
        if not tripped:
            raise
    else:
        stop()
    if tripped:  # interrupted, or past the bound while the interruption was swallowed on the way
        raise AutopruneError(
            f"{what} went past its bound ({tripped[0]}; AUTOPRUNE_GRAPH_MEMORY_GB={memory_gb:g}, "
            f"AUTOPRUNE_GRAPH_SECONDS={seconds:g}); {hint}"
        ) from None
