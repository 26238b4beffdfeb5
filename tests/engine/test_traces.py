"""The dependency graph is traced once per model state: a one-shot channel prune traces the
dense model once (to solve the budget) and the pruned copy once (to remove the channels)."""

from __future__ import annotations

from autoprune import engine
from autoprune.config import Budget, Policy
from autoprune.engine import graph


def test_a_oneshot_channel_prune_traces_the_graph_at_most_twice(
    digits_task, digits_dense, digits_dense_metrics, engine_cfg, monkeypatch
):
    traced = []
    build = graph.build_dependency_graph

    def counting(model, example):
        traced.append(type(model).__name__)
        return build(model, example)

    monkeypatch.setattr(graph, "build_dependency_graph", counting)
    result = engine.run(
        digits_task,
        digits_dense,
        Policy(method="oneshot", structure="channel", finetune={"epochs": 0}),
        Budget("flops", 0.5),
        engine_cfg,
        digits_dense_metrics,
        measure_latency=False,
    )
    assert result.pruned["flops_ratio"] <= 0.5
    assert 1 <= len(traced) <= 2, traced
