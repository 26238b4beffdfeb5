"""What ``--resume`` needs beyond Tune's own snapshot: the last reports of trials that ended
(completed, or stopped by the scheduler) after the last snapshot, kept beside the experiment
(a folder or a bucket URI) and replayed instead of re-run."""

from __future__ import annotations

import json

from ..contract import REPORTED
from ..paths import join, read_text, texts, write_text
from ..schema import parse_json


def save_final(folder: str, trial_id: str, result: dict) -> None:
    """An ended trial's last report (final, or partial for a stopped trial), kept so that a
    resumed search can replay it."""
    write_text(join(folder, f"{trial_id}.json"), json.dumps({k: result[k] for k in REPORTED if k in result}))


def has_final(folder: str, trial_id: str) -> bool:
    return read_text(join(folder, f"{trial_id}.json")) is not None


def load_finals(folder: str) -> dict[str, dict]:
    return {
        name: parse_json(text, f"trial record {join(folder, name + '.json')!r}")
        for name, text in texts(folder, ".json").items()
    }
