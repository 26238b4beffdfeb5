"""Policy -> what to prune, and the budget solver.

Whatever a policy gives (a global threshold, a uniform ratio or a per-layer allocation) is
scaled by one monotone knob until the pruned model's cost lands within the budget's
tolerance below it: a global score threshold (``global``), a uniform ratio (``local``) or a
factor on the given ratios (``per_layer``). Candidates then compete on accuracy at equal cost.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..config import BUDGET_KINDS, Budget, Policy
from ..errors import AutopruneError

# removed-channel masks (one bool array per group) -> estimated (flops, params[, latency ms]),
# indexed by the budget kind's place in BUDGET_KINDS
CostFn = Callable[[list[np.ndarray]], tuple[float, ...]]


@dataclass
class ChannelPlan:
    """Channels to remove, per group, and the estimated cost fraction it reaches."""

    removed: dict[str, np.ndarray]  # group name -> bool mask over its channels (True: remove)
    fraction: float  # estimated kept fraction of the budget's cost

    def indices(self) -> dict[str, np.ndarray]:
        return {g: np.flatnonzero(m) for g, m in self.removed.items()}

    def ratios(self) -> dict[str, float]:
        return {g: float(m.mean()) for g, m in self.removed.items()}


def _cap(size: int, max_ratio: float, floor_one: bool) -> int:
    cap = int(math.floor(max_ratio * size + 1e-9))
    return min(cap, size - 1) if floor_one else cap


def max_pruned(size: int, max_ratio: float) -> int:
    """The most channels a group of ``size`` may lose: ``max_ratio`` of them, keeping one."""
    return _cap(size, max_ratio, True)


def max_masked(size: int, max_ratio: float) -> int:
    """The most weights a layer of ``size`` may lose to masks: ``max_ratio`` of them."""
    return _cap(size, max_ratio, False)


def _unreachable(budget: Budget, smallest: float, policy: Policy, why: str = "") -> AutopruneError:
    if policy.keep or policy.keep_types or policy.keep_classifier:
        why += ", with the kept layers left whole"
    return AutopruneError(
        f"--budget-{budget.kind} {budget.fraction:g} is unreachable: the smallest reachable "
        f"{budget.kind} fraction is {smallest:.4f} (structure {policy.structure}, scope "
        f"{policy.scope}, max_ratio {policy.max_ratio:g}{why}); ask for at least {math.ceil(smallest * 1000) / 1000:g}"
    )


def solve_channels(
    names: list[str],
    sizes: list[int],
    scores: dict[str, np.ndarray],
    policy: Policy,
    budget: Budget,
    cost_fn: CostFn,
    dense: tuple[float, ...],
    target: float | None = None,
    floors: dict[str, int] | None = None,
    step: int = 1,
) -> ChannelPlan:
    """Choose channels to remove so the estimated cost fraction is at most ``target``
    (default: the budget) and as close to it as the granularity allows. ``floors`` gives
    groups a minimum number of channels to keep beyond ``max_ratio`` (iterative methods keep
    ``max_ratio`` relative to the dense widths this way). ``step``: every pruned group keeps
    a multiple of this many channels (:func:`snap`); a group stays whole where none fits."""
    target = budget.fraction if target is None else target
    which = BUDGET_KINDS.index(budget.kind)
    floors = floors or {}
    caps = [max(0, min(max_pruned(n, policy.max_ratio), n - floors.get(g, 1))) for g, n in zip(names, sizes)]
    orders = [np.argsort(scores[g], kind="stable") for g in names]

    def fraction(removed: list[np.ndarray]) -> float:
        return cost_fn(removed)[which] / dense[which]

    def removed_from_counts(counts: list[int], down: bool = False) -> list[np.ndarray]:
        out = []
        for order, n, k, cap in zip(orders, sizes, counts, caps):
            k = n - snap(n - k, n, n - cap, step, down)
            m = np.zeros(n, dtype=bool)
            m[order[:k]] = True
            out.append(m)
        return out

    if policy.exact:  # the ratios as given (whole channels, within the caps), checked against the budget
        given = [float((policy.ratios or {}).get(g, 0.0)) for g in names]
        removed = removed_from_counts(
            [min(cap, int(math.floor(r * n + 1e-9))) for r, n, cap in zip(given, sizes, caps)], down=True
        )
        reached = fraction(removed)
        if reached > target + 1e-9:
            raise AutopruneError(
                f"the exact per-layer ratios keep {reached:.4f} of the dense {budget.kind}, above the budget "
                f"{target:g}: raise the ratios, or drop 'exact' to have them scaled to the budget"
            )
        return ChannelPlan(dict(zip(names, removed)), reached)
    counts_fn, knobs = _knob(names, sizes, caps, scores, policy)
    smallest = fraction(removed_from_counts(caps))
    steps = f", widths in multiples of {step}" if step > 1 else ""
    if policy.scope == "per_layer":
        smallest_here = fraction(removed_from_counts(counts_fn(knobs[-1])))
        if smallest_here > target and smallest <= target:
            why = f"{steps} with the given per-layer ratios; groups given ratio 0 are never pruned"
            raise _unreachable(budget, smallest_here, policy, why)
        smallest = smallest_here
    if smallest > target:
        raise _unreachable(budget, smallest, policy, steps)

    # smallest knob index whose plan is within the target (plans shrink as the knob grows)
    lo, hi = 0, len(knobs) - 1
    if fraction(removed_from_counts(counts_fn(knobs[0]))) <= target:
        hi = 0
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fraction(removed_from_counts(counts_fn(knobs[mid]))) <= target:
            hi = mid
        else:
            lo = mid
    removed = removed_from_counts(counts_fn(knobs[hi]))
    best = fraction(removed)
    if hi > 0 and target - best > 1e-9:
        before = removed_from_counts(counts_fn(knobs[hi - 1]))
        if step == 1:
            best = _give_back(names, scores, removed, before, fraction, target, budget.tolerance)
        else:
            best = _give_back_steps(names, scores, removed, fraction, target, step)
    return ChannelPlan(dict(zip(names, removed)), best)


def snap(kept: int, size: int, least: int, step: int, down: bool = False) -> int:
    """``kept`` channels of a group of ``size`` (which must keep at least ``least``) moved to
    the nearest width that is a multiple of ``step`` (the larger on a tie; ``down``: the one
    at or below, where it keeps ``least``), or to ``size``, the dense width, where no multiple
    lies in [``least``, ``size``). Monotone in ``kept``, so the solver's bisection holds."""
    if step == 1 or kept >= size:
        return kept
    low = max(step, -(-least // step) * step)  # the smallest multiple the group may keep
    if low >= size:
        return size
    below = max(low, (kept // step) * step)
    above = min(below + step, size) if below < kept else below
    if down or kept - below < above - kept:
        return below
    return above


def _give_back_steps(names, scores, removed, fraction, target: float, step: int) -> float:
    """:func:`_give_back` for widths in steps: give back, in place, whole steps of removed
    channels (the most important of each group's removed ones, up to its next multiple of
    ``step`` or its dense width) while the target still holds, the most important first."""
    best = fraction(removed)
    while True:
        offers = []
        for gi, g in enumerate(names):
            gone = np.flatnonzero(removed[gi])
            if len(gone) == 0:
                continue
            kept = len(removed[gi]) - len(gone)
            take = min(len(gone), -(-(kept + 1) // step) * step - kept)
            chunk = gone[np.argsort(-scores[g][gone], kind="stable")[:take]]
            offers.append((float(np.mean(scores[g][chunk])), gi, chunk))
        for _, gi, chunk in sorted(offers, key=lambda o: -o[0]):
            removed[gi][chunk] = False
            f = fraction(removed)
            if f <= target:
                best = f
                break
            removed[gi][chunk] = True
        else:
            return best


def _give_back(names, scores, removed, before, fraction, target: float, tolerance: float) -> float:
    """The last knob step may have removed several channels at once (``removed`` against
    ``before``): give back, in place, those that still fit, most important first. If that
    leaves more than half the tolerance unused (coarse groups), offer every other removed
    channel the same way. Returns the fraction reached."""
    best = fraction(removed)
    step = _ranked(names, scores, [r & ~b for r, b in zip(removed, before)])
    rest = _ranked(names, scores, [r & b for r, b in zip(removed, before)])
    for phase, candidates in enumerate((step, rest)):
        if phase == 1 and target - best <= tolerance / 2:
            break
        for gi, c in candidates:
            removed[gi][c] = False
            f = fraction(removed)
            if f <= target:
                best = f
                if phase == 1 and target - best <= tolerance / 2:
                    break
            else:
                removed[gi][c] = True
    return best


def _ranked(names, scores, masks) -> list[tuple[int, int]]:
    """(group index, channel) of the flagged channels, highest score first."""
    flagged = [(scores[g][c], gi, c) for gi, g in enumerate(names) for c in np.flatnonzero(masks[gi])]
    return [(gi, int(c)) for _, gi, c in sorted(flagged, reverse=True)]


def _knob(names, sizes, caps, scores, policy: Policy):
    """(counts(knob) -> channels removed per group, ascending knob values to search)."""
    if policy.scope == "local":
        knobs = sorted({j / n for n, cap in zip(sizes, caps) for j in range(cap + 1)})

        def counts(r: float) -> list[int]:
            return [min(cap, int(math.floor(r * n + 1e-9))) for n, cap in zip(sizes, caps)]

        return counts, knobs
    if policy.scope == "global":
        values = np.unique(np.concatenate([scores[g] for g in names]))
        knobs = list(values) + [np.inf]
        sorted_scores = [np.sort(scores[g]) for g in names]

        def counts(t: float) -> list[int]:
            return [min(cap, int(np.searchsorted(s, t, side="left"))) for s, cap in zip(sorted_scores, caps)]

        return counts, knobs
    ratios = [float((policy.ratios or {}).get(g, 0.0)) for g in names]
    if not any(r > 0 for r in ratios):
        raise AutopruneError("per_layer ratios are all 0: give at least one group a ratio above 0")
    knobs = sorted({0.0} | {j / (n * r) for n, r, cap in zip(sizes, ratios, caps) if r > 0 for j in range(1, cap + 1)})

    def counts(alpha: float) -> list[int]:
        return [min(cap, int(math.floor(min(alpha * r, 1.0) * n + 1e-9))) for n, r, cap in zip(sizes, ratios, caps)]

    return counts, knobs


# ------------------------------------------------------------------------ unstructured


@dataclass
class LayerInfo:
    """A maskable layer: its weight count and dense FLOPs."""

    name: str
    numel: int
    flops: float


def solve_masks(
    layers: list[LayerInfo],
    scores: dict[str, np.ndarray],
    policy: Policy,
    budget: Budget,
    dense: tuple[float, float],
) -> tuple[dict[str, int], float]:
    """Weights to mask per layer (a count; the lowest-scored go) so the effective cost
    fraction is at most the budget and as close to it as possible."""
    target = budget.fraction
    flops0, params0 = dense
    caps = [max_masked(layer.numel, policy.max_ratio) for layer in layers]

    def fraction(pruned: list[int]) -> float:
        if budget.kind == "flops":
            cut = sum(layer.flops * k / layer.numel for layer, k in zip(layers, pruned))
            return (flops0 - cut) / flops0
        return (params0 - sum(pruned)) / params0

    smallest = fraction(caps)
    if smallest > target:
        raise _unreachable(budget, smallest, policy)

    if policy.scope == "global":
        pruned = _global_threshold(layers, scores, caps, fraction, target)
        # ties at the threshold, or one more weight in the last layer: fill the remainder
        pruned = _fill(layers, pruned, caps, fraction, target)
    else:
        if policy.scope == "local":
            shares = [1.0] * len(layers)
        else:
            shares = [float((policy.ratios or {}).get(layer.name, 0.0)) for layer in layers]
            if not any(shares):
                raise AutopruneError("per_layer ratios are all 0: give at least one layer a ratio above 0")

        def counts_at(s: float) -> list[int]:
            return [
                min(cap, int(math.floor(min(s * r, 1.0) * layer.numel))) for layer, r, cap in zip(layers, shares, caps)
            ]

        top = 1.0 / min(r for r in shares if r > 0)
        if fraction(counts_at(top)) > target:
            raise _unreachable(budget, fraction(counts_at(top)), policy, " with the given ratios")
        lo, hi = 0.0, top
        for _ in range(60):
            mid = (lo + hi) / 2
            if fraction(counts_at(mid)) <= target:
                hi = mid
            else:
                lo = mid
        pruned = _fill(layers, counts_at(hi), caps, fraction, target)
    return {layer.name: k for layer, k in zip(layers, pruned)}, fraction(pruned)


def _global_threshold(layers, scores, caps, fraction, target) -> list[int]:
    """Per layer, how many weights score below the lowest threshold ``t`` that meets the
    target (capped). The threshold is bisected over the bits of a float64 (at most 64 steps,
    each a binary search per layer), not over the sorted union of all scores: sorting tens of
    millions of scores twice cost most of a large model's solve. Scores are finite or -inf."""
    flat = [np.sort(scores[layer.name].ravel()) for layer in layers]

    def counts_below(t: float) -> list[int]:
        return [min(cap, int(np.searchsorted(s, t, side="left"))) for s, cap in zip(flat, caps)]

    if fraction([0] * len(layers)) <= target:
        return [0] * len(layers)
    # counts_below only changes just above a score, so the lowest threshold that meets the
    # target masks what the lowest *score* that meets it would; -inf - 1 never does, +inf does
    lo, hi = _order_key(-math.inf) - 1, _order_key(math.inf)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fraction(counts_below(_from_order_key(mid))) <= target:
            hi = mid
        else:
            lo = mid
    return counts_below(_from_order_key(hi))


_SIGN = 1 << 63


def _order_key(value: float) -> int:
    """An integer that orders float64 values as the values order (-0.0 and 0.0 alike)."""
    bits = int(np.float64(value).view(np.uint64))
    return bits if bits < _SIGN else -(bits - _SIGN)


def _from_order_key(key: int) -> float:
    bits = key if key >= 0 else (-key) | _SIGN
    return float(np.uint64(bits).view(np.float64))


def _fill(layers, pruned, caps, fraction, target) -> list[int]:
    """Un-mask weights, layer by layer, while the cost stays within the target."""
    pruned = list(pruned)
    for i in range(len(layers)):
        lo, hi = 0, pruned[i]  # how many of this layer's masked weights can come back
        while lo < hi:
            mid = (lo + hi + 1) // 2
            trial = pruned.copy()
            trial[i] -= mid
            if fraction(trial) <= target:
                lo = mid
            else:
                hi = mid - 1
        pruned[i] -= lo
    assert all(0 <= k <= c for k, c in zip(pruned, caps))
    return pruned
