"""An Optuna searcher does not spend a trial on a proposal it made before in the search: it
asks its sampler again, and lets a repeat through only when the sampler keeps proposing it.
Real samplers (NSGA-II, random) on a space of a few policies, where repeats are likely."""

from __future__ import annotations

import pickle

import pytest

from autoprune.rayenv import quiet_environment

quiet_environment()

import optuna  # noqa: E402
from optuna.trial import TrialState  # noqa: E402
from ray.tune.search.optuna import OptunaSearch  # noqa: E402

from autoprune.contract import FINAL, TrialConfig  # noqa: E402
from autoprune.search.searchers import REPEAT_ASKS, PolicyOptunaSearch, _optuna_memo, proposal_key  # noqa: E402

GOALS = {"metric": ["val_acc", "flops_ratio"], "mode": ["max", "min"]}


def four_policies(trial) -> dict:
    criterion = trial.suggest_categorical("criterion", ["magnitude", "taylor"])
    scope = trial.suggest_categorical("scope", ["local", "global"])
    return TrialConfig({"criterion": criterion, "scope": scope}).to_config()


def one_policy(trial) -> dict:
    trial.suggest_categorical("criterion", ["magnitude"])
    return TrialConfig({"criterion": "magnitude"}).to_config()


def broken_space(trial) -> dict:
    return TrialConfig(space_error="ValueError: no policy").to_config()


def _nsga2(space, seed: int, cls=PolicyOptunaSearch):
    return cls(space=space, sampler=optuna.samplers.NSGAIISampler(seed=seed, population_size=4), **GOALS)


def _result(config: dict) -> dict:
    policy = config["policy"]
    acc = (0.9 if policy.get("criterion") == "magnitude" else 0.8) + (0.05 if policy.get("scope") == "global" else 0)
    return {"val_acc": acc, "flops_ratio": 0.5, FINAL: True}


def _run(searcher, trials: int, start: int = 0, asks: list[int] | None = None) -> list[str]:
    """Suggest and complete ``trials`` trials one after another; their proposals' keys (and
    in ``asks``, how many times each suggestion asked the sampler)."""
    keys = []
    for i in range(start, start + trials):
        before = len(searcher._ot_study.trials)
        config = searcher.suggest(f"t{i}")
        if asks is not None:
            asks.append(len(searcher._ot_study.trials) - before)
        keys.append(proposal_key({k: v for k, v in config.items() if k in ("policy", "budget_fraction")}))
        searcher.on_trial_complete(f"t{i}", _result(config))
    return keys


def _states(searcher) -> list[TrialState]:
    return [t.state for t in searcher._ot_study.trials]


def _repeats(keys: list[str]) -> list[int]:
    return [i for i, k in enumerate(keys) if k in keys[:i]]


def test_nsga2_proposes_every_policy_once_before_any_twice():
    seeds = range(6)
    bare = [_repeats(_run(_nsga2(four_policies, seed, OptunaSearch), 4)) for seed in seeds]
    assert sum(map(len, bare)) >= 2  # the sampler alone repeats within the first four
    let_through = 0
    for seed in seeds:
        searcher, asks = _nsga2(four_policies, seed), []
        repeats = _repeats(_run(searcher, 4, asks=asks))
        # a repeat runs only after the sampler proposed it again on every ask
        assert all(asks[i] == REPEAT_ASKS + 1 for i in repeats), (seed, asks)
        let_through += len(repeats)
        # the asks that repeated were told as failed: NSGA-II's population is the four trials that ran
        assert _states(searcher).count(TrialState.COMPLETE) == 4
        assert _states(searcher).count(TrialState.FAIL) == sum(asks) - 4
    assert let_through < sum(map(len, bare)) / 2  # most repeats are asked away (all, but for bad luck)


def test_a_sampler_that_keeps_repeating_is_let_through():
    searcher = _nsga2(one_policy, 0)
    keys = _run(searcher, 3)
    assert len(keys) == 3 and len(set(keys)) == 1  # the one policy runs three times
    states = _states(searcher)
    assert states.count(TrialState.COMPLETE) == 3
    assert states.count(TrialState.FAIL) == 2 * REPEAT_ASKS  # asked again for the second and third


def test_a_failing_space_is_not_asked_again():
    searcher = _nsga2(broken_space, 0)
    for i in range(3):
        assert "space_error" in searcher.suggest(f"t{i}")
    assert len(searcher._ot_study.trials) == 3


@pytest.mark.parametrize("seed", range(3))
def test_the_proposals_outlive_pickling_and_a_resume(seed):
    searcher = PolicyOptunaSearch(space=four_policies, sampler=optuna.samplers.RandomSampler(seed=seed), **GOALS)
    first = _run(searcher, 2)
    assert len(set(first)) == 2
    copy = pickle.loads(pickle.dumps(searcher))  # as Tune pickles the searcher with the Tuner
    assert len(set(first + _run(copy, 2, start=2))) == 4
    # a resume: a new searcher told the finished trials' records proposes the policies left
    records = [_record(searcher, f"t{i}") for i in range(2)]
    resumed = PolicyOptunaSearch(space=four_policies, sampler=optuna.samplers.RandomSampler(seed=seed + 10), **GOALS)
    resumed.tell_finished(records)
    assert len(set(first + _run(resumed, 2, start=2))) == 4


def _record(searcher: PolicyOptunaSearch, trial_id: str) -> dict:
    """What the search's journal keeps of a completed trial (the fields tell_finished reads)."""
    trial = searcher._ot_trials[trial_id]
    policy = {k: trial.params[k] for k in ("criterion", "scope")}
    config = TrialConfig(policy, searcher=_optuna_memo(searcher._ot_study, trial)).to_config()
    return {"trial_id": trial_id, "config": config, "status": "completed", "report": _result(config), "curve": []}
