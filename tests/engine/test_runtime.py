"""Latency in the deployment runtime: the latency table, a latency budget's timing checks and
the side-by-side report timed in ONNX Runtime on the default task."""

from __future__ import annotations

import dataclasses
import importlib.util

import pytest

from autoprune import engine
from autoprune.config import Budget, MeasureConfig, Policy
from autoprune.engine.latency import table_key
from autoprune.errors import AutopruneError

ORT = all(importlib.util.find_spec(m) for m in ("onnxruntime", "onnx", "onnxscript"))
needs_ort = pytest.mark.skipif(not ORT, reason="ONNX Runtime is the onnx extra: pip install 'autoprune[onnx]'")
# digits' forward pass takes 0.1 ms in ONNX Runtime: many rounds, as test_latency's timings
TIMING = dict(batch_sizes=(1,), warmup=5, repeats=41, threads=1, runtime="onnxruntime")


def test_an_unknown_runtime_is_refused_naming_the_choices():
    with pytest.raises(AutopruneError, match="one of: torch, onnxruntime"):
        MeasureConfig(runtime="tensorrt")


@needs_ort
def test_the_runtime_keys_the_table_and_names_its_version(digits_dense, digits_task):
    import onnxruntime

    torch_key = table_key(digits_dense, digits_task.input_shape, digits_dense.fc.weight.device, 1, 1, "torch")
    ort_key = table_key(digits_dense, digits_task.input_shape, digits_dense.fc.weight.device, 1, 1, "onnxruntime")
    assert torch_key["runtime"].startswith("torch ")
    assert ort_key["runtime"].startswith(f"onnxruntime {onnxruntime.__version__}")
    assert {k: v for k, v in torch_key.items() if k != "runtime"} == {
        k: v for k, v in ort_key.items() if k != "runtime"
    }


@needs_ort
def test_a_latency_budget_is_timed_in_onnx_runtime_on_the_default_task(
    digits_task, digits_dense, digits_dense_metrics, engine_cfg, tmp_path
):
    from autoprune.report import comparison

    cfg = dataclasses.replace(engine_cfg, measure=MeasureConfig(**TIMING))
    table = engine.task_latency_table(digits_dense, digits_task, cfg)
    assert table.key["runtime"].startswith("onnxruntime")
    assert table.dense_ms > 0 and all(layer.dense_ms >= 0 for layer in table.layers.values())
    assert 0 < table.predict({}) and table.predict_model(digits_dense) == pytest.approx(table.predict())

    budget = Budget("latency", 0.7)
    policy = Policy(finetune={"epochs": 1})
    result = engine.run(digits_task, digits_dense, policy, budget, cfg, digits_dense_metrics, latency=table)
    pruned = result.pruned
    assert pruned["latency_runtime"].startswith("ONNX Runtime") and "1 thread" in pruned["latency_runtime"]
    assert 1 <= len(result.latency_checks) <= engine.methods.LATENCY_CHECKS
    measured = [c["measured"] for c in result.latency_checks]
    assert all(0 < m < 3 for m in measured)
    kept = next(c for c in result.latency_checks if c["kept"])
    assert pruned["latency_ratio"] == pytest.approx(kept["predicted"], rel=1e-6)
    assert pruned["flops_ratio"] < 1 and "speedup" in pruned and pruned["latency_ms_by_batch"]["1"] > 0
    text = comparison(result.dense, pruned)
    assert f"timed in {pruned['latency_runtime']}" in text


@needs_ort
def test_onnx_runtime_times_dense_and_pruned_side_by_side(digits_task, digits_dense):
    from autoprune.engine.measure import speedup

    config = MeasureConfig(**{**TIMING, "repeats": 7})
    half = engine.prune_to_budget(
        digits_dense,
        digits_task,
        Policy(round_to=8),
        Budget("flops", 0.3),
        engine.score(digits_dense, Policy(), data=None, seed=0),
        _cost(digits_dense, digits_task),
    ).model
    timed = speedup(digits_dense, half, digits_task.input_shape, 4, config)
    assert timed["dense_ms"] > 0 and timed["pruned_ms"] > 0
    same = speedup(digits_dense, digits_dense, digits_task.input_shape, 4, config)
    assert 0.5 < same["speedup"] < 2.0  # the same model against itself: about 1


def _cost(model, task):
    from autoprune.engine.measure import measure

    return measure(model, task.input_shape, MeasureConfig(), latency=False)
