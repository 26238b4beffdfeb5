"""The stages of one pruning step, shared by every method, one module each: the scoring data
and BN warm-up (``warmup``), the layers a policy keeps (``keep``), criterion scores
(``scoring``), the budget solve-and-verify and the prune itself (``budget``), and the
collapse report (``collapse``)."""

from .budget import (
    Pruned,
    channel_problem,
    check_budget,
    needs_latency_table,
    prune_to_budget,
    smallest_fraction,
    solve_unstructured,
    width_step,
)
from .collapse import collapse_report
from .keep import kept_layers, leave_kept
from .scoring import below_zeros, score
from .warmup import bn_warmup, bn_warmup_train, scoring_batches, warmup_on

__all__ = [
    "Pruned",
    "below_zeros",
    "bn_warmup",
    "bn_warmup_train",
    "channel_problem",
    "check_budget",
    "collapse_report",
    "kept_layers",
    "leave_kept",
    "needs_latency_table",
    "prune_to_budget",
    "score",
    "scoring_batches",
    "smallest_fraction",
    "width_step",
    "solve_unstructured",
    "warmup_on",
]
