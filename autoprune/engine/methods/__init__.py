"""Pruning methods: when pruning happens and how the network recovers (docs/src/design/pruning.md, "Methods").

One module per method, each a registered :class:`Method` (``base``) that works through a
:class:`MethodContext` (``context``) and adds to training through hooks
(:mod:`autoprune.engine.hooks`). Adding a method is one module here, imported below, plus
its row in ``tests/engine/test_methods.py``. Importing this package registers them all.
"""

from . import oneshot, rewind, init, iterative, gradual  # noqa: F401, I001 - register, in this order
from . import sfp, slimming, group_lasso, set, rigl, hardconcrete, lottery  # noqa: F401, I001, A004
from .base import METHODS, Method, check_policy, floors, make_method, prune_then_train, register, split
from .context import LATENCY_CHECKS, LATENCY_UNDER, MethodContext, PrunedCallback
from .gradual import GRADUAL_END, CubicSchedule, cubic_fraction, gradual_steps

__all__ = [
    "GRADUAL_END",
    "LATENCY_CHECKS",
    "LATENCY_UNDER",
    "METHODS",
    "CubicSchedule",
    "Method",
    "MethodContext",
    "PrunedCallback",
    "check_policy",
    "cubic_fraction",
    "floors",
    "gradual_steps",
    "make_method",
    "prune_then_train",
    "register",
    "split",
]
