"""The command line, built from the config dataclasses: each field whose :class:`~autoprune.schema.Spec`
names a flag becomes that flag (its type, choices and help from the Spec), and
:func:`apply_flags` sets exactly the fields whose flags were typed. What is here besides is
really the command line's own: the commands, positional arguments, the policy file, the
budget flags (one flag sets the budget's kind and fraction) and the progress bars' tty check.
The dataclasses check every value (``autoprune.schema``); nothing here reads data or trains."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from functools import partial
from typing import Any

from .config import (
    BUDGET_KINDS,
    AgentConfig,
    Budget,
    EngineConfig,
    FinetuneConfig,
    MeasureConfig,
    Policy,
    SearchConfig,
    TaskConfig,
)
from .schema import MAX_STEPS, integer

GIVEN = "flags_given"  # the namespace's set of the dests of the flags typed


def flag_dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def given(args: argparse.Namespace) -> set[str]:
    """The dests of the flags typed on the command line."""
    return getattr(args, GIVEN, set())


def _mark(namespace: argparse.Namespace, dest: str) -> None:
    setattr(namespace, GIVEN, given(namespace) | {dest})


class _Store(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        _mark(namespace, self.dest)


class _Append(argparse.Action):
    """A repeatable flag: the values typed, as a list (the default is not added to)."""

    def __call__(self, parser, namespace, values, option_string=None):
        before = getattr(namespace, self.dest) if self.dest in given(namespace) else []
        setattr(namespace, self.dest, [*before, values])
        _mark(namespace, self.dest)


class _Switch(argparse.BooleanOptionalAction):
    def __call__(self, parser, namespace, values, option_string=None):
        super().__call__(parser, namespace, values, option_string)
        _mark(namespace, self.dest)


def _flagged(cls: type):
    """(field, spec) of each field of ``cls`` that one flag sets."""
    for f in dataclasses.fields(cls):
        spec = f.metadata.get("spec")
        if spec is not None and spec.flag and "/" not in spec.flag:
            yield f, spec


def _as_choice(choices: tuple, typed: str):
    """The choice whose text is ``typed`` (``"8"`` -> 8 where the choices hold numbers)."""
    return next((c for c in choices if str(c) == typed), typed)


def add_flags(group, cls: type, only: tuple[str, ...] = (), skip: tuple[str, ...] = ()) -> None:
    """An option in ``group`` for each field of ``cls`` with a flag (not its nested configs'),
    defaulting to the field's default; ``--x/--no-x`` for booleans. A flag the parser
    already has (the same setting in two configs) is not added twice."""
    defaults = cls()
    for f, spec in _flagged(cls):
        if (only and f.name not in only) or f.name in skip:
            continue
        kw: dict[str, Any] = {"dest": flag_dest(spec.flag), "default": getattr(defaults, f.name), "help": spec.help}
        if spec.metavar:
            kw["metavar"] = spec.metavar
        if spec.kind == "boolean":
            kw["action"] = _Switch
        else:
            kw["action"] = _Append if spec.repeat else _Store
            if spec.kind == "choice":
                kw["choices"] = spec.choices
                kw["type"] = partial(_as_choice, spec.choices)
            elif spec.parse is None:
                kw["type"] = {"integer": int, "number": float}.get(spec.kind, str)
        try:
            group.add_argument(spec.flag, *spec.aliases, **kw)
        except argparse.ArgumentError:  # already there: one flag sets both fields
            continue


def flag_values(cls: type, args: argparse.Namespace) -> dict[str, Any]:
    """The fields of ``cls`` (not nested) whose flags were typed, each read by its Spec."""
    out = {}
    for f, spec in _flagged(cls):
        dest = flag_dest(spec.flag)
        if dest in given(args):
            raw = getattr(args, dest)
            out[f.name] = spec.parse(raw, spec.flag) if spec.parse else raw
    return out


def apply_flags(base: Any, args: argparse.Namespace) -> Any:
    """``base`` (the defaults, a policy file, a resumed search's settings) with the fields
    whose flags were typed, nested configs included; flags not typed change nothing."""
    changes = flag_values(type(base), args)
    for f in dataclasses.fields(base):
        value = getattr(base, f.name)
        if f.name not in changes and dataclasses.is_dataclass(value):
            if (new := apply_flags(value, args)) is not value:
                changes[f.name] = new
    return dataclasses.replace(base, **changes) if changes else base


# ------------------------------------------------------------------ the parser

BUDGET_HELP = {
    "flops": "keep at most this fraction of the FLOPs",
    "params": "keep at most this fraction of the parameters",
    "latency": "keep at most this fraction of the dense latency on this hardware at --latency-batch, as the "
    "latency table predicts it (channel pruning only)",
}
RESOURCES = ("concurrency", "max_failures", "node_wait", "cpus_per_trial", "gpus_per_trial", "address", "storage")
RESOURCES += ("resume", "tracking_uri", "out", "progress")  # SearchConfig fields listed under "resources"


def _add_task_flags(p: argparse.ArgumentParser) -> None:
    add_flags(p.add_argument_group("task"), TaskConfig)


def _add_engine_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("dense model and run")
    add_flags(g, EngineConfig)
    add_flags(g, MeasureConfig, skip=("latency_batch",))


def _add_budget_flags(p: argparse.ArgumentParser) -> None:
    b = p.add_argument_group("budget (fraction of the dense cost to keep)")
    x = b.add_mutually_exclusive_group()
    default = Budget()
    for kind in BUDGET_KINDS:
        at = default.fraction if kind == default.kind else None
        help = BUDGET_HELP[kind] + (" (default %(default)s)" if at is not None else "")
        x.add_argument(f"--budget-{kind}", action=_Store, type=float, default=at, help=help)
    add_flags(b, MeasureConfig, only=("latency_batch",))


def _add_policy_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("policy (flags override --policy)")
    g.add_argument("--policy", default=None, help="a policy JSON file (as written to DIR/policy.json)")
    add_flags(g, Policy)
    g.add_argument("--iterations", action=_Store, type=int, default=None, metavar="K", help=ITERATIONS.help)
    add_flags(g, FinetuneConfig)
    _add_budget_flags(p)


def _add_search_flags(p: argparse.ArgumentParser) -> None:
    add_flags(p.add_argument_group("search"), SearchConfig, skip=RESOURCES)
    agent = p.add_argument_group("the AMC agent (--searcher amc; --trials/--episodes counts its episodes)")
    add_flags(agent, AgentConfig)
    add_flags(p.add_argument_group("resources and storage"), SearchConfig, only=RESOURCES)


# a shorthand for the most common method option (--method-option iterations=K)
ITERATIONS = integer(
    1,
    most=MAX_STEPS,
    flag="--iterations",
    help="iterative: prune/fine-tune rounds (default 3); gradual: pruning steps (default 10); "
    "the same as --method-option iterations=K",
)


class _Parser(argparse.ArgumentParser):
    """argparse, with errors as one line like the rest of the CLI (not the whole usage)."""

    def error(self, message: str):
        self.exit(2, f"autoprune: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="autoprune",
        description="Search for and apply neural-network pruning policies under an exact budget.",
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"autoprune {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("prune", help="prune a model by one policy to a budget, fine-tune, measure")
    _add_task_flags(p)
    _add_engine_flags(p)
    _add_policy_flags(p)
    p.add_argument("--out", default="autoprune-out", help="output directory, new or empty (default autoprune-out)")
    p.add_argument("--overwrite", action="store_true", help="write into --out even if it holds earlier results")

    s = sub.add_parser("search", help="search pruning policies on Ray Tune; every trial logged to MLflow")
    _add_task_flags(s)
    _add_engine_flags(s)
    _add_budget_flags(s)
    _add_search_flags(s)

    u = sub.add_parser("ui", help="the MLflow UI for the search runs, on 127.0.0.1")
    u.add_argument("--port", type=int, default=5000, help="port (default 5000)")
    u.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    u.add_argument("--tracking-uri", default=None, help="the MLflow store (default sqlite:///<cwd>/mlflow.db)")

    e = sub.add_parser("evaluate", help="reload a saved pruned model and measure it")
    e.add_argument("model_path", help="DIR/model.pt written by prune or search")
    _add_task_flags(e)
    e.add_argument("--device", default=None)
    e.add_argument("--threads", type=int, default=None)
    add_flags(e, MeasureConfig, only=("runtime",))
    e.add_argument("--json", action="store_true", help="print the metrics as JSON")

    x = sub.add_parser("export", help="export a saved pruned model for deployment")
    x.add_argument("model_path")
    x.add_argument("--format", choices=("pt2", "onnx"), default="pt2", help="pt2 (torch.export) or onnx")
    x.add_argument("--out", default=None, help="output file, new (default: beside the model)")
    x.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    _add_task_flags(x)

    ls = sub.add_parser("list", help="name what exists")
    ls.add_argument(
        "what", choices=("criteria", "structures", "scopes", "methods", "tasks", "groups", "searchers", "spaces")
    )
    _add_task_flags(ls)
    return parser


# ------------------------------------------------------------------ flags -> configs


def task_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The task fields the user named on the command line."""
    return flag_values(TaskConfig, args)


def task_config(args: argparse.Namespace, base: TaskConfig | None = None) -> TaskConfig:
    return apply_flags(base or TaskConfig(), args)


def policy_from_args(args: argparse.Namespace) -> Policy:
    """The policy file's (or the default) policy with the policy flags typed. Criterion and
    method options typed add to the file's, which are dropped when ``--criterion`` (or
    ``--method``) names another one; ``--iterations K`` is ``--method-option iterations=K``."""
    base = Policy.from_json(args.policy) if args.policy else Policy()
    policy = apply_flags(base, args)
    typed = given(args)
    criterion = {
        **(base.criterion_options if policy.criterion == base.criterion else {}),
        **(policy.criterion_options if "criterion_option" in typed else {}),
    }
    method = {
        **(base.method_options if policy.method == base.method else {}),
        **(policy.method_options if "method_option" in typed else {}),
    }
    if "iterations" in typed:
        method["iterations"] = ITERATIONS.check(args.iterations, "--iterations")
    return dataclasses.replace(policy, criterion_options=criterion, method_options=method)


def budget_from_args(args: argparse.Namespace, base: Budget | None = None) -> Budget:
    for kind in BUDGET_KINDS:
        if f"budget_{kind}" in given(args):
            return Budget(kind, getattr(args, f"budget_{kind}"))
    return base or Budget()


def engine_config(args: argparse.Namespace, base: EngineConfig | None = None) -> EngineConfig:
    """The engine's settings: ``base`` (the defaults, or a resumed search's) with the flags
    given; progress bars are this run's (on unless --no-progress, and only on a tty)."""
    cfg = apply_flags(dataclasses.replace(base or EngineConfig(), progress=True), args)
    return dataclasses.replace(cfg, progress=cfg.progress and sys.stderr.isatty())


def search_config(args: argparse.Namespace, base: SearchConfig | None = None) -> SearchConfig:
    """``base`` (the defaults, or the saved settings of the search to resume) with the flags
    given; the progress line and --resume are this run's, never the saved ones."""
    base = dataclasses.replace(base or SearchConfig(), progress=True, resume=False)
    cfg = apply_flags(base, args)
    return dataclasses.replace(cfg, budget=budget_from_args(args, base.budget), engine=engine_config(args, base.engine))
