"""Every number a user can set is bounded where it is declared: each integer and number Spec
of the configs, the method and criterion options and the AMC agent's settings names an upper
bound, and a value past it (or past int64, or not finite) on the command line is one line,
exit 2, before any work."""

from __future__ import annotations

import dataclasses

import pytest

from autoprune.agents.ddpg import DDPGConfig
from autoprune.config import Budget, EngineConfig, Policy, SearchConfig
from autoprune.engine.criteria import CRITERIA
from autoprune.engine.methods import METHODS
from autoprune.flags import ITERATIONS
from autoprune.schema import Spec


def _specs(cls: type, path: str):
    """(path, spec) of every field of the dataclass ``cls``, nested configs and the items of
    mappings and sequences included."""
    for f in dataclasses.fields(cls):
        spec = f.metadata.get("spec")
        if spec is None:
            continue
        if spec.kind == "nested":
            yield from _specs(spec.nested, f"{path}.{f.name}")
            continue
        yield f"{path}.{f.name}", spec
        if spec.item is not None:
            yield f"{path}.{f.name}[]", spec.item


def _every_spec() -> list[tuple[str, Spec]]:
    rows = [row for cls in (Policy, Budget, SearchConfig, DDPGConfig) for row in _specs(cls, cls.__name__)]
    rows += [(f"method {m}.{k}", s) for m in METHODS.names() for k, s in METHODS.get(m).options.items()]
    rows += [(f"criterion {c}.{k}", s) for c in CRITERIA.names() for k, s in CRITERIA.get(c).options.items()]
    return [*rows, ("--iterations", ITERATIONS)]


NUMBERS = [(path, spec) for path, spec in _every_spec() if spec.kind in ("integer", "number")]


def test_the_walk_finds_the_numbers():
    paths = {path for path, _ in NUMBERS}
    assert {"SearchConfig.engine.seed", "Policy.finetune.lr", "DDPGConfig.actor_lr", "--iterations"} <= paths
    assert "criterion hutchinson.probes" in paths and "method gradual.iterations" in paths


@pytest.mark.parametrize("path, spec", NUMBERS, ids=[p for p, _ in NUMBERS])
def test_every_number_declares_its_upper_bound(path, spec):
    top = spec.most if spec.most is not None else spec.high
    assert top is not None, f"{path} has no upper bound"
    if spec.most is not None or not spec.high_open:
        assert spec.check(top, path) == top  # the bound itself is allowed
    if spec.kind == "integer":
        assert top <= 2**63 - 1


def _flags(cfg, command: str):
    for f in dataclasses.fields(cfg):
        spec, value = f.metadata.get("spec"), getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            yield from _flags(value, command)
        elif spec is not None and spec.flag and "/" not in spec.flag and spec.kind in ("integer", "number"):
            yield command, spec


FLAGS = [row for cfg in (Policy(), EngineConfig()) for row in _flags(cfg, "prune")]
FLAGS += [row for row in _flags(SearchConfig(), "search") if row[1].flag not in {s.flag for _, s in FLAGS}]
FLAGS += [("prune", ITERATIONS)]


@pytest.mark.parametrize("command, spec", FLAGS, ids=[f"{c}{s.flag}" for c, s in FLAGS])
@pytest.mark.parametrize("value", ["18446744073709551616", "1e400", "nan"])
def test_a_number_past_its_bound_is_one_line_before_any_work(cli_here, tmp_path, command, spec, value):
    """(argparse reads an integer flag as an integer: 'nan' and '1e400' are its refusal.)"""
    argv = [command, spec.flag, value]
    argv += ["--out", str(tmp_path / "o")] if command == "prune" else ["--storage", str(tmp_path / "st")]
    proc = cli_here(*argv, cwd=tmp_path, env={"AUTOPRUNE_CACHE": str(tmp_path / "cache")})
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("autoprune: error: ") and spec.flag in lines[0], proc.stderr
    assert not any(tmp_path.iterdir()), sorted(tmp_path.iterdir())


@pytest.mark.parametrize("name", ["AUTOPRUNE_GRAPH_SECONDS", "AUTOPRUNE_GRAPH_MEMORY_GB"])
@pytest.mark.parametrize("value", ["abc", "-1", "inf", "1e400"])
def test_a_bad_autoprune_variable_is_one_line_naming_it(cli_here, tmp_path, name, value):
    env = {name: value, "AUTOPRUNE_CACHE": str(tmp_path / "cache")}
    proc = cli_here("prune", "--out", str(tmp_path / "o"), cwd=tmp_path, env=env)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and f"${name} must be a number >= 0, at most 1000000" in lines[0], proc.stderr
    assert not (tmp_path / "o").exists()
