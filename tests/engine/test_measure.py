"""Measurement: fvcore FLOPs (effective for masked weights), parameters, latency."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from autoprune.config import MeasureConfig
from autoprune.engine.measure import (
    count_params,
    effective_flops,
    flops_by_module,
    forward_bytes,
    measure,
    side_by_side,
)
from autoprune.engine.prune import fold_masks, mask_weights
from autoprune.errors import AutopruneError


def net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))


def test_flops_are_multiply_adds_counted_by_hand():
    total, by_module = flops_by_module(net().eval(), torch.zeros(1, 2, 6, 6))
    conv = 4 * 4 * 4 * (2 * 3 * 3)  # output positions x channels x (in x kernel)
    linear = 64 * 3
    assert by_module["0"] == conv and by_module["3"] == linear
    assert total == conv + linear


def test_masked_weights_count_as_removed_in_flops_and_params():
    model = net().eval()
    dense_total = flops_by_module(model, torch.zeros(1, 2, 6, 6))[0]
    dense_params = count_params(model)
    scores = {n: torch.rand(m.weight.shape) for n, m in model.named_modules() if n in ("0", "3")}
    mask_weights(model, {"0": 36, "3": 96}, scores)  # half of each layer's weights
    conv, linear = 4 * 4 * 4 * 18, 64 * 3
    assert effective_flops(model, torch.zeros(1, 2, 6, 6)) == pytest.approx(dense_total - conv / 2 - linear / 2)
    assert count_params(model) == dense_params - 36 - 96
    fold_masks(model)
    assert count_params(model) == dense_params - 36 - 96  # the zeros stay after folding


def test_measure_times_each_configured_batch_size():
    cost = measure(net().eval(), (2, 6, 6), MeasureConfig(batch_sizes=(1, 4), warmup=1, repeats=3))
    assert set(cost.latency_ms) == {1, 4} and all(t > 0 for t in cost.latency_ms.values())
    row = cost.to_dict()
    assert row["latency_measured_ms"] == cost.latency_ms[1] and set(row["latency_ms_by_batch"]) == {"1", "4"}
    assert measure(net().eval(), (2, 6, 6), MeasureConfig(), latency=False).latency_ms == {}


def test_latency_leaves_the_models_mode_and_the_thread_count_as_they_were():
    model = net().train()
    threads = torch.get_num_threads()
    measure(model, (2, 6, 6), MeasureConfig(batch_sizes=(1,), warmup=0, repeats=1, threads=1))
    assert model.training and torch.get_num_threads() == threads


def test_a_timing_stops_at_its_time_cap_after_three_rounds():
    import time

    from autoprune.engine.measure import MIN_ROUNDS, time_interleaved

    calls = [lambda: time.sleep(0.02), lambda: time.sleep(0.01)]
    capped = time_interleaved(calls, torch.device("cpu"), warmup=5, rounds=50, seconds=0.2)
    assert MIN_ROUNDS <= len(capped[0]) == len(capped[1]) < 15  # 50 rounds would take 1.5 s
    floor = time_interleaved(calls, torch.device("cpu"), warmup=1, rounds=50, seconds=0.0)
    assert len(floor[0]) == MIN_ROUNDS  # a cap already passed still leaves the minimum
    assert len(time_interleaved(calls, torch.device("cpu"), warmup=0, rounds=4)[0]) == 4  # no cap


def test_forward_bytes_counts_the_input_and_the_largest_output_by_hand():
    x = torch.zeros(1, 2, 6, 6)
    largest = 4 * 4 * 4 * 4  # the conv's (and relu's) 4 x 4 x 4 float output
    assert forward_bytes(net().eval(), x) == x.numel() * 4 + 3 * largest


class Hungry(nn.Module):
    """Runs out of memory the way torch does past a batch of 4."""

    def forward(self, x):
        if x.shape[0] > 4:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")
        return x.sum(dim=1)


def test_running_out_of_memory_while_timing_names_the_latency_batch():
    config = MeasureConfig(warmup=1, repeats=3)
    assert side_by_side([Hungry()], (3,), 4, config)[0].median_ms >= 0
    with pytest.raises(AutopruneError, match="batch of 8 ran out of memory.*smaller --latency-batch"):
        side_by_side([Hungry()], (3,), 8, config)
