"""One AMC episode without the network: the walk over the channel groups (observations and
the legal-action clip) and the reward forms (He et al. 2018, section 3; the formulas are in
docs/src/design/pruning.md, "The AMC agent").

The walk needs only an :class:`~autoprune.engine.allocation.AllocationSpace`, so the AMC
searcher builds each episode's actions in the driver; the pruned network is evaluated once the
walk is done (by :class:`~autoprune.agents.env.PruningEnv`, or by a Ray Tune trial).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from autoprune.config import REWARDS, AgentConfig
from autoprune.engine.allocation import AllocationSpace
from autoprune.errors import AutopruneError

# the observation: AMC's layer embedding
FEATURES = (
    "index",
    "type",  # 0 conv, 1 linear
    "in_channels",
    "out_channels",
    "kernel",
    "stride",
    "flops",  # the group's share of the dense FLOPs
    "flops_removed",  # share of the dense FLOPs the earlier actions removed
    "flops_rest",  # share of the dense FLOPs the later groups touch
    "previous_action",
)
DYNAMIC = (FEATURES.index("flops_removed"), FEATURES.index("previous_action"))


def _minmax(column: np.ndarray) -> np.ndarray:
    span = column.max() - column.min()
    return (column - column.min()) / span if span > 0 else np.zeros_like(column)


class Walk:
    """One episode's bookkeeping over ``space``'s groups, in network order: ``reset`` gives the
    first observation, ``step(action)`` clips the action to the legal range (so the finished
    allocation meets ``kind`` at ``target``, as ``space`` estimates it), applies it and gives
    the next observation; the finished allocation is then scaled back until it uses the
    budget (:meth:`_filled`). The static features are min-max normalised over the groups; the FLOPs
    already removed is a share of the dense FLOPs, the previous action a share of channels."""

    def __init__(self, space: AllocationSpace, kind: str, target: float) -> None:
        smallest = space.smallest(kind)
        if smallest > target + 1e-12:
            raise AutopruneError(
                f"--budget-{kind} {target:g} is unreachable for the agent: with every group at max_ratio "
                f"{space.max_ratio:g} the model keeps {smallest:.4f}; ask for at least {math.ceil(smallest * 1000) / 1000:g}"
            )
        self.space, self.kind, self.target = space, kind, target
        groups = space.groups
        flops = np.array([g.flops for g in groups])
        rest = np.array([flops[i + 1 :].sum() for i in range(len(groups))])
        raw = np.array(
            [
                [i, g.kind == "linear", g.cin, g.cout, g.kernel, g.stride, f, 0.0, r, 0.0]
                for i, (g, f, r) in enumerate(zip(groups, flops, rest))
            ],
            dtype=float,
        )
        self.static = np.stack([_minmax(raw[:, j]) for j in range(raw.shape[1])], axis=1)
        self.static[:, list(DYNAMIC)] = 0.0
        self.reset()

    @property
    def steps(self) -> int:
        return len(self.space.groups)

    @property
    def done(self) -> bool:
        return len(self.counts) == self.steps

    def reset(self) -> np.ndarray:
        self.counts: list[int] = []  # channels each group loses (once done: filled to the budget)
        self.proposed: list[int] = []  # once done: the counts as the clipped actions gave them
        self.actions: list[float] = []  # as proposed, before the clip
        self.ranges: list[tuple[float, float]] = []  # each step's legal range of pruned fractions
        return self.observation()

    def observation(self) -> np.ndarray:
        """The current group's features (the last group's once the walk is done)."""
        i = min(len(self.counts), self.steps - 1)
        obs = self.static[i].copy()
        obs[DYNAMIC[0]] = 1.0 - self.space.fraction("flops", self.counts) if self.counts else 0.0
        obs[DYNAMIC[1]] = self.counts[-1] / self.space.groups[len(self.counts) - 1].size if self.counts else 0.0
        return np.clip(obs, 0.0, 1.0).astype(np.float32)

    def step(self, action: float) -> tuple[np.ndarray, float]:
        """Apply ``action`` (the fraction of the current group's channels to prune), clipped to
        the legal range (recorded in ``ranges``) and rounded to whole channels; the next
        observation and the fraction applied."""
        if self.done:
            raise AutopruneError("the episode is over: reset() first")
        size = self.space.groups[len(self.counts)].size
        lo, hi = self.space.legal(self.kind, self.target, self.counts)
        action = float(np.clip(action, 0.0, 1.0))
        k = int(min(max(round(action * size), lo), hi))
        # the range assumes the cost falls as channels go; a latency table's interpolated
        # timings may not, everywhere: check the choice and prune further until it fits
        rest = self.space.caps[len(self.counts) + 1 :]
        while k < hi and self.space.fraction(self.kind, [*self.counts, k, *rest]) > self.target:
            k += 1
        self.counts.append(k)
        self.actions.append(action)
        self.ranges.append((lo / size, hi / size))
        if self.done:
            self.proposed = list(self.counts)
            self.counts = self._filled(self.counts)
        return self.observation(), k / size

    def _filled(self, counts: list[int]) -> list[int]:
        """The finished allocation scaled back toward the dense model until it uses the
        budget: every group's count times the smallest ``a`` in [0, 1] (rounded up to whole
        channels) whose allocation still meets the target. The agent proposes the shape of the
        allocation and the budget sets its size, so no episode keeps less than it may (AMC's
        budget-constrained actions, completed to the exact budget)."""

        def scaled(a: float) -> list[int]:
            return [math.ceil(a * k - 1e-9) for k in counts]

        def meets(a: float) -> bool:
            return self.space.fraction(self.kind, scaled(a)) <= self.target

        if not meets(1.0):  # a latency table's estimate that does not fall everywhere: as chosen
            return counts
        lo, hi = 0.0, 1.0  # lo misses the target (or is the dense model), hi meets it
        if meets(0.0):
            return scaled(0.0)
        for _ in range(30):
            mid = (lo + hi) / 2
            lo, hi = (lo, mid) if meets(mid) else (mid, hi)
        return self._topped_up(scaled(hi))

    def _topped_up(self, counts: list[int]) -> list[int]:
        """Whole channels given back, group by group, while the allocation meets the target:
        each group keeps the fewest removals that still do (one bisection per group)."""
        counts = list(counts)
        for i in range(len(counts)):
            lo, hi = -1, counts[i]  # counts[i] = hi meets the target; lo is below any count
            while hi - lo > 1:
                mid = (lo + hi) // 2
                trial = [*counts[:i], mid, *counts[i + 1 :]]
                lo, hi = (lo, mid) if self.space.fraction(self.kind, trial) <= self.target else (mid, hi)
            counts[i] = hi
        return counts

    def ratios(self) -> dict[str, float]:
        """Pruned fraction per group (``Policy.ratios`` with ``exact``)."""
        return {g.name: k / g.size for g, k in zip(self.space.groups, self.counts)}

    def fraction(self, kind: str | None = None) -> float:
        """The estimated kept fraction of ``kind`` (default: the budget's) of the allocation so far."""
        return self.space.fraction(kind or self.kind, self.counts)


def episode_policy(
    ratios: dict[str, float], criterion: str, recalibrate_batches: int, max_ratio: float
) -> dict[str, Any]:
    """The policy fields that prune an allocation exactly (within the walk's ``max_ratio``),
    with BN recalibration before the (untrained) accuracy is taken."""
    return {
        "structure": "channel",
        "max_ratio": max_ratio,
        "criterion": criterion,
        "scope": "per_layer",
        "ratios": {k: float(v) for k, v in ratios.items()},
        "exact": True,
        "finetune": {"epochs": 0, "bn_recalibrate": recalibrate_batches},
    }


def reward(
    form: str,
    acc: float,
    flops: float | None = None,
    latency_ms: float | None = None,
    target_ms: float | None = None,
    weight: float = -0.07,
    weight_below: float | None = None,
) -> float:
    """An episode's reward from the pruned network's accuracy (a share in [0, 1]):

    * ``acc``: the accuracy; the hard budget is kept by the action clip;
    * ``acc_flops``: AMC's ``-error * log(FLOPs)``, with the pruned model's FLOPs count (fvcore);
    * ``acc_latency``: ``acc * (latency / target) ** w`` (MnasNet), ``w = weight`` above the
      target and ``weight_below`` (default: ``weight``) at or below it. With one exponent (the
      soft constraint, -0.07) the target only scales every reward by the same factor; MnasNet's
      hard constraint is ``weight`` -1, ``weight_below`` 0.
    """
    if form == "acc":
        return float(acc)
    if form == "acc_flops":
        if not flops or flops <= 0:
            raise AutopruneError("reward 'acc_flops' needs the pruned model's FLOPs")
        return float(-(1.0 - acc) * math.log(flops))
    if form == "acc_latency":
        if not latency_ms or not target_ms:
            raise AutopruneError("reward 'acc_latency' needs the latency and its target (a latency table)")
        w = weight if latency_ms > target_ms or weight_below is None else weight_below
        return float(acc * (latency_ms / target_ms) ** w)
    raise AutopruneError(f"unknown reward {form!r}; choose one of {', '.join(REWARDS)}")


@dataclass(frozen=True)
class RewardSpec:
    """An episode's reward form with its settings, for the pruned networks of one dense model:
    what the environment and a search's trials both score episodes with."""

    form: str
    weight: float
    weight_below: float | None
    target_ms: float | None  # acc_latency's target (None without a latency table)

    @classmethod
    def of(cls, agent: AgentConfig, budget_fraction: float, latency=None) -> RewardSpec:
        """``agent``'s reward; the latency target is ``agent.reward_target`` (default the
        budget's fraction) of the dense model's latency as ``latency`` (the table) predicts it."""
        target = None if latency is None else (agent.reward_target or budget_fraction) * latency.predict()
        return cls(agent.reward, agent.reward_weight, agent.reward_weight_below, target)

    def __call__(self, acc: float, flops: float | None = None, latency_ms: float | None = None) -> float:
        return reward(self.form, acc, flops, latency_ms, self.target_ms, self.weight, self.weight_below)
