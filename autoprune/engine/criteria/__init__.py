"""Pruning criteria: small registered classes that return one score per weight (``base``),
data-free (``data_free``) and data-dependent (``data_dependent``). Importing this package
registers all ten."""

from . import data_dependent, data_free  # noqa: F401 - register the criteria
from .base import (
    CRITERIA,
    Criterion,
    ScoreContext,
    Scores,
    channel_scores,
    make_criterion,
    normalise,
    register,
    scored_modules,
)

__all__ = [
    "CRITERIA",
    "Criterion",
    "ScoreContext",
    "Scores",
    "channel_scores",
    "make_criterion",
    "normalise",
    "register",
    "scored_modules",
]
