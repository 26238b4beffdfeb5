"""autoprune: search for neural-network pruning policies under an exact budget.

``import autoprune`` stays light: it imports neither torch, Ray nor MLflow. ``run_search``
(and ``SearchResult``) are imported on first use; they bring Ray, Optuna and MLflow.
"""

from .config import Budget, EngineConfig, FinetuneConfig, MeasureConfig, Policy, SearchConfig, TaskConfig
from .errors import AutopruneError

__version__ = "0.1.0"

__all__ = [
    "AutopruneError",
    "Budget",
    "EngineConfig",
    "FinetuneConfig",
    "MeasureConfig",
    "Policy",
    "SearchConfig",
    "SearchResult",
    "TaskConfig",
    "__version__",
    "run_search",
]


def __getattr__(name: str):
    """``autoprune.run_search(SearchConfig(...)) -> SearchResult``, imported on first use."""
    if name in ("run_search", "SearchResult"):
        import importlib

        module = importlib.import_module("autoprune.search.runner")
        return getattr(module, name)
    raise AttributeError(f"module 'autoprune' has no attribute {name!r}")
