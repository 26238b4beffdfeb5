"""The searcher registry: every search strategy is a :class:`SearcherSpec` whose factory
returns a ``ray.tune.search.Searcher``. Optuna's samplers (tpe, nsga2, random, grid) register
here; the AMC agent's factory and :class:`SearcherHooks` live in ``autoprune.agents.searcher``
(imported when used). What a searcher hands a trial and
reads back is :mod:`autoprune.contract`; ``tests/search/test_searcher_conformance.py`` checks
every registered searcher against it, without Ray running.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from ..config import Budget
from ..contract import TRIAL_CONFIG_KEYS, TrialConfig, is_final, metric_mode, objectives
from ..errors import AutopruneError
from ..rayenv import quiet_environment
from ..registry import Registry, load_object
from .portable import PortableState

quiet_environment()
import optuna  # noqa: E402
from optuna.trial import TrialState  # noqa: E402
from ray.tune.search.optuna import OptunaSearch  # noqa: E402

optuna.logging.set_verbosity(optuna.logging.WARNING)


@dataclass(kw_only=True)
class SearcherContext:
    """What a searcher factory gets: the layer table of the model (its channel groups and
    layers with their FLOPs shares), the budget, the seed, the trial count and the metric to
    optimise; Optuna searchers also use the define-by-run space (a ``search_spaces`` name or
    ``pkg.mod:fn``) and, for ``grid``, the grid; ``extra`` is what the searcher's own
    :meth:`SearcherHooks.context` added."""

    table: Any  # autoprune.engine.graph.LayerTable
    budget: Budget
    seed: int
    trials: int
    space: str = "default"
    grid: dict[str, list] | None = None
    metric: str = "val_acc"  # what to optimise: the task's metric or val_loss (contract.metric_mode)
    fraction_floor: float = 0.0  # the smallest budget fraction the policies can reach (a latency budget's)
    extra: dict[str, Any] = field(default_factory=dict)  # SearcherHooks.context's


class SearcherHooks:
    """The steps a searcher may add to a search, each doing nothing by default. A searcher
    that needs more than a sampler (the AMC agent: its own settings, a view of the model,
    a reward its trials compute) says so here instead of in the search's code."""

    settings: str | None = None  # the SearchConfig field of its own settings; set with another searcher, refused
    report_keys: tuple[str, ...] = ()  # the keys its trial hook adds to a trial's reports (contract.SEARCHER_KEYS)

    def check(self, config: Any, structures: tuple[str, ...], trials: int) -> None:
        """Before Ray starts: raise an AutopruneError for settings it cannot search with."""

    def check_task(self, config: Any, task: Any) -> None:
        """Once the task is built, before Ray starts: raise an AutopruneError for a task it cannot search."""

    def context(self, config: Any, dense: Any, task: Any, latency: Any) -> dict[str, Any]:
        """In the driver, with the dense model: what its factory needs beyond the
        SearcherContext (``SearcherContext.extra``)."""
        return {}

    def trial_hook(self, config: Any, latency: Any) -> Callable | None:
        """A picklable callable each trial runs once its model is pruned, before fine-tuning:
        ``(model, task, cost, device) -> {key: value}`` with :attr:`report_keys`."""
        return None

    def describe(self, config: Any) -> str | None:
        """What the search's first line says of it (None: the space it samples)."""
        return None

    def summary(self, config: Any) -> dict[str, Any]:
        """Keys it adds to ``summary.json`` (fields of search.summary.SearchSummary)."""
        return {}

    def needs_latency(self, config: Any) -> bool:
        """Whether it cannot work without the hardware latency table."""
        return False


@dataclass(frozen=True)
class SearcherSpec:
    make: Callable[[SearcherContext], Any]  # -> a ray.tune.search.Searcher
    multi_objective: bool = False  # optimises contract.objectives(budget kind) and returns a Pareto front
    scheduler: str = "none"  # the default --scheduler (early stopping ranks on a short run's noise)
    needs_grid: bool = False
    summary: str = ""  # one line for `autoprune list`
    trials: int | None = None  # the default --trials (None: config.DEFAULT_TRIALS; SearchConfig.resolved)
    trials_per_group: int = 0  # the default --trials grows to this many per prunable group of the model
    epochs: int | None = None  # the default --epochs (None: config.DEFAULT_EPOCHS)
    metric: str | None = None  # the report key that picks the best trial, if the searcher decides it (else --metric)
    hooks_at: str | None = None  # "package.module:object", its SearcherHooks, imported when a search uses them
    baselines: bool = True  # its first trials are search.baselines' (uniform, global magnitude)
    # given --trials, the most trials at once that still leave it steered by results (None: no
    # cap). A model-based sampler proposes from finished trials only: with C in flight, its
    # first C + startup proposals are random. --concurrency overrides it.
    in_flight: Callable[[int], int] | None = None

    @property
    def agent(self) -> bool:
        """Whether it decides what its trials are ranked on (an agent's reward): then it has
        no space, and its own settings (``--searcher amc``)."""
        return self.metric is not None

    def default_trials(self, trials: int, groups: int) -> int:
        """Its trials when ``--trials`` is not given, for a model of ``groups`` prunable groups."""
        return max(trials, self.trials_per_group * groups)

    def hooks(self) -> SearcherHooks:
        """Its :class:`SearcherHooks` (imported now, where they live elsewhere), or the default."""
        return load_object(self.hooks_at, "searcher hooks") if self.hooks_at else _NO_HOOKS


_NO_HOOKS = SearcherHooks()


def foreign_settings(config: Any) -> str | None:
    """What is wrong when ``config`` changes the own settings of a searcher other than
    ``config.searcher`` (they would be silently ignored), naming their flags; else None."""
    from ..schema import flat_fields

    defaults = type(config)()
    for name in SEARCHERS:
        field_name = SEARCHERS.get(name).hooks().settings if name != config.searcher else None
        if not field_name:
            continue
        mine, default = flat_fields(getattr(config, field_name)), flat_fields(getattr(defaults, field_name))
        flags = [flag or key for key, (value, flag) in mine.items() if value != default[key][0]]
        if flags:
            one = len(flags) == 1
            return (
                f"{', '.join(flags)} {'is' if one else 'are'} for searcher {name!r}: use {'it' if one else 'them'} "
                f"with --searcher {name}, not {config.searcher!r}"
            )
    return None


SEARCHERS: Registry[SearcherSpec] = Registry("searcher")


def define_by_run(space_spec: str, table, budget: Budget | None, trial, floor: float = 0.0) -> dict:
    """The function OptunaSearch calls per trial: a :class:`TrialConfig` as a dict, with the
    space's policy fields (and, for the multi-objective searchers, a budget fraction up to the
    budget). A space that raises does not stop the search: the error travels to the trial,
    which fails with it."""
    from autoprune.search_spaces import get_space

    fraction = None
    try:
        if budget is not None:
            low = min(max(budget.fraction / 4, floor), budget.fraction)
            fraction = trial.suggest_float("budget_fraction", low, budget.fraction)
        policy = get_space(space_spec)(trial, table)
        if not isinstance(policy, dict):
            raise AutopruneError(f"search space {space_spec!r} returned {type(policy).__name__}, not a dict")
        return TrialConfig(policy, fraction).to_config()
    except Exception as exc:  # noqa: BLE001 - recorded as the trial's error
        return TrialConfig(budget_fraction=fraction, space_error=f"{type(exc).__name__}: {exc}").to_config()


class PolicyOptunaSearch(PortableState, OptunaSearch):
    """``OptunaSearch`` that tells the sampler the truth about trials ASHA stopped early.

    Ray's ``OptunaSearch`` completes an early-stopped trial as COMPLETE with its last,
    partial accuracy, so TPE would model a one-epoch accuracy as if it were a full run's.
    Here such a trial is told as PRUNED: Optuna keeps the per-epoch values the trial
    reported (``trial.report``), and TPE ranks pruned trials below completed ones, by
    the step they reached and then their last value. A trial is early-stopped when it
    finished without error and without its final report (``contract.is_final``). It is
    pickled with the Tuner (for ``--resume``), so it lives at module level, and pickles
    whatever sampler it wraps (:class:`PortableState`); a resume does not read that pickle
    back, but tells a new searcher the finished trials (:meth:`tell_finished`).

    A proposal that repeats one made before in the search (the same policy and budget: NSGA-II's
    crossover of like parents, a sampler's draw from a small space) would cost a trial to learn
    what is known, so the sampler is asked again, up to :data:`REPEAT_ASKS` times; the repeat is
    told to Optuna as failed, which no sampler learns from. A sampler that keeps repeating (a
    converged population, an exhausted grid) has its proposal run."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.proposed: set[str] = set()  # proposal_key of every config proposed in the search

    def suggest(self, trial_id: str):
        """The :class:`TrialConfig` the space returned, with the Optuna trial's parameters, their
        distributions and its system attributes as the searcher's data (what
        :meth:`tell_finished` reads back on a resume). Ray's ``OptunaSearch`` also copies every
        raw Optuna parameter into the config; they are all in the policy already."""
        for ask in range(REPEAT_ASKS + 1):
            config = super().suggest(trial_id)
            if not isinstance(config, dict):
                return config  # None (wait) or Searcher.FINISHED
            out = {k: v for k, v in config.items() if k in TRIAL_CONFIG_KEYS}
            key = proposal_key(out)
            if key not in self.proposed or "space_error" in out or ask == REPEAT_ASKS:
                break
            with contextlib.suppress(RuntimeError):  # an exhausted GridSampler's Study.stop(), as below
                self._ot_study.tell(self._ot_trials.pop(trial_id), state=TrialState.FAIL)
        self.proposed.add(key)
        out["searcher"] = _optuna_memo(self._ot_study, self._ot_trials[trial_id])
        return out

    def tell_finished(self, records: list[dict]) -> None:
        """Add a resumed search's finished trials (:mod:`autoprune.search.journal` records) to the
        study, as they ended: complete with their value(s), pruned (stopped by the scheduler)
        with their per-epoch values, or failed. The sampler then goes on from them."""
        metrics = self.metric if isinstance(self.metric, list) else [self.metric]
        for rec in records:
            self.proposed.add(proposal_key(rec["config"]))
            try:
                self._ot_study.add_trial(_frozen(rec, metrics, isinstance(self.metric, list)))
            except (ValueError, TypeError, KeyError, AttributeError) as exc:
                raise AutopruneError(
                    f"trial record {rec['trial_id']!r} cannot be told to the searcher ({type(exc).__name__}: {exc}); "
                    "it was altered, or the search space changed since"
                ) from None

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        stopped = (
            not error
            and result
            and not isinstance(self.metric, list)
            and not is_final(result)
            and trial_id in self._ot_trials
            and trial_id not in self._completed_trials
        )
        if not stopped:
            return super().on_trial_complete(trial_id, result=result, error=error)
        self._completed_trials.add(trial_id)
        # an exhausted GridSampler calls Study.stop() in tell, which only works inside optimize()
        with contextlib.suppress(RuntimeError):
            self._ot_study.tell(self._ot_trials[trial_id], state=TrialState.PRUNED)


# the most times a searcher asks its sampler again for a proposal that repeats one (an ask takes
# milliseconds, a trial minutes)
REPEAT_ASKS = 10


def proposal_key(config: dict[str, Any]) -> str:
    """What a trial config proposes (its policy and budget fraction, not the searcher's data),
    as one string: equal for equal proposals."""
    return json.dumps({k: v for k, v in config.items() if k != "searcher"}, sort_keys=True, default=repr)


def _optuna_memo(study, trial) -> dict[str, Any]:
    """What a resume needs to add an Optuna trial to a new study: its parameters, their
    distributions (Optuna's JSON) and its system attributes (a grid sampler's grid point,
    NSGA-II's generation), all plain JSON."""
    from optuna.distributions import distribution_to_json

    attrs = study._storage.get_trial_system_attrs(trial._trial_id)
    return {
        "params": dict(trial.params),
        "distributions": {k: distribution_to_json(d) for k, d in trial.distributions.items()},
        "system_attrs": {k: v for k, v in attrs.items() if _is_json(v)},
    }


def _is_json(value: Any) -> bool:
    try:
        json.dumps(value, allow_nan=False)
        return True
    except (TypeError, ValueError):
        return False


def _frozen(rec: dict, metrics: list[str], multi: bool):
    """The Optuna trial of a record, as it ended (see :meth:`PolicyOptunaSearch.tell_finished`)."""
    from optuna.distributions import json_to_distribution

    memo = rec["config"].get("searcher") or {}
    distributions = {k: json_to_distribution(v) for k, v in dict(memo.get("distributions", {})).items()}
    report, curve = rec["report"], rec["curve"]
    values = [report.get(m) for m in metrics]
    points = [p for p in curve if metrics[0] in p and "training_iteration" in p]
    steps = {} if multi else {int(p["training_iteration"]): p[metrics[0]] for p in points}
    state = TrialState.FAIL
    # as the live searcher tells them: a multi-objective trial stopped early is complete with its last values
    ended = ("completed", "stopped") if multi else ("completed",)
    if rec["status"] in ended and all(v is not None for v in values):
        state = TrialState.COMPLETE
    elif rec["status"] == "stopped" and not multi:
        state = TrialState.PRUNED
    if state == TrialState.COMPLETE:
        value = {"values": values} if multi else {"value": values[0]}
    elif state == TrialState.PRUNED and steps:
        value = {"value": steps[max(steps)]}
    else:
        value = {}
    return optuna.trial.create_trial(
        state=state,
        params=dict(memo.get("params", {})),
        distributions=distributions,
        system_attrs=dict(memo.get("system_attrs", {})),
        intermediate_values=steps or None,
        **value,
    )


def _optuna(ctx: SearcherContext, sampler, multi_objective: bool = False) -> Any:
    budget = ctx.budget if multi_objective else None
    if multi_objective:
        goals = objectives(ctx.budget.kind, ctx.metric)
        metric, mode = [m for m, _ in goals], [d for _, d in goals]
    else:
        metric, mode = ctx.metric, metric_mode(ctx.metric)
    space = partial(define_by_run, ctx.space, ctx.table, budget, floor=ctx.fraction_floor)
    return PolicyOptunaSearch(space=space, metric=metric, mode=mode, sampler=sampler)


def _tpe_startup(trials: int) -> int:
    return min(10, max(2, trials // 3))  # random trials before TPE models the results


def _nsga2_population(trials: int) -> int:
    return max(4, min(50, trials // 3))


def _tpe(ctx: SearcherContext):
    startup = _tpe_startup(ctx.trials)
    return _optuna(ctx, optuna.samplers.TPESampler(seed=ctx.seed, n_startup_trials=startup, constant_liar=True))


def _nsga2(ctx: SearcherContext):
    population = _nsga2_population(ctx.trials)
    return _optuna(ctx, optuna.samplers.NSGAIISampler(seed=ctx.seed, population_size=population), True)


def _random(ctx: SearcherContext):
    return _optuna(ctx, optuna.samplers.RandomSampler(seed=ctx.seed))


def _grid(ctx: SearcherContext):
    if ctx.grid is None:
        raise AutopruneError("searcher 'grid' needs a space with a grid (such as 'criteria')")
    return _optuna(ctx, optuna.samplers.GridSampler(ctx.grid, seed=ctx.seed))


SEARCHERS.register("tpe")(
    SearcherSpec(
        _tpe,
        summary="Optuna TPE, constant liar (default)",
        in_flight=lambda trials: max(2, trials // 4),
    )
)
SEARCHERS.register("nsga2")(
    SearcherSpec(
        _nsga2,
        multi_objective=True,
        scheduler="none",
        summary="Optuna NSGA-II: accuracy, cost, latency",
        in_flight=lambda trials: max(1, _nsga2_population(trials) // 2),
    )
)
SEARCHERS.register("random")(SearcherSpec(_random, summary="Optuna random sampling"))
SEARCHERS.register("grid")(
    SearcherSpec(_grid, scheduler="none", needs_grid=True, summary="Optuna grid over a space's grid")
)


def _amc(ctx: SearcherContext):
    from autoprune.agents.searcher import make_amc

    return make_amc(ctx)


SEARCHERS.register("amc")(
    SearcherSpec(
        _amc,
        scheduler="none",
        trials=40,
        trials_per_group=25,  # AMC's agent acts once per group: longer episodes need more of them to learn
        epochs=0,
        metric="reward",
        hooks_at="autoprune.agents.searcher:AMC_HOOKS",
        baselines=False,  # its episodes are ranked on their reward, which a baseline trial has not
        summary="AMC: a DDPG agent allocates channels per group",
    )
)
