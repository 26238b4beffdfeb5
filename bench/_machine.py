"""What the Ray benchmarks read back from a search's MLflow store (the machine itself is named
by ``_page.machine``)."""

from __future__ import annotations


def trial_rate(uri: str, name: str) -> tuple[float, int, float]:
    """(trials per minute, node count, span in s) of the search ``name`` in the MLflow store
    ``uri``: its trial runs over the span from the first start to the last end, so start-up
    and the driver's own work are left out."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name(name).experiment_id], max_results=1000)
    trials = [r for r in runs if r.data.tags.get("autoprune.role") == "trial"]
    span = (max(r.info.end_time for r in trials) - min(r.info.start_time for r in trials)) / 1000
    nodes = {r.data.tags.get("autoprune.node_id") for r in trials}
    return len(trials) / (span / 60), len(nodes), span
