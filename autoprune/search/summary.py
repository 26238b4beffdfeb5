"""``summary.json``, the record a search leaves beside its best model: one class writes it and
reads it back, so its keys are declared once, here, with their meaning."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..contract import declare_metric
from ..errors import AutopruneError
from ..schema import MAX_DOCUMENT_BYTES, read_json

SCHEMA_VERSION = 1  # raised when a key changes meaning or goes; adding an optional key keeps it
OPTIONAL = (
    "agent",
    "latency_table",
    "latency_tables",
    "validation",
    "uniform_matched",
    "final_reruns",
    "task_metric",
    "ran_on",
)  # written only when the search has them


@dataclass(frozen=True, kw_only=True)
class SearchSummary:
    """What a search found, as ``summary.json`` holds it."""

    name: str  # the search's --name
    budget: dict[str, Any]  # {"kind": flops|params|latency, "fraction": the share of the dense cost to keep}
    searcher: str
    space: str
    structures: list[str]  # what the trials pruned: channel, unstructured
    metric: str  # what picked the best trial (the task's metric: val_acc, val_rmse ...; val_loss; an agent's reward)
    scheduler: str  # asha or none
    task: str
    model: str
    trials: dict[str, int]  # total, completed, stopped_early, failed
    dense: dict[
        str, float
    ]  # the dense model: its task metrics (val_acc, test_acc ...), flops, params, latency_measured_ms
    best: dict[str, Any] | None  # the best trial re-run for final_epochs; None if no trial fits the budget
    pareto: list[dict[str, Any]]  # the trials on the Pareto front of accuracy and cost, with their policies
    mlflow: dict[str, str]  # tracking_uri, experiment_id, run_id of the search run
    wall_time_s: float  # the whole search, the final re-run included
    agent: dict[str, Any] | None = None  # an agent's settings (config.AgentConfig)
    latency_table: dict[str, Any] | None = None  # this machine's latency table: device, batch, threads, dense_ms
    latency_tables: dict[str, dict] | None = None  # per kind of hardware: the node it was built on, dense_ms
    # the validation split that ranked the trials: samples, and the difference (points) it resolves at
    # the dense model's accuracy; closer trials were ties, given to the simpler policy (search.ranking)
    validation: dict[str, Any] | None = None
    # uniform pruning fine-tuned for the search's total epochs (policy, epochs, val_acc, test_acc, the
    # budget's ratio), the best model's test gain over it (points, se_points, beyond_noise) and a verdict
    uniform_matched: dict[str, Any] | None = None
    reward_curve: list[float | None] | None = None  # an agent's reward per episode, in the order they ran
    # the top trials re-run at the final length before the winner was chosen: epochs, seeds, and
    # each one's mean validation accuracy over those seeds by trial id
    final_reruns: dict[str, Any] | None = None
    # the task's metric: its name, key (val_acc, val_miou, val_rmse ...), mode (max or min) and whether
    # it reads as a percentage
    task_metric: dict[str, Any] | None = None
    # on a cluster: the Ray node each of the driver's heavy steps ran on as a task with a trial's
    # resources ("dense": the dense model's training, "final": the final re-runs)
    ran_on: dict[str, str] | None = None
    schema_version: int = SCHEMA_VERSION

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        for key in OPTIONAL:
            if out[key] is None:
                del out[key]
        return out

    def write(self, path: Path) -> None:
        """Write the summary whole: a reader never sees half of it."""
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        tmp.replace(path)

    @classmethod
    def read(cls, path: Path) -> SearchSummary:
        """The summary at ``path``; an :class:`AutopruneError` naming the file if it is not one
        this version of autoprune wrote or can read."""
        try:
            with Path(path).open("rb") as f:
                raw = f.read(MAX_DOCUMENT_BYTES + 1)
        except OSError as exc:
            raise AutopruneError(f"{str(path)!r} is not a readable search summary ({exc})") from None
        data = read_json(raw, f"search summary {str(path)!r}")
        if not isinstance(data, dict):
            raise AutopruneError(f"{str(path)!r} is not a search summary (not a JSON object)")
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise AutopruneError(
                f"{str(path)!r} has summary schema_version {version!r}; this autoprune reads {SCHEMA_VERSION}"
            )
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        missing = sorted(n for n in names - set(data) if n not in OPTIONAL)
        if unknown or missing:
            raise AutopruneError(f"{str(path)!r} is not a search summary (unknown keys {unknown}, missing {missing})")
        metric = data.get("task_metric")
        if (
            isinstance(metric, dict)
            and metric.get("mode") in ("max", "min")
            and str(metric.get("name", "")).isidentifier()
        ):
            declare_metric(metric["name"], metric["mode"], bool(metric.get("percent")))  # its direction, for readers
        return cls(**data)
