"""What ``--resume`` needs beyond Tune's own snapshot: the last reports of trials that ended
(completed, or stopped by the scheduler) after the last snapshot, kept beside the experiment
and replayed instead of re-run."""

from __future__ import annotations

import json
from pathlib import Path

from ..contract import REPORTED


def save_final(folder: str, trial_id: str, result: dict) -> None:
    """An ended trial's last report (final, or partial for a stopped trial), kept so that a
    resumed search can replay it."""
    path = Path(folder) / f"{trial_id}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({k: result[k] for k in REPORTED if k in result}))
    tmp.replace(path)


def load_finals(folder: str) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in Path(folder).glob("*.json")}
