"""summary.json's one class: written whole, read back equal, and a file it did not write refused
naming the file (a real search's summary is checked against it in test_runner.py)."""

from __future__ import annotations

import json

import pytest

from autoprune.errors import AutopruneError
from autoprune.search.summary import SCHEMA_VERSION, SearchSummary


def _summary(**kw) -> SearchSummary:
    base = dict(
        name="s",
        budget={"kind": "flops", "fraction": 0.5},
        searcher="tpe",
        space="default",
        structures=["channel"],
        metric="val_acc",
        scheduler="asha",
        task="digits",
        model="resnet_digits",
        trials={"total": 2, "completed": 2, "stopped_early": 0, "failed": 0},
        dense={"val_acc": 0.99},
        best=None,
        pareto=[],
        mlflow={"tracking_uri": "sqlite:///m.db", "experiment_id": "1", "run_id": "r"},
        wall_time_s=1.5,
    )
    base.update(kw)
    return SearchSummary(**base)


def test_a_summary_reads_back_as_written(tmp_path):
    path = tmp_path / "summary.json"
    written = _summary(agent={"episodes": 4})
    written.write(path)
    raw = json.loads(path.read_text())
    assert raw["schema_version"] == SCHEMA_VERSION and raw["agent"] == {"episodes": 4}
    assert "latency_table" not in raw  # optional keys only where the search has them
    assert SearchSummary.read(path) == written
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda d: d.update(schema_version=99), "schema_version 99; this autoprune reads 1"),
        (lambda d: d.pop("schema_version"), "schema_version None"),
        (lambda d: d.update(extra=1), r"unknown keys \['extra'\]"),
        (lambda d: d.pop("trials"), r"missing \['trials'\]"),
    ],
)
def test_a_summary_this_version_did_not_write_is_refused_naming_the_file(tmp_path, change, message):
    path = tmp_path / "summary.json"
    _summary().write(path)
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))
    with pytest.raises(AutopruneError, match=message) as raised:
        SearchSummary.read(path)
    assert str(path) in str(raised.value)


@pytest.mark.parametrize("text", ["[1, 2]", "{not json", ""])
def test_a_file_that_is_no_summary_is_refused(tmp_path, text):
    path = tmp_path / "summary.json"
    path.write_text(text)
    with pytest.raises(AutopruneError, match="summary"):
        SearchSummary.read(path)
