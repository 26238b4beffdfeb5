"""Pruning methods: when pruning happens and how the network recovers (PRUNING.md section 5).

Each method is a function of the engine's stages; see :mod:`autoprune.engine`.
"""

from __future__ import annotations

from collections.abc import Callable

from .registry import Registry

METHODS: Registry[Callable] = Registry("method")
