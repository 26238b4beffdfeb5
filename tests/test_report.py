"""The terminal tables: every speed-up agrees with the latencies on its row, a noisy timing
says so, and a multi-objective search's trials table lists its Pareto front."""

from __future__ import annotations

import re

from autoprune.contract import TrialRecord
from autoprune.report import FRONT_ROWS, comparison, noisy, single, trials_table

ROW = re.compile(r"latency \(batch (\d+)\)\s+([\d.]+) ms\s+([\d.]+) ms\s+speed-up ([\d.]+)x(.*)")


def _figures(dense_ms: dict, pruned_ms: dict, per_round: dict, spread=None, batch: int = 1):
    dense = {"val_acc": 0.98, "flops": 4e6, "params": 1e5, "latency_ms_by_batch": dense_ms}
    pruned = {"val_acc": 0.97, "flops": 2e6, "params": 5e4, "latency_ms_by_batch": pruned_ms}
    pruned.update(speedup_by_batch=per_round, latency_batch=batch, speedup=per_round[str(batch)])
    if spread is not None:
        pruned["speedup_spread"] = spread
    return dense, pruned


def _rows(text: str) -> dict[str, tuple[float, float, float, str]]:
    return {m[1]: (float(m[2]), float(m[3]), float(m[4]), m[5]) for m in map(ROW.search, text.splitlines()) if m}


def test_every_speedup_is_the_ratio_of_the_latencies_on_its_row():
    # batch 32: the per-round median (1.05) and the medians' ratio (0.92) disagree, as a busy machine makes them
    dense, pruned = _figures({"1": 0.546, "32": 16.616}, {"1": 0.452, "32": 18.118}, {"1": 1.19, "32": 1.05})
    for text in (
        comparison(dense, pruned),
        single({**pruned, "dense_latency_ms_by_batch": dense["latency_ms_by_batch"]}),
    ):
        rows = _rows(text)
        assert set(rows) == {"1", "32"}
        for d, p, x, _ in rows.values():
            assert abs(x - d / p) <= 0.005 + 1e-9, text
        assert "noisy" in rows["32"][3] and "median per round 1.05x" in rows["32"][3]
        assert "noisy" not in rows["1"][3]
        assert "speed-up: dense median / pruned median" in text and "\nnoisy: " in text


def test_a_timing_whose_rounds_varied_widely_says_so():
    dense, pruned = _figures({"1": 0.60}, {"1": 0.40}, {"1": 1.5}, spread=[1.12, 17.14])
    ((_, _, x, rest),) = _rows(comparison(dense, pruned)).values()
    assert x == 1.5 and rest == ", noisy: timings varied (1.12-17.14)"
    dense, pruned = _figures({"1": 0.60}, {"1": 0.40}, {"1": 1.49}, spread=[1.45, 1.52])
    text = comparison(dense, pruned)
    ((_, _, x, rest),) = _rows(text).values()
    assert rest == " (1.45-1.52)" and "noisy" not in text
    # quartiles kept for every batch size: each row reads its own
    dense, pruned = _figures({"1": 0.60, "32": 9.0}, {"1": 0.40, "32": 6.0}, {"1": 1.5, "32": 1.5}, [1.45, 1.52])
    pruned["speedup_spread_by_batch"] = {"1": [1.45, 1.52], "32": [0.9, 2.5]}
    rows = _rows(comparison(dense, pruned))
    assert rows["1"][3] == " (1.45-1.52)" and rows["32"][3] == ", noisy: timings varied (0.90-2.50)"


def test_the_noise_rule():
    assert not noisy(1.30, 1.31, (1.25, 1.36))
    assert noisy(1.30, 1.31, (1.10, 1.40))  # quartiles more than 1.2x apart
    assert noisy(1.06, 1.05, (0.97, 1.12))  # faster or slower is not settled, yet the figure says faster
    assert not noisy(1.01, 1.01, (0.97, 1.04))  # no difference, and it says none
    assert noisy(0.92, 1.05, None)  # the two estimates disagree
    assert not noisy(0.92, None, None)


def test_the_speedup_column_reads_left_aligned():
    dense, pruned = _figures({"1": 0.60, "32": 10.0}, {"1": 0.40, "32": 11.0}, {"1": 1.5, "32": 1.3}, [1.1, 1.9])
    lines = comparison(dense, pruned).splitlines()
    column = lines[0].index("pruned/dense")
    assert all(line[column:].startswith("speed-up") for line in lines if line.startswith("latency"))
    assert all(line == line.rstrip() for line in lines)


def _record(number: int, acc: float, ratio: float, status: str = "completed") -> TrialRecord:
    metrics = {"val_acc": acc, "flops_ratio": ratio, "latency_predicted_ms": 1.0 + ratio, "predicted_speedup": 1.2}
    policy = {"criterion": "magnitude", "scope": "global"}
    return TrialRecord(number, f"t{number:02d}", status, policy, ratio, metrics, ratios={})


def _listed(text: str) -> list[str]:
    return re.findall(r"^#\d+ (t\d\d)", text, flags=re.M)


def test_the_trials_table_lists_the_pareto_front_best_first():
    records = [_record(i, 0.80 + 0.01 * ((i * 7) % 13), 0.3 + 0.01 * i) for i in range(14)]
    records.append(_record(14, 0.99, 0.2, status="failed"))
    front = ["t03", "t09", "t01"]
    text = trials_table(records, "flops", front=front)
    assert text.splitlines()[0] == "Pareto front: 3 trials (accuracy vs flops ratio vs predicted latency)"
    by_acc = sorted(front, key=lambda t: -next(r.metrics["val_acc"] for r in records if r.trial_id == t))
    assert _listed(text) == by_acc
    assert text.endswith("15 trials: 14 completed, 0 stopped early by the scheduler, 1 failed")
    # a front longer than the table: the best of it, and the heading says so
    everyone = [r.trial_id for r in records if r.status == "completed"]
    text = trials_table(records, "flops", front=everyone)
    assert text.splitlines()[0].endswith(f"; the {FRONT_ROWS} best by val accuracy")
    best = sorted(records[:14], key=lambda r: -r.metrics["val_acc"])[:FRONT_ROWS]
    assert _listed(text) == [r.trial_id for r in best]
    # without a front: the top by the metric, as before
    assert _listed(trials_table(records, "flops")) == [r.trial_id for r in best[:5]]
    assert not trials_table(records, "flops").startswith("Pareto")
