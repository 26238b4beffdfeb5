"""The method interface, the method registry and the helpers several methods share.

A method decides when pruning happens and how the network recovers (docs/src/design/pruning.md, "Methods"):
it takes the dense model through a :class:`~.context.MethodContext` and returns a
:class:`~autoprune.engine.Pruned` model that meets the budget and has been trained;
:func:`autoprune.engine.run` measures it. Each method is one module of this package: a
:class:`Method` subclass with a ``name``, a one-line ``summary``, its ``options`` and
``run(ctx)``, registered with :func:`register`. What it adds to training (a schedule, masks
held at zero, a penalty, regrowth) is a :class:`~autoprune.engine.hooks.TrainHook`.
"""

from __future__ import annotations

from typing import Any, ClassVar

from ...config import Policy
from ...errors import AutopruneError
from ...registry import Registry
from ...schema import Spec
from ..criteria import CRITERIA
from ..graph import PrunableGraph, clone
from ..solver import max_pruned
from ..stages import Pruned
from .context import MethodContext


class Method:
    """Base class. Subclasses set ``name`` and ``summary`` and implement :meth:`run`.

    ``options``: the method's settings, each declared as a :class:`~autoprune.schema.Spec`
    with its default in ``defaults``; a policy sets them in ``Policy.method_options`` (the
    command line: ``--method-option KEY=VALUE``) and :meth:`settings` reads them, unset
    meaning the default. ``in_steps``: the method prunes in several steps (a policy with
    ``exact`` ratios, pruned once as given, refuses it). ``structures``: the structures it
    prunes (a policy with another is refused). ``family``: the survey's family it belongs to
    (``autoprune list methods`` shows it). ``space``: the values of each option the
    ``methods`` search space chooses from (an option left out keeps its default there)."""

    name: ClassVar[str]
    summary: ClassVar[str]
    family: ClassVar[str] = "train-prune-fine-tune"
    structures: ClassVar[tuple[str, ...]] = ("channel", "unstructured")
    options: ClassVar[dict[str, Spec]] = {}
    defaults: ClassVar[dict[str, Any]] = {}
    space: ClassVar[dict[str, list]] = {}
    in_steps: ClassVar[bool] = False

    def settings(self, policy: Policy) -> dict[str, Any]:
        """The method's options for ``policy`` (its ``method_options`` over the defaults),
        checked against their specs; an option the method does not have is an error."""
        given = policy.method_options
        unknown = sorted(set(given) - set(self.options))
        if unknown:
            has = ", ".join(self.options) or "none"
            raise AutopruneError(
                f"method {self.name!r} has no option {', '.join(map(repr, unknown))}; its options: {has} "
                "(see `autoprune list methods`)"
            )
        out = {}
        for key, spec in self.options.items():
            value = given.get(key)
            if value is None:
                value = self.defaults.get(key)
            out[key] = spec.check(value, f"method {self.name!r} option {key}")
        return out

    def run(self, ctx: MethodContext) -> Pruned:
        raise NotImplementedError


METHODS: Registry[type[Method]] = Registry("method")


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: register a method under its ``name``."""
    return METHODS.register(cls.name)(cls)


def make_method(method: str | Method) -> Method:
    """A method by registered name (an instance is returned as it is)."""
    return method if isinstance(method, Method) else METHODS.get(method)()


def check_policy(policy: Policy) -> None:
    """The registry names and options of a policy: its criterion (with its options and the
    structures it supports) and its method. ``Policy`` itself is plain data and checks only
    its own fields; every path that runs a policy calls this first."""
    criterion = CRITERIA.get(policy.criterion)
    criterion(**policy.criterion_options)  # checks the option names and values
    method = make_method(policy.method)
    method.settings(policy)
    if policy.structure not in method.structures:
        raise AutopruneError(
            f"method {policy.method!r} prunes structure(s) {', '.join(method.structures)}, not {policy.structure!r}"
        )
    if policy.structure not in criterion.structures:
        raise AutopruneError(
            f"criterion {policy.criterion!r} supports structure(s) {', '.join(criterion.structures)}, "
            f"not {policy.structure!r}"
        )


# ------------------------------------------------------------------ shared by several methods


def prune_then_train(run: MethodContext, start, recipe, phase: str, desc: str) -> Pruned:
    """Warm up a copy of ``start``, prune it to the budget once, then train it by ``recipe``."""
    work = clone(start)
    run.warm_up(work)
    pruned = run.prune(work, run.budget)
    run.log(0, phase, run.budget.fraction, pruned.model)
    run.pruned(pruned)
    pruned.epochs = run.train(pruned.model, recipe, desc)
    return run.finish(pruned)


def pruned_at_once(run: MethodContext) -> Pruned:
    """A method that trains while it prunes, without fine-tuning epochs: prune to the budget at once."""
    return prune_then_train(run, run.dense, run.policy.finetune, "no fine-tuning: pruned at once", "fine-tune")


def floors(model, task, policy: Policy) -> dict[str, int]:
    """Channels each group must keep so that max_ratio holds against the dense widths."""
    graph = PrunableGraph(clone(model), task.example_input().to(next(model.parameters()).device), embedding=True)
    return {g.name: g.size - max_pruned(g.size, policy.max_ratio) for g in graph.groups}


def split(epochs: int, rounds: int) -> list[int]:
    """``epochs`` shared out over ``rounds``, the last round taking the remainder."""
    base = epochs // rounds
    return [base] * (rounds - 1) + [epochs - base * (rounds - 1)]
