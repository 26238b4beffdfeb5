"""Baselines inside every search: its first trials prune uniformly and globally by magnitude.

A tuned policy is worth its search only if it beats the simple ones by more than the
validation split's noise. So the first trials of a search are the baselines (:data:`BASELINES`:
one ratio for every layer, then one global threshold, both by weight magnitude), run like any
trial under the same budget and epochs; the sampler then proposes the rest. The sampler is
not told the baselines (their policies lie outside its space); the end of the search ranks
them with every other trial (:func:`autoprune.search.results.best_within`), ties going to
them, and reports the winner against the uniform one.
"""

from __future__ import annotations

from typing import Any

from ..contract import TrialConfig
from ..rayenv import quiet_environment

quiet_environment()  # Ray reads its token mode when imported
from ray.tune.search import Searcher  # noqa: E402

# name -> the policy fields it sets (the rest keep Policy's defaults: one-shot, no BN warm-up)
BASELINES: dict[str, dict[str, Any]] = {
    "uniform": {"criterion": "magnitude", "scope": "local"},
    "global": {"criterion": "magnitude", "scope": "global"},
}
UNIFORM = "uniform"


def baseline_of(config: dict[str, Any]) -> str | None:
    """The baseline a trial's config (Ray Tune's dict) ran, or None for a sampled trial."""
    memo = config.get("searcher")
    return memo.get("baseline") if isinstance(memo, dict) else None


class WithBaselines(Searcher):
    """A searcher that hands out :data:`BASELINES` (each once, in order) before its inner
    searcher's suggestions, and tells the inner searcher only of the trials it proposed."""

    def __init__(self, inner: Searcher, structure: str, names: list[str]) -> None:
        self.inner = inner
        self.structure = structure
        self.pending = list(names)  # baselines still to hand out
        self.mine: set[str] = set()  # trial ids that ran a baseline
        super().__init__(metric=inner.metric, mode=inner.mode)

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        return self.inner.set_search_properties(metric, mode, config, **spec)

    def set_max_concurrency(self, max_concurrent: int) -> bool:
        return self.inner.set_max_concurrency(max_concurrent)

    def suggest(self, trial_id: str):
        if self.pending:
            name = self.pending.pop(0)
            self.mine.add(trial_id)
            policy = {**BASELINES[name], "structure": self.structure}
            return TrialConfig(policy, searcher={"baseline": name}).to_config()
        return self.inner.suggest(trial_id)

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if trial_id not in self.mine:
            self.inner.on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id not in self.mine:
            self.inner.on_trial_complete(trial_id, result=result, error=error)

    def tell_finished(self, records: list[dict]) -> None:
        """A resume's finished trials: the baselines among them are not handed out again;
        the rest go to the inner searcher."""
        ran = {baseline_of(r["config"]) for r in records}
        self.pending = [n for n in self.pending if n not in ran]
        self.inner.tell_finished([r for r in records if baseline_of(r["config"]) is None])

    def save(self, checkpoint_path: str) -> None:
        self.inner.save(checkpoint_path)

    def restore(self, checkpoint_path: str) -> None:
        self.inner.restore(checkpoint_path)


def baseline_names(trials: int) -> list[str]:
    """The baselines a search of ``trials`` runs: all of them, fewer when it has fewer trials,
    and none for a single trial (the sampler's one proposal is then the search)."""
    return list(BASELINES)[: max(0, min(len(BASELINES), trials - 1))]
