"""How the MLflow UI opens a search: the runs table's view of its trials (a shared view kept
in an experiment tag, which the link names), and the experiment's description."""

from __future__ import annotations

import json
from typing import Any

from ..contract import metric_mode

VIEW_KEY = "trials"  # the link's ``viewStateShareKey``: the experiment tag below holds the view
VIEW_TAG = f"mlflow.sharedViewState.{VIEW_KEY}"
EXPERIMENT_NOTE = "mlflow.note.content"  # an experiment's description, shown above its runs table
UI_HOST, UI_PORT = "127.0.0.1", 5000  # where `autoprune ui` serves by default
NAME_WIDTH = 250  # pixels: "#12 uniform baseline (magnitude/local)" in full (the UI's default cuts at 190)


def _metric(key: str) -> str:
    return f"metrics.`{key}`"


def _param(key: str) -> str:
    return f"params.`{key}`"


def trials_view(score: str, kind: str, agent: bool = False, structures: bool = False) -> dict[str, Any]:
    """The runs table as a search opens: its trials only (flat rows, not under the collapsed
    search run), the best first by ``score`` (an agent's: by reward), and the columns that say
    what each trial is and did, the winner's ``autoprune.best`` tag first; ``kind``: the
    budget's (its ratio is shown, FLOPs' too); ``structures``: whether the space samples the
    structure (then it is a column)."""
    rank = "reward" if agent else score
    metrics = [rank] + ([score] if agent else []) + [f"{kind}_ratio"] + (["flops_ratio"] if kind != "flops" else [])
    metrics += ["predicted_speedup"]
    params = [] if agent else ["policy.criterion", "policy.scope", "policy.method"]
    params += ["policy.structure"] if structures else []
    columns = ["tags.`autoprune.best`", *map(_metric, metrics), *map(_param, params)]
    return {
        "searchFilter": "tags.`autoprune.role` = 'trial'",
        "orderByKey": _metric(rank),
        "orderByAsc": metric_mode(rank) == "min",
        "selectedColumns": columns,
        "columnOrder": ["attributes.`Run Name`", "runDateAndNestInfo", *columns],
        "columnWidths": {"attributes.`Run Name`": NAME_WIDTH},
    }


def set_view(mlflow, experiment_id: str, view: dict[str, Any]) -> None:
    """Keep ``view`` as the experiment's shared view (what :func:`runs_link` opens)."""
    mlflow.set_experiment_tag(experiment_id, VIEW_TAG, json.dumps(view))


def describe_experiment(mlflow, experiment_id: str, text: str) -> None:
    """The experiment's description (markdown; its first line shows while it is folded)."""
    mlflow.set_experiment_tag(experiment_id, EXPERIMENT_NOTE, text)


def run_link(experiment_id: str, run_id: str) -> str:
    """A link to a run, relative to the UI (works inside a description), in the model-training
    view: without ``workflowType`` MLflow 3 opens runs in its GenAI view."""
    return f"#/experiments/{experiment_id}/runs/{run_id}?workflowType=machine_learning"


def runs_link(experiment_id: str, host: str = UI_HOST, port: int = UI_PORT, server: str | None = None) -> str:
    """The address that opens an experiment's runs table in the MLflow UI's model-training
    view (MLflow 3 otherwise opens its GenAI overview), as its search set it (the trials, the
    best first, with their columns: :mod:`.view`): on ``autoprune ui --host --port``, or on
    the ``server`` given (an http(s) tracking URI is itself a UI)."""

    if server is None:
        if host in ("", "0.0.0.0", "::"):  # listening everywhere: this machine's name reaches it
            import socket

            host = socket.gethostname()
        server = f"http://{f'[{host}]' if ':' in host else host}:{port}"
    query = f"viewStateShareKey={VIEW_KEY}&workflowType=machine_learning"
    return f"{server.rstrip('/')}/#/experiments/{experiment_id}/runs?{query}"
