"""Baselines inside every search and the verdict against uniform pruning, without Ray running
(the whole flow with a real search is in test_runner.py)."""

from __future__ import annotations

import pytest

from autoprune.rayenv import quiet_environment

quiet_environment()

from autoprune.config import Budget, Policy, TaskConfig  # noqa: E402
from autoprune.contract import FINAL, TrialConfig  # noqa: E402
from autoprune.engine.layers import layer_table  # noqa: E402
from autoprune.engine.tasks import get_task  # noqa: E402
from autoprune.search.baselines import BASELINES, WithBaselines, baseline_names, baseline_of  # noqa: E402
from autoprune.search.searchers import SEARCHERS, SearcherContext  # noqa: E402
from autoprune.search.verdict import gain, gain_sentence, rerun_seeds, search_epochs  # noqa: E402


@pytest.fixture(scope="module")
def table():
    return layer_table(get_task(TaskConfig()), ("channel",))


def _tpe(table) -> WithBaselines:
    ctx = SearcherContext(table=table, budget=Budget("flops", 0.5), seed=3, trials=6)
    return WithBaselines(SEARCHERS.get("tpe").make(ctx), "channel", baseline_names(6))


def test_the_first_trials_are_the_baselines_and_the_sampler_is_not_told_of_them(table):
    searcher = _tpe(table)
    configs = [searcher.suggest(f"t{i}") for i in range(4)]
    assert [baseline_of(c) for c in configs] == ["uniform", "global", None, None]
    for c, name in zip(configs, BASELINES):
        policy = Policy.from_dict(TrialConfig.from_config(c).policy)
        assert (policy.structure, policy.criterion, policy.scope, policy.method) == (
            "channel",
            "magnitude",
            BASELINES[name]["scope"],
            "oneshot",
        )
    for i in range(4):
        searcher.on_trial_complete(f"t{i}", {"val_acc": 0.9, FINAL: True, "training_iteration": 1})
    study = searcher.inner._ot_study
    assert len(study.trials) == 2  # the sampler's own two, not the baselines


def test_a_resume_hands_out_only_the_baselines_that_did_not_run(table):
    first = _tpe(table)
    uniform = first.suggest("a")
    sampled = first.suggest("b"), first.suggest("c")
    assert baseline_of(sampled[1]) is None
    records = [
        {"trial_id": "a", "config": uniform, "status": "completed", "report": {"val_acc": 0.9}, "curve": []},
    ]
    resumed = _tpe(table)
    resumed.tell_finished(records)
    assert resumed.pending == ["global"]
    assert baseline_of(resumed.suggest("d")) == "global" and baseline_of(resumed.suggest("e")) is None
    assert len(resumed.inner._ot_study.trials) == 1  # the uniform record was not told to Optuna


def test_small_searches_run_fewer_baselines():
    assert baseline_names(1) == [] and baseline_names(2) == ["uniform"]
    assert baseline_names(3) == baseline_names(20) == ["uniform", "global"]


def test_the_verdict_weighs_the_gain_against_the_test_splits_noise():
    small = gain(0.990, 0.985, 360)  # half a point on 360 samples: noise
    assert small["points"] == pytest.approx(0.5) and not small["beyond_noise"]
    assert gain_sentence(small, 70).startswith("no gain over uniform pruning at matched compute (70 epochs): +0.5")
    big = gain(0.95, 0.80, 1000)
    assert big["beyond_noise"] and gain_sentence(big, 70).startswith("search gained +15.0 ± ")
    worse = gain(0.80, 0.95, 1000)
    assert gain_sentence(worse, 70).startswith("search lost -15.0 ± ")


def test_the_search_epochs_count_every_trial_the_reruns_and_the_final_run():
    from autoprune.contract import TrialRecord

    records = [TrialRecord(i, str(i), "completed", {}, None, {"epoch": e}, {}) for i, e in enumerate((3, 3, 1))]
    records.append(TrialRecord(3, "3", "failed", {}, None, {}, {}))
    assert search_epochs(records, reruns=4, final_epochs=10) == 7 + 5 * 10


def test_the_final_reruns_take_as_many_seeds_as_the_trials_epochs_pay_for():
    from autoprune.contract import TrialRecord

    records = [TrialRecord(i, str(i), "completed", {}, None, {"epoch": 3}, {}) for i in range(20)]  # 60 epochs
    assert rerun_seeds(records, candidates=4, final_epochs=10) == 1  # 40 epochs a seed: one fits in 60
    assert rerun_seeds(records, candidates=3, final_epochs=10) == 2
    assert rerun_seeds(records, candidates=2, final_epochs=5) == 3  # at most three
    assert rerun_seeds(records[:2], candidates=4, final_epochs=10) == 1  # never none


def test_the_agents_default_episodes_grow_with_the_models_groups(table):
    amc, tpe = SEARCHERS.get("amc"), SEARCHERS.get("tpe")
    assert len(table.groups) == 6 and amc.default_trials(40, len(table.groups)) == 150
    assert amc.default_trials(40, 1) == 40  # never fewer than its floor
    assert tpe.default_trials(20, 50) == 20  # the samplers' trials do not depend on the model
