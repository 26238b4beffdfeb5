"""Define-by-run search spaces, registered by name (installed as ``autoprune.search_spaces``).

A space is a function ``space(trial, table) -> dict``: it asks the Optuna ``trial`` for
values (``trial.suggest_categorical``, ``suggest_float``, ...) and returns the fields of a
:class:`autoprune.Policy` it wants to set; the rest keep their defaults. ``table`` is the
:class:`LayerTable` of the model being pruned (channel groups and weight layers), so a
space can give every group its own ratio. Every sampled policy then goes through the
budget solver, so all trials meet the budget and compete on accuracy at equal cost.

A space may carry a ``grid`` attribute, ``grid(table) -> {parameter: [choices]}``, for the
``grid`` searcher, and a ``structure`` attribute when it always samples one structure.
``table.structures`` says which structures the search allows (``--structure``). A user
space is ``package.module:function`` with the same signature.

Parameter names must differ between branches whose choices differ (Optuna fixes a
parameter's distribution on first use), hence ``criterion_channel`` beside
``criterion_unstructured``.

The fine-tuning recipe (learning rate, schedule) is the search's, not the policy's: the
built-in spaces leave it to ``--lr`` and the other fine-tuning flags, so trials differ in how
they prune, not in how they train (a learning rate sampled per trial lets the search pick
the trial that trained best over the one that pruned best). A space may still search it:
return ``"finetune": {"lr": trial.suggest_float("lr", 1e-3, 0.1, log=True)}``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from autoprune.errors import AutopruneError
from autoprune.registry import Registry, load_object

if TYPE_CHECKING:
    from autoprune.engine.layers import LayerTable

Space = Callable[[Any, "LayerTable"], dict]
SPACES: Registry[Space] = Registry("search space")

ROUND_TO_CHOICES = (1, 8, 16, "auto")  # the default space's round_to (4 rarely differs from 1 or 8)
RATIO_RANGE = (0.0, 0.8)  # per-group pruned fraction before the solver scales it to the budget


def criteria_for(structure: str, data: bool | None = None) -> list[str]:
    """Registered criteria that support ``structure`` (only data-dependent or data-free ones
    when ``data`` is given)."""
    from autoprune.engine.criteria import CRITERIA

    names = []
    for name in CRITERIA.names():
        cls = CRITERIA.get(name)
        if structure in cls.structures and (data is None or cls.needs_data == data):
            names.append(name)
    return names


def get_space(spec: str) -> Space:
    """A registered space by name, or a user space as ``package.module:function``."""
    if ":" in spec:
        space = load_object(spec, "search space")
        if not callable(space):
            raise AutopruneError(f"search space {spec!r} is not callable")
        return space
    return SPACES.get(spec)


def _ratios(trial, table: LayerTable, structure: str) -> dict[str, float]:
    tag = "channel" if structure == "channel" else "mask"
    lo, hi = RATIO_RANGE
    return {name: trial.suggest_float(f"ratio_{tag}.{name}", lo, hi) for name in table.units(structure)}


@SPACES.register("default")
def default(trial, table: LayerTable) -> dict:
    """Structure (those the search allows), criterion (every one that supports the
    structure), scope, a per-group allocation when the scope is per_layer, BN warm-up and,
    for channels, the multiple kept widths are rounded to (``round_to``: any width, 8, 16,
    or the one the latency table finds fastest)."""
    structure = trial.suggest_categorical("structure", list(table.structures))
    policy: dict[str, Any] = {
        "structure": structure,
        "criterion": trial.suggest_categorical(f"criterion_{structure}", criteria_for(structure)),
        "scope": trial.suggest_categorical("scope", ["global", "local", "per_layer"]),
        "bn_warmup": trial.suggest_categorical("bn_warmup", [True, False]),
    }
    if structure == "channel":
        policy["round_to"] = trial.suggest_categorical("round_to", list(ROUND_TO_CHOICES))
    if policy["scope"] == "per_layer":
        policy["ratios"] = _ratios(trial, table, structure)
    return policy


def _criteria_grid(table: LayerTable) -> dict[str, list]:
    return {"criterion": criteria_for("channel"), "scope": ["global", "local"]}


@SPACES.register("criteria")
def criteria(trial, table: LayerTable) -> dict:
    """Criterion x scope for channel pruning, everything else fixed: a fair comparison
    (pair it with ``--searcher grid`` to run every cell once)."""
    grid = _criteria_grid(table)
    return {name: trial.suggest_categorical(name, choices) for name, choices in grid.items()}


criteria.grid = _criteria_grid
criteria.structure = "channel"  # a space that fixes the structure says so (checked against --structure)


@SPACES.register("pai")
def pai(trial, table: LayerTable) -> dict:
    """Pruning at initialisation (method ``init``, weight masks): the data-dependent
    criteria (snip, grasp, ...) against the data-free ones (synflow, magnitude, random),
    global or local, with or without BN warm-up."""
    return {
        "method": "init",
        "structure": "unstructured",
        "criterion": trial.suggest_categorical("criterion", criteria_for("unstructured")),
        "scope": trial.suggest_categorical("scope", ["global", "local"]),
        "bn_warmup": trial.suggest_categorical("bn_warmup", [True, False]),
    }


pai.structure = "unstructured"


@SPACES.register("methods")
def methods(trial, table: LayerTable) -> dict:
    """Method (every registered one that prunes a structure the search allows), with its
    options, x structure x criterion x scope: the survey's families compared under one
    budget."""
    from autoprune.engine.methods import METHODS

    names = [n for n in METHODS.names() if set(METHODS.get(n).structures) & set(table.structures)]
    method = trial.suggest_categorical("method", names)
    cls = METHODS.get(method)
    structures = [s for s in table.structures if s in cls.structures]
    structure = structures[0] if len(structures) == 1 else trial.suggest_categorical(f"structure.{method}", structures)
    return {
        "method": method,
        "structure": structure,
        "criterion": trial.suggest_categorical(f"criterion_{structure}", criteria_for(structure)),
        "scope": trial.suggest_categorical("scope", ["global", "local"]),
        "method_options": {
            key: trial.suggest_categorical(f"{method}.{key}", list(values)) for key, values in cls.space.items()
        },
    }


def describe(space: Space, table: LayerTable, asks: int = 64) -> dict[str, dict[str, Any]]:
    """What a define-by-run ``space`` can sample for ``table``, parameter by parameter (its
    choices, or its range and scale), found by asking it ``asks`` times through a real
    Optuna study with random sampling (a branch rarer than that may be missed). For the
    search run's ``search_space.json``: the space as a person reads it."""
    import optuna
    from optuna.distributions import CategoricalDistribution

    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # not a study of the user's: no "created" line
    try:
        study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
        found: dict[str, Any] = {}
        for _ in range(asks):
            trial = study.ask()
            try:
                space(trial, table)
            except Exception:  # noqa: BLE001 - a space may refuse some draws; the rest describe it
                pass
            found.update(trial.distributions)
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
    finally:
        optuna.logging.set_verbosity(verbosity)
    out: dict[str, dict[str, Any]] = {}
    for name in sorted(found):
        d = found[name]
        if isinstance(d, CategoricalDistribution):
            out[name] = {"choices": list(d.choices)}
        else:
            out[name] = {"low": d.low, "high": d.high, "log": d.log, "step": d.step}
    return out
