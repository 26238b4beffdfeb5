"""Adding a setting is one field: the command line is built from the config dataclasses, so
every field that names a flag is in the parser with its help and its default, and a flag
not typed never overrides a default (or a resumed search's saved value)."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass

import pytest

from autoprune.config import Budget, EngineConfig, Policy, SearchConfig
from autoprune.flags import add_flags, apply_flags, build_parser, policy_from_args, search_config
from autoprune.schema import boolean, checked, integer, key_values, mapping, nested


def _commands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


def _flagged(obj, path=""):
    """(path, spec, default) of every field with a flag, nested configs included."""
    for f in dataclasses.fields(obj):
        spec, value = f.metadata.get("spec"), getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            yield from _flagged(value, f"{path}{f.name}.")
        elif spec is not None and spec.flag:
            yield f"{path}{f.name}", spec, value


# which command sets which configs (each with its nested ones)
COMMANDS = {"prune": (Policy(), EngineConfig(), Budget()), "search": (SearchConfig(),)}
FIELDS = [(command, *row) for command, configs in COMMANDS.items() for cfg in configs for row in _flagged(cfg)]


@pytest.mark.parametrize("command, path, spec, default", FIELDS, ids=[f"{c}-{p}" for c, p, _, _ in FIELDS])
def test_every_flagged_field_is_in_the_parser_with_its_help_and_default(command, path, spec, default):
    parser = _commands()[command]
    options = {s: a for a in parser._actions for s in a.option_strings}
    if "/" in spec.flag:  # the budget: one flag per kind sets kind and fraction
        for flag in spec.flag.split("/"):
            assert flag in options, flag
        assert options[f"--budget-{Budget().kind}"].default == default
        return
    action = options.get(spec.flag)
    assert action is not None, f"{path}: {spec.flag} is not a flag of `autoprune {command}`"
    assert spec.help, f"{path}: {spec.flag} has no help"
    assert action.help == spec.help
    assert action.default == default
    for alias in spec.aliases:
        assert options[alias] is action
    if spec.kind == "boolean":
        assert f"--no-{spec.flag[2:]}" in options
    if spec.kind == "choice":
        assert tuple(action.choices) == spec.choices
    if "%(default)" in spec.help:  # the rendered help names the field's default
        rendered = parser._get_formatter()._expand_help(action)
        assert f"{default:g}" in rendered if isinstance(default, float) else str(default) in rendered


def test_help_renders_for_every_command():
    for parser in _commands().values():
        assert parser.format_help()


def test_flags_not_typed_keep_the_base():
    parser = build_parser()
    saved = dataclasses.replace(SearchConfig(trials=7, epochs=1), storage="/tmp/s")
    got = search_config(parser.parse_args(["search", "--seed", "4"]), saved)
    assert (got.trials, got.epochs, got.storage, got.engine.seed) == (7, 1, "/tmp/s", 4)
    assert got.budget == saved.budget and got.agent == saved.agent
    got = search_config(parser.parse_args(["search", "--episodes", "9", "--agent-option", "tau=0.5"]), saved)
    assert (got.trials, got.agent.options) == (9, {"tau": 0.5})


def test_policy_flags_override_the_file_and_criterion_options_merge(tmp_path):
    Policy(criterion="taylor", criterion_options={"a": 1}, keep=["fc*"]).to_json(tmp_path / "p.json")
    parser = build_parser()
    args = parser.parse_args(["prune", "--policy", str(tmp_path / "p.json"), "--criterion-option", "b=2"])
    got = policy_from_args(args)
    assert (got.criterion, got.criterion_options, got.keep) == ("taylor", {"a": 1, "b": 2}, ["fc*"])
    args = parser.parse_args(["prune", "--policy", str(tmp_path / "p.json"), "--criterion", "magnitude"])
    assert policy_from_args(args).criterion_options == {}  # the file's options were taylor's
    args = parser.parse_args(["prune", "--keep-types", "conv,linear", "--no-bn-warmup", "--keep", "a", "--keep", "b"])
    got = policy_from_args(args)
    assert (got.keep_types, got.bn_warmup, got.keep) == (["conv", "linear"], False, ["a", "b"])


def test_method_options_merge_like_criterion_options_and_iterations_is_their_shorthand(tmp_path):
    Policy(method="gradual", method_options={"iterations": 4}).to_json(tmp_path / "p.json")
    parser = build_parser()
    file = ["prune", "--policy", str(tmp_path / "p.json")]
    assert policy_from_args(parser.parse_args(file)).method_options == {"iterations": 4}
    shorthand = policy_from_args(parser.parse_args([*file, "--iterations", "7"]))
    spelled = policy_from_args(parser.parse_args([*file, "--method-option", "iterations=7"]))
    assert shorthand == spelled and shorthand.method_options == {"iterations": 7}
    other = policy_from_args(parser.parse_args([*file, "--method", "iterative"]))
    assert (other.method, other.method_options) == ("iterative", {})  # the file's options were gradual's


def test_a_policy_recorded_with_a_top_level_iterations_reads_as_the_method_option():
    """Model files and policy files written before method_options existed."""
    old = {**Policy(method="iterative").to_dict(), "iterations": 5}
    del old["method_options"]
    assert Policy.from_dict(old).method_options == {"iterations": 5}
    assert Policy.from_dict({**old, "iterations": None}).method_options == {}


@dataclass
class _Inner:
    depth: int = checked(integer(1, flag="--depth", help="depth (default %(default)s)"), 3)


@dataclass
class _Toy:
    width: int = checked(integer(1, flag="--width", help="width (default %(default)s)"), 8)
    fast: bool = checked(boolean(flag="--fast", help="go fast"), False)
    extra: dict = checked(mapping(flag="--extra", repeat=True, parse=key_values, metavar="KEY=VALUE"), factory=dict)
    inner: _Inner = checked(nested(_Inner), factory=_Inner)


def test_a_new_field_is_a_new_flag():
    parser = argparse.ArgumentParser()
    add_flags(parser, _Toy)
    add_flags(parser, _Inner)
    assert apply_flags(_Toy(), parser.parse_args([])) == _Toy()
    got = apply_flags(_Toy(), parser.parse_args(["--width", "2", "--fast", "--extra", "k=1", "--depth", "5"]))
    assert got == _Toy(width=2, fast=True, extra={"k": 1}, inner=_Inner(5))
    assert apply_flags(_Toy(width=4), parser.parse_args(["--depth", "5"])).width == 4
