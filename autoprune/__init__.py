"""autoprune: search for neural-network pruning policies under an exact budget.

``import autoprune`` stays light: Ray and MLflow are imported only by the search.
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
    "search",
]


def __getattr__(name: str):
    """``autoprune.search(SearchConfig(...)) -> SearchResult``, imported on first use (it
    brings Ray, Optuna and MLflow)."""
    if name in ("search", "SearchResult"):
        import importlib

        module = importlib.import_module("autoprune.search")
        return module if name == "search" else module.SearchResult
    raise AttributeError(f"module 'autoprune' has no attribute {name!r}")
