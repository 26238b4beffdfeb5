"""The hardware latency table: its predictions against side-by-side timings, its cache, and the
latency budget it drives (engine and `autoprune prune`)."""

from __future__ import annotations

import json
import math
import statistics

import numpy as np
import pytest
import torch

from autoprune import engine
from autoprune.config import Budget, EngineConfig, MeasureConfig, Policy, TaskConfig
from autoprune.engine.graph import PrunableGraph
from autoprune.engine.latency_build import latency_table
from autoprune.engine.measure import speedup
from autoprune.engine.prune import prune_channels
from autoprune.engine.stages import smallest_fraction
from autoprune.errors import AutopruneError

# 41 interleaved rounds: digits' forward pass is 0.4 ms at batch 1, where 15 rounds left the
# median ratio 0.12 off on a loaded 2-core CI machine (the checks' own timings included)
TIMING = MeasureConfig(batch_sizes=(1,), warmup=5, repeats=41)
# The error measured on the development machine (2 cores), over random allocations at 32-64
# px: median 4-7%, worst 10-15% (bench/latency_budget.py gives the 224 px figures). The
# tests allow about twice that: CI machines time more noisily.
MEDIAN_ERROR, WORST_ERROR = 0.15, 0.30
BUDGET_TOLERANCE = 0.1  # a latency budget's measured fraction lands within this of the budget


@pytest.fixture(scope="module")
def imagefolder(tmp_path_factory, write_image_folder):
    return write_image_folder(tmp_path_factory.mktemp("img"), classes=3, per_class=6, size=(32, 32))


def _task(imagefolder, model: str):
    from autoprune.engine.tasks import get_task

    return get_task(TaskConfig("imagefolder", model, str(imagefolder), image_size=32))


def _random_allocation(model, example, rng) -> dict[str, np.ndarray]:
    plan = {}
    for g in PrunableGraph(model, example).groups:
        keep = max(1, int(round(rng.uniform(0.1, 1.0) * g.size)))
        plan[g.name] = rng.choice(g.size, g.size - keep, replace=False)
    return plan


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_the_table_predicts_random_allocations_and_is_reused_from_the_cache(name, imagefolder, tmp_path):
    task = _task(imagefolder, name)
    torch.manual_seed(0)
    dense = task.model_factory().eval()
    example = task.example_input()
    table = latency_table(dense, task.input_shape, 1, 1, tmp_path)
    assert not table.cached and table.build_s > 0 and table.dense_ms > 0
    errors = []
    rng = np.random.default_rng(0)
    for _ in range(6):
        pruned, _ = prune_channels(dense, example, _random_allocation(dense, example, rng))
        predicted = table.predict_model(pruned) / table.predict()
        measured = 1.0 / speedup(dense, pruned.eval(), task.input_shape, 1, TIMING)["speedup"]
        errors.append(abs(predicted - measured) / measured)
    assert statistics.median(errors) <= MEDIAN_ERROR, errors
    assert max(errors) <= WORST_ERROR, errors
    # the second time it is read from disk (same key), not timed again
    again = latency_table(dense, task.input_shape, 1, 1, tmp_path)
    assert again.cached and again.to_dict() == table.to_dict()
    assert len(list(tmp_path.glob("latency-*.json"))) == 1
    other = latency_table(dense, task.input_shape, 2, 1, tmp_path)  # another batch: another table
    assert not other.cached and other.key["batch"] == 2 and len(list(tmp_path.glob("latency-*.json"))) == 2


@pytest.mark.parametrize("damage", ["not json", "negative", "zero dense", "infinite"])
def test_an_unreadable_or_damaged_cached_table_is_built_again(digits_task, digits_dense, tmp_path, damage):
    table = latency_table(digits_dense, digits_task.input_shape, 1, 1, tmp_path)
    [path] = tmp_path.glob("latency-*.json")
    data = json.loads(path.read_text())
    layer = next(iter(data["layers"].values()))
    if damage == "negative":
        layer["ms"][0][0] = -3.0
    elif damage == "zero dense":
        data["dense_ms"] = 0.0  # a prediction would divide by it
    elif damage == "infinite":
        data["fit"][0] = math.inf
    path.write_text("{not json" if damage == "not json" else json.dumps(data))
    said = []
    again = latency_table(digits_dense, digits_task.input_shape, 1, 1, tmp_path, log=said.append)
    assert not again.cached and json.loads(path.read_text())["key"] == table.key
    assert again.dense_ms > 0 and any("cannot be used" in line and str(path) in line for line in said), said


def test_prediction_follows_the_kept_channels(digits_task, digits_dense):
    table = latency_table(digits_dense, digits_task.input_shape, 1, 1)
    example = digits_task.example_input()
    graph = PrunableGraph(digits_dense, example)
    half = {g.name: np.arange(g.size // 2) for g in graph.groups}
    most = {g.name: np.arange(g.size - 2) for g in graph.groups}
    p_half = table.predict_model(prune_channels(digits_dense, example, half)[0])
    p_most = table.predict_model(prune_channels(digits_dense, example, most)[0])
    assert p_most < p_half < table.predict()
    assert table.predict() == pytest.approx(table.dense_ms, rel=0.25)  # the rest is fitted around the dense model


# On the digits net (8x8 inputs) fixed per-call costs are most of the latency at batch 1:
# with every group at the default max_ratio 0.9 the smallest reachable latency fraction is
# about 0.55-0.65, depending on the machine, so these runs let groups go down to 3%.
MAX_RATIO = "0.97"


def _digits_budget(task, dense, table) -> float:
    """0.6, or more where this machine's floor (as its own table predicts it) leaves less
    than 0.12 of room: the budget tests are about meeting a reachable budget (a loaded
    machine's timings may ask the corrections for a target near the predicted floor)."""
    floor = smallest_fraction(table, dense, task.example_input(), float(MAX_RATIO))
    return max(0.6, math.ceil((floor + 0.12) * 100) / 100)


def _latency_run(task, dense, fraction, cfg, table, finetune=0):
    policy = Policy(criterion="magnitude", scope="global", max_ratio=float(MAX_RATIO), finetune={"epochs": finetune})
    return engine.run(task, dense, policy, Budget("latency", fraction), cfg, latency=table)


@pytest.mark.slow
def test_a_latency_budget_is_met_as_measured_on_the_default_task(digits_task, digits_dense, engine_cfg, tmp_path):
    cfg = EngineConfig(task=engine_cfg.task, cache_dir=engine_cfg.cache_dir, progress=False, measure=TIMING)
    table = latency_table(digits_dense, digits_task.input_shape, 1, cfg.measure.threads, tmp_path)
    budget = _digits_budget(digits_task, digits_dense, table)
    result = _latency_run(digits_task, digits_dense, budget, cfg, table)
    p = result.pruned
    first, kept = result.latency_checks[0], next(c for c in result.latency_checks if c["kept"])
    assert first["predicted"] <= budget + 1e-9 and first["target"] == budget  # the solver meets it on the prediction
    checks = result.latency_checks
    assert not kept["missed"] and kept["measured"] <= budget + kept["noise"], checks  # the kept model, as timed
    assert abs(p["latency_measured_ratio"] - budget) <= BUDGET_TOLERANCE, (p, result.latency_checks)
    # the speed-up is the ratio of the two medians (what the latencies beside it say); the
    # per-round ratios' median lies within their quartiles
    assert p["speedup"] > 1 and p["speedup"] == pytest.approx(
        result.dense["latency_measured_ms"] / p["latency_measured_ms"]
    )
    per_round = p["speedup_per_round_by_batch"][str(cfg.measure.latency_batch)]
    assert p["speedup_spread"][0] <= per_round <= p["speedup_spread"][1]


@pytest.mark.slow
def test_a_latency_budget_is_met_as_measured_on_resnet18(imagefolder, tmp_path):
    task = _task(imagefolder, "resnet18")
    torch.manual_seed(0)
    dense = task.model_factory().eval()
    cfg = EngineConfig(task=TaskConfig("imagefolder", "resnet18", str(imagefolder), 32), progress=False, measure=TIMING)
    table = latency_table(dense, task.input_shape, 1, cfg.measure.threads, tmp_path)
    result = _latency_run(task, dense, 0.6, cfg, table)
    assert abs(result.pruned["latency_measured_ratio"] - 0.6) <= BUDGET_TOLERANCE, result.latency_checks
    assert result.pruned["flops_ratio"] < 1


def test_a_latency_budget_needs_channels(digits_task, digits_dense, engine_cfg):
    policy = Policy(structure="unstructured")
    with pytest.raises(AutopruneError, match="--budget-latency needs --structure channel"):
        engine.run(digits_task, digits_dense, policy, Budget("latency", 0.6), engine_cfg)


@pytest.mark.slow
def test_prune_with_a_latency_budget_prints_how_it_was_met(cli, tmp_path, digits_task, digits_dense):
    table = latency_table(digits_dense, digits_task.input_shape, 1, 1, tmp_path)
    budget = _digits_budget(digits_task, digits_dense, table)
    flags = ("--budget-latency", str(budget), "--max-ratio", MAX_RATIO)
    proc = cli("prune", *flags, "--finetune-epochs", "1", "--out", str(tmp_path / "o"))
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["budget"] == {"kind": "latency", "fraction": budget}
    measured = summary["pruned"]["latency_measured_ratio"]
    assert abs(measured - budget) <= BUDGET_TOLERANCE
    assert summary["latency_checks"] and f"latency budget {budget}: measured" in proc.stdout
    assert "predicted latency (table)" in proc.stdout
    # the table was built once, beside the dense model, and a second prune reads it
    again = cli("prune", *flags, "--finetune-epochs", "0", "--out", str(tmp_path / "p"))
    assert again.returncode == 0, again.stderr
    assert "latency table: cached" in again.stdout


def test_evaluate_times_the_model_beside_the_dense_architecture(tmp_path, digits_task, digits_dense, engine_cfg):
    from autoprune.engine.checkpoint import architecture_key, save_model
    from autoprune.jobs import evaluate_job
    from autoprune.report import single

    example = digits_task.example_input()
    graph = PrunableGraph(digits_dense, example)
    pruned, history = prune_channels(digits_dense, example, {g.name: np.arange(g.size // 2) for g in graph.groups})
    path = tmp_path / "model.pt"
    save_model(path, pruned, TaskConfig(), "channel", history, Policy().to_dict(), {}, architecture_key(digits_dense))
    metrics = evaluate_job(str(path), None, "cpu", None)
    assert set(metrics["dense_latency_ms_by_batch"]) == set(metrics["latency_ms_by_batch"]) == {"1", "32"}
    lo, hi = metrics["speedup_spread"]
    assert lo <= metrics["speedup"] <= hi
    assert "dense architecture" in single(metrics) and "speed-up" in single(metrics)


def test_the_smallest_reachable_latency_fraction_is_what_the_solver_reaches(digits_task, digits_dense, engine_cfg):
    from autoprune.engine.measure import measure
    from autoprune.engine.stages import smallest_fraction

    table = latency_table(digits_dense, digits_task.input_shape, 1, 1)
    floor = smallest_fraction(table, digits_dense, digits_task.example_input(), 0.9)
    assert 0 < floor < 1
    dense_cost = measure(digits_dense, digits_task.input_shape, None, latency=False)
    policy = Policy(criterion="magnitude", scope="global")
    scores = engine.score(digits_dense, policy, None, 0)
    with pytest.raises(AutopruneError, match="unreachable"):
        engine.prune_to_budget(
            digits_dense, digits_task, policy, Budget("latency", floor - 0.01), scores, dense_cost, latency=table
        )
    pruned = engine.prune_to_budget(
        digits_dense, digits_task, policy, Budget("latency", floor + 0.01), scores, dense_cost, latency=table
    )
    assert table.predict_model(pruned.model) / table.predict() <= floor + 0.01 + 1e-9
