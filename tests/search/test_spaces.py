"""Search spaces, the searcher's bookkeeping and the Pareto front, without starting Ray."""

from __future__ import annotations

import contextlib
import math
from functools import partial

import optuna
import pytest

from autoprune.config import Budget, Policy
from autoprune.errors import AutopruneError
from autoprune.search_spaces import SPACES, criteria_for, get_space

optuna.logging.set_verbosity(optuna.logging.WARNING)


@pytest.fixture(scope="module")
def table(digits_task):
    from autoprune.engine.layers import layer_table

    return layer_table(digits_task)


def _policies(space, table, n, sampler=None):
    study = optuna.create_study(sampler=sampler or optuna.samplers.RandomSampler(seed=0))
    out = []
    for _ in range(n):
        trial = study.ask()
        out.append((trial, space(trial, table)))
        study.tell(trial, 0.0)
    return out


def test_layer_table_describes_the_model(table):
    assert table.groups and table.layers
    assert set(table.group_flops) == set(table.groups)
    assert all(0 < f <= 1 for f in table.group_flops.values())
    assert math.isclose(sum(table.layer_flops.values()), 1.0, rel_tol=0.05)  # convs and linear carry the FLOPs


@pytest.mark.parametrize("name", SPACES.names())
def test_every_sampled_policy_is_valid(name, table):
    seen = set()
    for _, fields in _policies(SPACES.get(name), table, 40):
        policy = Policy.from_dict(fields)
        seen.add((policy.structure, policy.criterion, policy.scope))
        if policy.scope == "per_layer":
            assert set(policy.ratios) == set(table.units(policy.structure))
    assert len(seen) > 5  # the space really varies


def test_default_space_covers_all_criteria_and_scopes(table):
    got = [Policy.from_dict(f) for _, f in _policies(SPACES.get("default"), table, 200)]
    assert {p.criterion for p in got} == set(criteria_for("channel")) | set(criteria_for("unstructured"))
    assert {p.scope for p in got} == {"global", "local", "per_layer"}
    assert {p.structure for p in got} == {"channel", "unstructured"}
    # the learning rate is the recipe's, not sampled: every policy fine-tunes at the default
    assert {p.finetune.lr for p in got} == {Policy().finetune.lr}
    assert all("finetune" not in fields for _, fields in _policies(SPACES.get("default"), table, 20))


def test_structure_can_be_pinned(table):
    import dataclasses

    channel_only = dataclasses.replace(table, structures=("channel",))
    got = {Policy.from_dict(f).structure for _, f in _policies(SPACES.get("default"), channel_only, 30)}
    assert got == {"channel"}


def test_pai_space_prunes_at_initialisation(table):
    for _, fields in _policies(SPACES.get("pai"), table, 20):
        assert fields["method"] == "init" and fields["structure"] == "unstructured"
    assert set(criteria_for("unstructured", data=True)) == {"taylor", "snip", "grasp", "fisher", "hutchinson"}


def test_grid_sampler_visits_every_cell_of_the_criteria_space_once(table):
    from autoprune.search.searchers import define_by_run

    space = get_space("criteria")
    grid = space.grid(table)
    assert math.prod(len(v) for v in grid.values()) == 20
    study = optuna.create_study(sampler=optuna.samplers.GridSampler(grid, seed=0))
    fn = partial(define_by_run, "criteria", table, None)
    cells = set()
    for _ in range(20):
        trial = study.ask()
        fields = fn(trial)["policy"]
        cells.add((fields["criterion"], fields["scope"]))
        with contextlib.suppress(RuntimeError):  # the exhausted grid calls Study.stop(), fine only in optimize()
            study.tell(trial, 0.0)
    assert len(cells) == 20


def test_a_raising_space_becomes_the_trial_error(table, tmp_path, monkeypatch):
    from autoprune.search.searchers import define_by_run

    (tmp_path / "bad_space_mod.py").write_text("def space(trial, table):\n    raise ValueError('no luck')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    trial = optuna.create_study().ask()
    out = define_by_run("bad_space_mod:space", table, None, trial)
    from autoprune.contract import TrialConfig

    assert TrialConfig.from_config(out) == TrialConfig(space_error="ValueError: no luck")
    with pytest.raises(AutopruneError, match="no attribute 'nope'"):
        get_space("bad_space_mod:nope")


def test_multi_objective_trials_sample_a_budget_up_to_the_limit(table):
    from autoprune.search.searchers import define_by_run

    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    fractions = [
        define_by_run("default", table, Budget("flops", 0.5), study.ask())["budget_fraction"] for _ in range(20)
    ]
    assert all(0.125 <= f <= 0.5 for f in fractions) and len(set(fractions)) == 20


def test_pareto_front_keeps_exactly_the_non_dominated():
    from autoprune.contract import TrialRecord, objectives
    from autoprune.search.results import pareto_front

    def rec(i, acc, flops, lat, status="completed"):
        return TrialRecord(
            i, str(i), status, {}, None, {"val_acc": acc, "flops_ratio": flops, "latency_predicted_ms": lat}, {}
        )

    records = [
        rec(0, 0.90, 0.5, 1.0),
        rec(1, 0.95, 0.5, 1.0),  # dominates 0
        rec(2, 0.80, 0.3, 1.0),  # cheaper: on the front
        rec(3, 0.80, 0.3, 1.2),  # dominated by 2 (slower)
        rec(4, 0.95, 0.5, 1.0),  # equal to 1: neither dominates
        rec(5, 0.99, 0.1, 0.1, status="failed"),  # not completed: ignored
    ]
    assert [r.trial_id for r in pareto_front(records, objectives("flops"))] == ["1", "2", "4"]
    assert [r.trial_id for r in pareto_front(records, objectives("flops")[:2])] == ["1", "2", "3", "4"]


def test_best_within_breaks_accuracy_ties_by_predicted_latency_and_can_minimise_loss():
    from autoprune.contract import TrialRecord
    from autoprune.search.results import best_within

    def rec(i, acc, loss, flops, lat, status="completed"):
        metrics = {"val_acc": acc, "val_loss": loss, "flops_ratio": flops, "latency_predicted_ms": lat}
        return TrialRecord(i, str(i), status, {}, None, metrics, {})

    records = [
        rec(0, 1.0, 0.05, 0.49, 0.40),  # cheaper in FLOPs, slower
        rec(1, 1.0, 0.02, 0.50, 0.35),  # same accuracy, more FLOPs than 0 but predicted faster: picked
        rec(2, 1.0, 0.01, 0.51, 0.20),  # over budget
        rec(3, 0.9, 0.30, 0.40, 0.10),
        rec(4, 1.0, 0.001, 0.3, 0.1, status="stopped"),  # not completed
    ]
    assert best_within(records, "flops", 0.5).trial_id == "1"
    assert best_within(records, "flops", 0.5, "val_loss").trial_id == "1"
    records[0].metrics["val_loss"] = 0.001
    assert best_within(records, "flops", 0.5, "val_loss").trial_id == "0"  # lowest loss first
    assert best_within(records, "flops", 0.2) is None


def test_the_searchers_optimise_the_metric_asked_for():
    from autoprune.config import Budget
    from autoprune.contract import objectives
    from autoprune.search.searchers import SEARCHERS, SearcherContext

    table = None  # the Optuna factories read the table only when they suggest
    tpe = SEARCHERS.get("tpe").make(SearcherContext(table=table, budget=Budget(), seed=0, trials=10, metric="val_loss"))
    assert (tpe.metric, tpe.mode) == ("val_loss", "min")
    nsga2 = SEARCHERS.get("nsga2").make(SearcherContext(table=table, budget=Budget("latency", 0.5), seed=0, trials=10))
    assert list(zip(nsga2.metric, nsga2.mode)) == list(objectives("latency"))
    assert objectives("latency")[1:] == (("latency_ratio", "min"), ("flops_ratio", "min"))
    assert (
        objectives("flops", "val_loss")[0] == ("val_loss", "min")
        and objectives("flops")[2][0] == "latency_predicted_ms"
    )


def test_multi_objective_budgets_stay_above_what_the_policies_can_reach(table):
    from autoprune.search.searchers import define_by_run

    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=2))
    budget = Budget("latency", 0.8)
    fractions = [define_by_run("default", table, budget, study.ask(), floor=0.6)["budget_fraction"] for _ in range(20)]
    assert all(0.6 <= f <= 0.8 for f in fractions) and min(fractions) < 0.65


def test_trials_within_the_noise_of_the_best_go_to_the_simplest_policy():
    from autoprune.contract import TrialRecord
    from autoprune.search.results import best_within

    def rec(i, acc, policy):
        return TrialRecord(i, str(i), "completed", policy, None, {"val_acc": acc, "flops_ratio": 0.5}, {})

    uniform = {"scope": "local", "criterion": "magnitude"}
    glob = {"scope": "global", "criterion": "magnitude"}
    tuned = {"scope": "per_layer", "criterion": "fpgm", "ratios": {"a": 0.3}}
    records = [rec(0, 0.950, uniform), rec(1, 0.955, glob), rec(2, 0.960, tuned)]
    assert best_within(records, "flops", 0.5).trial_id == "2"  # no split size: the highest
    # 1 point apart on 400 samples is noise (2 SE of the difference ~ 3 points): the uniform one
    assert best_within(records, "flops", 0.5, n_val=400).trial_id == "0"
    # on 100,000 samples the same points are signal: the best stands
    assert best_within(records, "flops", 0.5, n_val=100_000).trial_id == "2"
    # beyond the noise of the uniform one but not of the global one: the global one
    records[0].metrics["val_acc"] = 0.90
    assert best_within(records, "flops", 0.5, n_val=2_000).trial_id == "1"
    # loss is not an accuracy: no binomial noise, the lowest loss as before
    for r, loss in zip(records, (0.3, 0.2, 0.1)):
        r.metrics["val_loss"] = loss
    assert best_within(records, "flops", 0.5, "val_loss", n_val=400).trial_id == "2"


def test_the_split_warning_names_the_resolution_and_the_size_that_resolves_one_point():
    from autoprune.search.ranking import resolution_points, split_warning, standard_error

    assert standard_error(0.98, 400) == pytest.approx(0.007)
    assert standard_error(1.0, 100) > 0  # a perfect score is not exact
    assert resolution_points(0.98, 400) == pytest.approx(100 * 2 * 2**0.5 * 0.007)
    warning = split_warning(0.98, 400)
    assert "400 samples" in warning and "2.0 points" in warning and "about 1568 samples" in warning
    assert split_warning(0.98, 1600) is None


def test_simplicity_orders_scope_first_then_magnitude_before_other_criteria():
    from autoprune.search.ranking import simplicity

    order = [
        {"scope": "local", "criterion": "magnitude"},
        {"scope": "local", "criterion": "synflow"},
        {"scope": "global", "criterion": "magnitude"},
        {"scope": "global", "criterion": "taylor"},
        {"scope": "per_layer", "criterion": "magnitude", "ratios": {"a": 0.2}},
        {"scope": "local", "criterion": "fpgm", "method": "gradual"},
    ]
    ranks = [simplicity(p) for p in order]
    assert ranks == sorted(ranks) and ranks[0] < ranks[1] < ranks[2] < ranks[3] < ranks[4] <= ranks[5]


@pytest.mark.parametrize("structures", [("channel", "unstructured"), ("channel",), ("unstructured",)])
def test_methods_space_samples_every_method_with_its_options_and_a_structure_it_prunes(table, structures):
    import dataclasses

    from autoprune.engine import check_policy
    from autoprune.engine.methods import METHODS

    allowed = dataclasses.replace(table, structures=structures)
    got = [Policy.from_dict(f) for _, f in _policies(SPACES.get("methods"), allowed, 150)]
    for policy in got:
        cls = METHODS.get(policy.method)
        assert policy.structure in set(cls.structures) & set(structures)
        check_policy(policy)  # the registry accepts the method, its options and the criterion
        assert set(policy.method_options) == set(cls.space)
        assert all(policy.method_options[k] in cls.space[k] for k in cls.space)
    expected = {n for n in METHODS.names() if set(METHODS.get(n).structures) & set(structures)}
    assert {p.method for p in got} == expected
    assert {p.scope for p in got} == {"global", "local"}
    assert any(p.method_options for p in got)


def test_a_space_is_described_by_what_it_can_sample(table):
    from autoprune.engine.methods import METHODS
    from autoprune.search_spaces import describe

    space = describe(get_space("methods"), table)
    allowed = set(table.structures)
    assert set(space["method"]["choices"]) == {n for n in METHODS.names() if allowed & set(METHODS.get(n).structures)}
    for name in space["method"]["choices"]:  # every method's options, under its own name
        for key, values in METHODS.get(name).space.items():
            assert space[f"{name}.{key}"] == {"choices": list(values)}, (name, key)
    default = describe(get_space("default"), table)
    ratios = {k: v for k, v in default.items() if k.startswith("ratio_channel.")}
    assert len(ratios) == len(table.units("channel")) and all(v["high"] == 0.8 for v in ratios.values())
