"""Ranking trials on signal rather than noise.

A trial's validation accuracy is measured on a finite split: with accuracy ``p`` on ``n``
samples its standard error is ``sqrt(p (1 - p) / n)``. Two trials whose accuracies differ by
less than ``TIE_SE`` standard errors of their difference are tied, and a tie goes to the
simpler policy: uniform (one ratio for every layer), then global (one threshold over all),
then anything else (per-layer ratios, other methods); within each, weight magnitude first. So a search returns a tuned policy only
when it beat the simple ones by more than the split can blur.
"""

from __future__ import annotations

import math
from typing import Any

TIE_SE = 2.0  # differences under this many standard errors (of the difference) are ties
RESOLVE_POINTS = 1.0  # the accuracy difference (points) a validation split should resolve
SIMPLICITY = {"local": 0, "global": 1}  # scope -> rank; anything else (per_layer) ranks after


def standard_error(accuracy: float, n: int) -> float:
    """The binomial standard error of an accuracy (a fraction) measured on ``n`` samples;
    never below the error of one sample in ``n`` (a perfect score is not exact)."""
    p = min(max(accuracy, 0.0), 1.0)
    return math.sqrt(max(p * (1.0 - p), (1.0 / n) * (1.0 - 1.0 / n)) / n) if n > 0 else math.inf


def simplicity(policy: dict[str, Any]) -> int:
    """What a tie is broken toward, lower first: by scope, uniform (local scope, no per-layer
    ratios, one-shot) 0, global 2, the rest 4; within a scope, weight magnitude before any
    other criterion (+1)."""
    if policy.get("ratios") or policy.get("method", "oneshot") != "oneshot":
        scope = 2
    else:
        scope = SIMPLICITY.get(policy.get("scope", "local"), 2)
    return 2 * scope + (policy.get("criterion", "magnitude") != "magnitude")


def tied(a: float, b: float, n: int) -> bool:
    """Whether accuracies ``a`` and ``b`` (fractions, on one split of ``n`` samples) differ by
    less than :data:`TIE_SE` standard errors of their difference."""
    return abs(a - b) < TIE_SE * math.hypot(standard_error(a, n), standard_error(b, n))


def resolution_points(accuracy: float, n: int) -> float:
    """The smallest accuracy difference (points) a split of ``n`` samples tells from a tie
    at ``accuracy``: :data:`TIE_SE` standard errors of a difference."""
    return 100.0 * TIE_SE * math.sqrt(2.0) * standard_error(accuracy, n)


def split_warning(accuracy: float, n: int) -> str | None:
    """A warning when a validation split of ``n`` samples cannot resolve
    :data:`RESOLVE_POINTS` at the dense model's ``accuracy``; None when it can."""
    points = resolution_points(accuracy, n)
    if points <= RESOLVE_POINTS:
        return None
    needed = math.ceil(2.0 * (TIE_SE * 100.0 / RESOLVE_POINTS) ** 2 * max(accuracy * (1.0 - accuracy), 1e-4) - 1e-6)
    return (
        f"warning: the validation split ({n} samples) tells trials apart only when they differ by "
        f"{points:.1f} points or more at {100 * accuracy:.1f}% accuracy; closer trials are ties, given to the "
        f"simpler policy. A split of about {needed} samples resolves {RESOLVE_POINTS:g} point."
    )
