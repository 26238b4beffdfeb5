"""Every registered searcher keeps the searcher contract (``autoprune.contract``), without Ray
running: it suggests trial configs that are valid policies within the budget, is seeded, takes
completed, early-stopped and failed trials, and continues after save/restore. A new searcher
(the AMC agent) joins by registering in ``SEARCHERS``."""

from __future__ import annotations

import pickle
import threading

import pytest

from autoprune.rayenv import quiet_environment

quiet_environment()

from autoprune import engine  # noqa: E402
from autoprune.agents.searcher import AMCSearch  # noqa: E402
from autoprune.config import Budget, Policy, SearchConfig, TaskConfig  # noqa: E402
from autoprune.contract import FINAL, SEARCHER_KEYS, TrialConfig, is_final, objectives  # noqa: E402
from autoprune.engine.layers import layer_table  # noqa: E402
from autoprune.engine.tasks import get_task  # noqa: E402
from autoprune.search.searchers import SEARCHERS, SearcherContext  # noqa: E402
from autoprune.search_spaces import get_space  # noqa: E402

BUDGET = Budget("flops", 0.5)


@pytest.fixture(scope="module")
def table():
    return layer_table(get_task(TaskConfig()))


def _context(name: str, table) -> SearcherContext:
    spec = SEARCHERS.get(name)
    space = "criteria" if spec.needs_grid else "default"
    grid = get_space(space).grid(table) if spec.needs_grid else None
    # what the runner adds from the dense model (the AMC agent: its allocation space and settings)
    task = get_task(TaskConfig())
    extra = spec.hooks().context(SearchConfig(searcher=name), task.model_factory(), task, None)
    return SearcherContext(table=table, budget=BUDGET, seed=7, trials=6, space=space, grid=grid, extra=extra)


def _suggest(searcher, trial_id: str) -> TrialConfig:
    config = searcher.suggest(trial_id)
    assert isinstance(config, dict), f"suggest returned {config!r}"
    return TrialConfig.from_config(config)


def _check(trial: TrialConfig, table) -> Policy:
    assert trial.space_error is None, trial.space_error
    policy = Policy.from_dict(trial.policy)
    engine.check_policy(policy)
    assert policy.structure in table.structures
    if policy.scope == "per_layer":
        assert set(policy.ratios) <= set(table.units(policy.structure))
    if trial.budget_fraction is not None:
        assert 0 < trial.budget_fraction <= BUDGET.fraction
    return policy


def _report(epoch: int, final: bool, acc: float) -> dict:
    row = {"epoch": epoch, "val_acc": acc, "loss": 1.0 - acc, "node_id": "n", "training_iteration": epoch}
    row.update(flops=5e5, params=1e4, flops_ratio=0.49, params_ratio=0.5, ratios={}, recal_acc=acc, reward=acc)
    row.update(latency_predicted_ms=2.0 - acc)
    if final:
        row.update(predicted_speedup=1.3, latency_measured_ms=1.1, engine_s=1.0, report_s=0.0, **{FINAL: True})
    return row


@pytest.mark.parametrize("name", SEARCHERS.names())
def test_searcher_keeps_the_contract(name, table, tmp_path):
    spec = SEARCHERS.get(name)
    assert spec.scheduler in ("asha", "none")
    searcher = spec.make(_context(name, table))
    trials = [_suggest(searcher, f"t{i}") for i in range(4)]
    for trial in trials:
        _check(trial, table)
    if spec.multi_objective:  # its cost objective varies: the budget fraction is sampled
        assert len({t.budget_fraction for t in trials}) > 1
        assert [m for m, _ in objectives(BUDGET.kind)] == searcher.metric

    # a completed trial, one the scheduler stopped after an epoch, one that failed, another completed
    searcher.on_trial_result("t0", _report(1, False, 0.8))
    searcher.on_trial_complete("t0", result=_report(2, True, 0.9))
    searcher.on_trial_result("t1", _report(1, False, 0.5))
    assert not is_final(_report(1, False, 0.5))
    searcher.on_trial_complete("t1", result=_report(1, False, 0.5))
    searcher.on_trial_complete("t2", result=None, error=True)
    searcher.on_trial_complete("t3", result=_report(2, True, 0.7))

    # it goes on after save/restore, into a fresh searcher from the same context
    path = str(tmp_path / "searcher.pkl")
    searcher.save(path)
    restored = spec.make(_context(name, table))
    restored.restore(path)
    if isinstance(searcher, AMCSearch):  # it learned from the trials: the restored one goes on where it stopped
        assert restored.started == searcher.started and repr(restored.history) == repr(searcher.history)  # nan-safe
        assert _suggest(restored, "t4") == _suggest(searcher, "t4")
    else:
        _check(_suggest(restored, "t4"), table)


@pytest.mark.parametrize("name", SEARCHERS.names())
def test_searcher_is_told_a_resumed_searchs_records(name, table, tmp_path):
    """A resume builds a new searcher and tells it the finished trials from the search's own
    records (never from Tune's pickles): each registered searcher takes them, written and read
    back through the journal, and goes on from where the first one was."""
    from autoprune.search import journal

    spec = SEARCHERS.get(name)
    first = spec.make(_context(name, table))
    configs = [first.suggest(f"t{i}") for i in range(4)]
    outcomes = [  # completed, stopped by the scheduler after an epoch, failed, completed
        ("completed", [_report(1, False, 0.8), _report(2, True, 0.9)]),
        ("stopped", [_report(1, False, 0.5)]),
        ("failed", []),
        ("completed", [_report(1, False, 0.6), _report(2, True, 0.7)]),
    ]
    for i, (status, reports) in enumerate(outcomes):
        for report in reports:  # Tune hands the searcher every report, the last one too
            first.on_trial_result(f"t{i}", report)
        first.on_trial_complete(f"t{i}", result=reports[-1] if reports else None, error=status == "failed")
        curve = [journal.curve_point(r) for r in reports]
        error = "RuntimeError: boom" if status == "failed" else None
        rec = journal.record(f"t{i}", i + 1, status, configs[i], reports[-1] if reports else {}, curve, error)
        journal.save(str(tmp_path), rec)
    records = journal.load(str(tmp_path))
    assert [r["trial_id"] for r in records] == ["t0", "t1", "t2", "t3"]

    second = spec.make(_context(name, table))
    second.tell_finished(records)
    if isinstance(first, AMCSearch):  # the same episodes learned, the next one numbered after them
        assert second.started == first.started == 4
        assert [h["reward"] for h in second.history] == [h["reward"] for h in first.history]
        assert second.ddpg.baseline == pytest.approx(first.ddpg.baseline)
    else:

        def told(s):
            return [(t.state, t.values, t.intermediate_values, t.params) for t in s._ot_study.trials]

        assert told(second) == told(first)
    _check(_suggest(second, "t4"), table)
    if spec.needs_grid:  # a grid point already run is not proposed again
        attrs = second._ot_study._storage.get_trial_system_attrs(second._ot_trials["t4"]._trial_id)
        assert attrs["grid_id"] not in [r["config"]["searcher"]["system_attrs"]["grid_id"] for r in records]


@pytest.mark.parametrize("name", SEARCHERS.names())
def test_searcher_survives_pickling_and_the_tuner_state(name, table, tmp_path):
    """Ray Tune pickles the searcher into ``tuner.pkl`` when the Tuner is built (with Ray's
    cloudpickle) and into its experiment snapshots: each registered searcher, with whatever
    sampler it wraps (optuna 5.1's NSGA-II holds a thread lock), survives both and goes on."""
    from ray import cloudpickle, tune

    spec = SEARCHERS.get(name)
    searcher = spec.make(_context(name, table))
    _suggest(searcher, "t0")
    searcher.on_trial_complete("t0", result=_report(2, True, 0.9))
    for dumps in (pickle.dumps, cloudpickle.dumps):
        _check(_suggest(pickle.loads(dumps(searcher)), "t1"), table)

    tune.Tuner(
        lambda config: None,
        tune_config=tune.TuneConfig(search_alg=searcher, num_samples=2),
        run_config=tune.RunConfig(name="pickled", storage_path=str(tmp_path)),
    )
    state = pickle.loads((tmp_path / "pickled" / "tuner.pkl").read_bytes())
    _check(_suggest(state["_tune_config"].search_alg, "t1"), table)


def test_an_optuna_searcher_pickles_a_sampler_that_holds_locks(table, tmp_path):
    """Whatever sampler a searcher wraps: one holding a Lock and an RLock pickles, and the copy
    gets fresh, unheld locks of the same kinds (a lock belongs to one process's threads)."""
    import optuna

    from autoprune.search.searchers import _optuna

    class LockedSampler(optuna.samplers.RandomSampler):
        def __init__(self, seed: int) -> None:
            super().__init__(seed=seed)
            self.lock, self.rlock = threading.Lock(), threading.RLock()

    searcher = _optuna(_context("random", table), LockedSampler(seed=3))
    searcher._sampler.lock.acquire()
    copy = pickle.loads(pickle.dumps(searcher))
    assert type(copy._sampler.lock) is type(searcher._sampler.lock) and not copy._sampler.lock.locked()
    assert type(copy._sampler.rlock) is type(searcher._sampler.rlock)
    assert _suggest(copy, "t0") == _suggest(searcher, "t0")  # the sampler's random state came along
    path = str(tmp_path / "searcher.pkl")
    searcher.save(path)
    restored = _optuna(_context("random", table), optuna.samplers.RandomSampler(seed=99))
    restored.restore(path)
    assert _suggest(restored, "t1") == _suggest(searcher, "t1")


@pytest.mark.parametrize("name", SEARCHERS.names())
def test_searcher_hooks_keep_to_the_contract(name):
    """A searcher's hooks add only report keys the contract knows, and its own settings are
    a field of SearchConfig."""
    hooks = SEARCHERS.get(name).hooks()
    assert set(hooks.report_keys) <= set(SEARCHER_KEYS)
    assert hooks.settings is None or hasattr(SearchConfig(), hooks.settings)
    assert (hooks.trial_hook(SearchConfig(searcher=name), None) is None) == (not hooks.report_keys)


@pytest.mark.parametrize("name", SEARCHERS.names())
def test_searcher_is_seeded(name, table):
    spec = SEARCHERS.get(name)
    first = [_suggest(spec.make(_context(name, table)), f"t{i}") for i in range(1)]
    again = [_suggest(spec.make(_context(name, table)), f"t{i}") for i in range(1)]
    assert first == again


def test_optuna_searchers_learn_what_the_trials_reported(table, tmp_path):
    """Through the contract, a completed trial is told COMPLETE with its accuracy, a stopped one
    PRUNED with its per-epoch values (not a partial value passed off as complete), a failed one FAIL."""
    from optuna.trial import TrialState

    searcher = SEARCHERS.get("tpe").make(_context("tpe", table))
    for i in range(3):
        _suggest(searcher, f"t{i}")
    searcher.on_trial_result("t0", _report(1, False, 0.8))
    searcher.on_trial_complete("t0", result=_report(2, True, 0.9))
    searcher.on_trial_result("t1", _report(1, False, 0.5))
    searcher.on_trial_complete("t1", result=_report(1, False, 0.5))
    searcher.on_trial_complete("t2", result=None, error=True)
    states = [(t.state, t.value, t.intermediate_values) for t in searcher._ot_study.trials]
    assert states == [
        (TrialState.COMPLETE, 0.9, {1: 0.8}),
        (TrialState.PRUNED, 0.5, {1: 0.5}),  # Optuna keeps a pruned trial's last intermediate value
        (TrialState.FAIL, None, {}),
    ]


def test_trial_config_refuses_what_the_contract_does_not_have():
    from autoprune.errors import AutopruneError

    with pytest.raises(AutopruneError, match="unknown key.*lr.*policy, budget_fraction, space_error and searcher"):
        TrialConfig.from_config({"policy": {}, "lr": 0.1})
    with pytest.raises(AutopruneError, match="budget_fraction must be in"):
        TrialConfig.from_config({"budget_fraction": 1.5})
    assert TrialConfig.from_config(TrialConfig({"scope": "global"}, 0.25).to_config()) == TrialConfig(
        {"scope": "global"}, 0.25
    )


@pytest.mark.parametrize("name", [n for n in SEARCHERS if SEARCHERS.get(n).in_flight is not None])
def test_a_model_based_searchers_cap_leaves_most_proposals_steered(name):
    """With C trials in flight TPE's first C + startup - 1 proposals come before it has the
    startup results it models: the cap keeps those at most half the trials. NSGA-II breeds a
    generation from the last: the cap keeps less than a generation in flight."""
    from autoprune.search.searchers import _nsga2_population, _tpe_startup

    cap = SEARCHERS.get(name).in_flight
    for trials in (6, 20, 50, 200, 1000):
        c = cap(trials)
        assert 1 <= c <= trials
        if name == "tpe":
            assert c + _tpe_startup(trials) - 1 <= max(trials // 2, 3), (trials, c)
        else:
            assert c <= _nsga2_population(trials) // 2, (trials, c)
    assert cap(200) >= 25  # still wide enough to fill a large cluster's slots in rounds
