"""autoprune: search for neural-network pruning policies under an exact budget.

``import autoprune`` stays light: Ray and MLflow are imported only by the search.
"""

from .config import Budget, EngineConfig, FinetuneConfig, MeasureConfig, Policy, TaskConfig
from .errors import AutopruneError

__version__ = "0.1.0"

__all__ = [
    "AutopruneError",
    "Budget",
    "EngineConfig",
    "FinetuneConfig",
    "MeasureConfig",
    "Policy",
    "TaskConfig",
    "__version__",
]
