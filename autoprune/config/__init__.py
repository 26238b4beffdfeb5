"""Configuration dataclasses: the one home for defaults and for the command line's flags.

Each setting is one field declared with :func:`autoprune.schema.checked`: its type, range,
flag and help. A default the field cannot hold (it depends on the task or the searcher) is
``None`` there and filled in by that config's ``resolved()``; a method's options
(``Policy.method_options``) have their defaults in the method.
"""

from .policy import (
    BUDGET_KINDS,
    KEEP_TYPES,
    METRICS,
    REDUCTIONS,
    ROUND_TO,
    SCOPES,
    SEARCH_STRUCTURES,
    STRUCTURES,
    WARMUP_MODES,
    Budget,
    FinetuneConfig,
    Policy,
)
from .run import IMAGE_SIZE, MIN_IMAGE_SIZE, EngineConfig, MeasureConfig, TaskConfig
from .search import (
    DEFAULT_EPOCHS,
    DEFAULT_STORAGE,
    DEFAULT_TRIALS,
    REWARDS,
    SCHEDULERS,
    AgentConfig,
    SearchConfig,
)

__all__ = [
    "BUDGET_KINDS",
    "DEFAULT_EPOCHS",
    "DEFAULT_STORAGE",
    "DEFAULT_TRIALS",
    "IMAGE_SIZE",
    "KEEP_TYPES",
    "ROUND_TO",
    "METRICS",
    "MIN_IMAGE_SIZE",
    "REDUCTIONS",
    "REWARDS",
    "SCHEDULERS",
    "SCOPES",
    "SEARCH_STRUCTURES",
    "STRUCTURES",
    "WARMUP_MODES",
    "AgentConfig",
    "Budget",
    "EngineConfig",
    "FinetuneConfig",
    "MeasureConfig",
    "Policy",
    "SearchConfig",
    "TaskConfig",
]
