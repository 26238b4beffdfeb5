"""autoprune: search for neural-network pruning policies under an exact budget.

The public surface, each name in ``__all__``:

- the configs (plain data): :class:`Policy`, :class:`Budget`, :class:`EngineConfig` with its
  :class:`TaskConfig`, :class:`FinetuneConfig` and :class:`MeasureConfig`, and
  :class:`SearchConfig`; every error meant for the user is an :class:`AutopruneError`;
- :func:`prune` (one policy, one budget -> :class:`RunResult`) and :func:`run_search` (a
  policy search -> :class:`SearchResult`), the two entry points;
- :class:`Task` (what a user task function returns), :func:`get_task` and :func:`load_model`.

``import autoprune`` stays light: it imports neither torch, Ray, MLflow nor Optuna. The names
after the configs are imported on first use: ``prune``, ``Task``, ``get_task``,
``load_model`` and ``RunResult`` bring torch; ``run_search`` and ``SearchResult`` bring Ray,
Optuna and MLflow too.
"""

from __future__ import annotations

import importlib
import os

from .config import Budget, EngineConfig, FinetuneConfig, MeasureConfig, Policy, SearchConfig, TaskConfig
from .errors import AutopruneError

__version__ = "0.1.0"

# Quiet and private by default: the libraries' usage telemetry (MLflow 3's is on by default;
# Ray's usage stats) stays off unless AUTOPRUNE_TELEMETRY=on lets each library decide. Set
# here, before any of them is imported; Ray's workers and the UI server inherit it.
TELEMETRY_SWITCH = "AUTOPRUNE_TELEMETRY"
if os.environ.get(TELEMETRY_SWITCH, "").lower() not in ("1", "on", "true", "yes"):
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

# name -> the module that defines it, imported on first use (module-level __getattr__)
_LAZY = {
    "RunResult": "autoprune.engine.run",
    "SearchResult": "autoprune.search.results",
    "Task": "autoprune.engine.tasks",
    "get_task": "autoprune.engine.tasks",
    "load_model": "autoprune.engine.checkpoint",
    "prune": "autoprune.engine.run",
    "run_search": "autoprune.search.runner",
}

__all__ = [
    "AutopruneError",
    "Budget",
    "EngineConfig",
    "FinetuneConfig",
    "MeasureConfig",
    "Policy",
    "RunResult",
    "SearchConfig",
    "SearchResult",
    "Task",
    "TaskConfig",
    "__version__",
    "get_task",
    "load_model",
    "prune",
    "run_search",
]


def __getattr__(name: str):
    """The names of ``_LAZY`` (``autoprune.prune``, ``autoprune.run_search``,
    ``autoprune.Task``, ...), imported from their module on first use and kept."""
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'autoprune' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
