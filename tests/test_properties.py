"""Property-based checks, driven by hypothesis: every value-taking flag of every subcommand
with generated values, and the loaders of what autoprune reads back (a policy file, a search
summary, a model file, a trial record) with generated documents. Whatever comes in: no
traceback, a result (exit 0) or one AutopruneError (exit 2 and one line for the CLI), and
nothing written when it refuses.

Two profiles (``AUTOPRUNE_HYPOTHESIS``): ``ci`` (the default, a few dozen examples per
property, in the suite) and ``long`` (10,000 per property; run by hand)."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from autoprune.errors import AutopruneError

settings.register_profile(
    "ci", max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
settings.register_profile(
    "long", max_examples=10_000, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
settings.load_profile(os.environ.get("AUTOPRUNE_HYPOTHESIS", "ci"))
if os.environ.get("AUTOPRUNE_HYPOTHESIS_EXAMPLES"):  # a profile's count, overridden
    settings.register_profile(
        "chosen", settings(settings(), max_examples=int(os.environ["AUTOPRUNE_HYPOTHESIS_EXAMPLES"]))
    )
    settings.load_profile("chosen")

# ------------------------------------------------------------------ values

NUMBERISH = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["nan", "NaN", "inf", "-inf", "1e309", "0", "-0", "1e-320", "0x10", "1_000", "١٢", " 3 ", "2.5"]),
)
TEXTISH = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["", " ", "a=b", "a=", "=1", "x:y", "../..", "/dev/zero", "{}", "[]", "\x00", "é" * 3]),
)
VALUES = st.one_of(NUMBERISH, TEXTISH)

JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=12), inner, max_size=5),
    max_leaves=30,
)


def _mutated(valid: dict) -> st.SearchStrategy:
    """A valid document with one key set to a generated value, removed, or added."""
    keys = sorted(valid)
    return st.one_of(
        st.tuples(st.sampled_from(keys), JSON).map(lambda kv: {**valid, kv[0]: kv[1]}),
        st.sampled_from(keys).map(lambda k: {key: v for key, v in valid.items() if key != k}),
        st.tuples(st.text(max_size=12), JSON).map(lambda kv: {**valid, kv[0]: kv[1]}),
    )


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


# ------------------------------------------------------------------ flags


def _value_flags(command: str) -> list[str]:
    """The flags of ``command`` that take a value (booleans and the ones that choose where
    results go or which cluster to join are left out: see _argv)."""
    from autoprune.flags import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    skip = {"--out", "--storage", "--name", "--address", "--help"}
    if command != "ui":  # the UI's store is the value it is about; the others' is guarded
        skip.add("--tracking-uri")
    return sorted(
        a.option_strings[-1]
        for a in sub._actions
        if a.option_strings and a.nargs != 0 and not set(a.option_strings) & skip
    )


def _argv(command: str, flag: str, value: str, d: Path) -> list[str]:
    """One generated flag value, with guards that make a valid command that would work for
    long (or serve) stop at its last check instead: prune into a folder that holds results;
    search needing more GPUs (or CPUs) than this machine has; the UI on a port in use or a
    host that is not one. evaluate, export and list run (exit 0) when the value is valid."""
    if command == "prune":
        return ["prune", flag, value, "--out", str(d / "held")]
    if command == "search":
        guard = ["--cpus-per-trial", "100000"] if flag == "--gpus-per-trial" else ["--gpus-per-trial", "1000"]
        store = ["--storage", str(d / "res"), "--tracking-uri", f"sqlite:///{d / 'mlflow.db'}"]
        return ["search", flag, value, *guard, *store]
    if command == "ui":
        guard = ["--port", str(_BUSY.getsockname()[1])] if flag == "--host" else ["--host", "256.256.256.256"]
        return ["ui", flag, value, *guard]
    if command == "list":
        return ["list", "groups", flag, value]
    return [command, str(d / "model.pt"), flag, value]


_BUSY = socket.create_server(("127.0.0.1", 0))  # a port in use, for the UI's guard


@pytest.fixture(scope="module")
def model_file(tmp_path_factory, digits_task, digits_dense, engine_cfg) -> Path:
    """A real pruned model file, as `autoprune prune` writes it."""
    from autoprune import engine
    from autoprune.config import Budget, FinetuneConfig, Policy
    from autoprune.engine.checkpoint import architecture_key, save_model

    policy = Policy(finetune=FinetuneConfig(epochs=0))
    metrics = engine.measure_model(digits_dense, digits_task, engine_cfg.measure, latency=False)
    result = engine.run(digits_task, digits_dense, policy, Budget(), engine_cfg, metrics)
    path = tmp_path_factory.mktemp("model") / "model.pt"
    arch = architecture_key(digits_dense)
    save_model(path, result.model, engine_cfg.task, "channel", result.history, policy.to_dict(), {}, arch)
    return path


@pytest.mark.parametrize("command", ["prune", "search", "evaluate", "export", "list", "ui"])
def test_every_flag_with_any_value_is_a_result_or_one_line(command, tmp_path, cli_here, monkeypatch, model_file):
    from autoprune.tracking import store

    flags = _value_flags(command)
    assert len(flags) >= {"prune": 20, "search": 20, "ui": 2}.get(command, 3)  # the parser's, not a hand-kept list
    (tmp_path / "held").mkdir()
    (tmp_path / "held" / "model.pt").write_bytes(b"earlier results")
    shutil.copy(model_file, tmp_path / "model.pt")
    if command == "ui":
        store.client(f"sqlite:///{tmp_path / 'mlflow.db'}")  # the store the UI serves by default
    monkeypatch.setenv("AUTOPRUNE_CACHE", str(tmp_path / "cache"))

    @given(flag=st.sampled_from(flags), value=VALUES)
    def check(flag: str, value: str) -> None:
        before = _files(tmp_path)
        got = cli_here(*_argv(command, flag, value, tmp_path), cwd=tmp_path)
        assert got.returncode in (0, 2), (flag, value, got.returncode, got.stderr[-2000:])
        assert "Traceback" not in got.stderr, (flag, value, got.stderr[-2000:])
        if got.returncode == 2:
            lines = got.stderr.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("autoprune: "), (flag, value, got.stderr[-2000:])
            assert _files(tmp_path) == before, (flag, value, _files(tmp_path) - before)

    check()


# ------------------------------------------------------------------ loaders


def _refused_or_read(read, path: Path) -> None:
    try:
        read(path)
    except AutopruneError as exc:
        assert "\n" not in str(exc), str(exc)


def test_a_policy_file_holds_a_policy_or_is_refused(tmp_path):
    from autoprune.config import Policy

    valid = Policy().to_dict()

    @given(doc=st.one_of(JSON, _mutated(valid)), raw=st.booleans(), junk=st.binary(max_size=64))
    def check(doc, raw: bool, junk: bytes) -> None:
        path = tmp_path / "policy.json"
        path.write_bytes(junk if raw else json.dumps(doc, allow_nan=True).encode())
        _refused_or_read(Policy.from_json, path)

    check()


def test_a_summary_file_is_a_summary_or_is_refused(tmp_path):
    from autoprune.search.summary import SCHEMA_VERSION, SearchSummary

    valid = {"schema_version": SCHEMA_VERSION, "name": "s", "budget": {"kind": "flops", "fraction": 0.5}}

    @given(doc=st.one_of(JSON, _mutated(valid)), depth=st.integers(0, 3000))
    def check(doc, depth: int) -> None:
        path = tmp_path / "summary.json"
        text = json.dumps(doc, allow_nan=True)
        path.write_text("[" * depth + text + "]" * depth)
        _refused_or_read(SearchSummary.read, path)

    check()


def test_a_model_file_is_a_model_record_or_is_refused(tmp_path):
    from autoprune.engine.checkpoint import read_model_file

    tensors = st.lists(st.integers(0, 3), max_size=3).map(lambda shape: torch.zeros(shape))
    leaves = st.one_of(JSON, tensors, st.dictionaries(st.text(max_size=8), tensors, max_size=3))
    valid = {"format": "autoprune-pruned-model/1", "history": [], "state_dict": {}, "structure": "channel"}

    @given(doc=st.one_of(st.dictionaries(st.text(max_size=12), leaves, max_size=6), _mutated(valid), JSON))
    def check(doc) -> None:
        path = tmp_path / "model.pt"
        try:
            torch.save(doc, path)
        except (TypeError, ValueError, RuntimeError):  # not something torch can write
            return
        _refused_or_read(read_model_file, path)

    check()


def test_a_trial_record_is_a_record_or_is_refused_by_name(tmp_path):
    from autoprune.search import journal

    valid = journal.record("t1", 1, "completed", {"policy": {}}, {"val_acc": 0.5, "final": True}, [], None)

    @given(doc=st.one_of(JSON, _mutated(valid)), text=st.one_of(st.none(), st.text(max_size=80)))
    def check(doc, text) -> None:
        raw = json.dumps(doc, allow_nan=True) if text is None else text
        try:
            journal.check(raw, "t1", "trials/t1.json")
        except AutopruneError as exc:
            assert "trials/t1.json" in str(exc) and "\n" not in str(exc)

    check()
