"""The descriptions a search leaves in MLflow (``autoprune.tracking.note``): the search run's,
the experiment's (above its runs table) and the registered model version's, each with links
that keep the UI in its model-training view."""

from __future__ import annotations

from autoprune.contract import TrialRecord
from autoprune.tracking.note import Outcome, experiment_note, search_note, version_note
from autoprune.tracking.view import run_link

DENSE = {"val_acc": 0.98, "test_acc": 0.97, "flops": 2.0e6, "params": 1.0e5, "latency_measured_ms": 1.0}
PRUNED = {"val_acc": 0.975, "test_acc": 0.965, "flops": 1e6, "params": 5e4, "latency_measured_ms": 0.5, "speedup": 2.0}
SUMMARY = {
    "name": "e2e",
    "budget": {"kind": "flops", "fraction": 0.5},
    "searcher": "tpe",
    "space": "default",
    "metric": "val_acc",
    "scheduler": "asha",
    "task": "digits",
    "model": "digits_resnet",
    "trials": {"total": 6, "completed": 3, "stopped_early": 2, "failed": 1},
}


def _best(**metrics) -> TrialRecord:
    policy = {"structure": "channel", "criterion": "magnitude", "scope": "global"}
    return TrialRecord(2, "t2", "completed", policy, None, {"val_acc": 0.97, **metrics}, {}, run_id="run2")


def test_links_to_runs_keep_the_model_training_view():
    assert run_link("4", "run2") == "#/experiments/4/runs/run2?workflowType=machine_learning"


def test_the_search_note_says_which_trial_won_and_why():
    note = search_note(Outcome(SUMMARY, DENSE, _best(), PRUNED, 10, "4", 3), epochs=2, charts=("a.png", "b.png"))
    assert f"**Best: [#3 magnitude/global]({run_link('4', 'run2')})** (Ray trial `t2`, sampled)" in note
    assert "validation accuracy 97.00% after 2 fine-tuning epoch(s)" in note
    assert "3 completed, 2 stopped early by the scheduler, 1 failed; 2 fine-tuning epoch(s) each" in note
    assert "FLOPs at most 0.5 of dense" in note and "tpe on space `default`" in note
    assert "| validation accuracy | 98.00% | 97.50% | -0.50 pts |" in note
    assert "| FLOPs | 2.00M | 1.00M | 0.500x |" in note
    assert "| latency, timed side by side | 1.000 ms | 0.500 ms | 0.500x |" in note
    assert "| speed-up | 1.00x | 2.00x |  |" in note
    assert "`a.png`, `b.png`" in note and "**." not in note  # bold closed where it opened
    none = search_note(
        Outcome({**SUMMARY, "trials": {**SUMMARY["trials"], "completed": 0}}, DENSE, None, None, 10, "4", 0)
    )
    assert "no trial completed" in none and "|" not in none


def test_an_agents_note_speaks_of_rewards_and_no_space():
    amc = {**SUMMARY, "searcher": "amc", "metric": "reward", "space": "default"}
    note = search_note(Outcome(amc, DENSE, _best(reward=0.8125), PRUNED, 10, "4", 140), epochs=0)
    assert "the highest reward, 0.812, among the 140 completed episode(s)" in note
    assert "validation accuracy 97.00% before any fine-tuning" in note
    assert "amc (an agent ranking its episodes by reward)" in note
    assert "space" not in note and "after the search's epochs" not in note


def test_the_experiment_note_puts_the_outcome_in_its_first_line():
    note = experiment_note(Outcome(SUMMARY, DENSE, _best(), PRUNED, 10, "4", 3), run_id="parent")
    first = note.splitlines()[0]
    assert first.startswith("**Best: #3 magnitude/global**: test accuracy 96.50% (dense 97.00%), FLOPs 0.500x")
    assert "2.00x faster" in first and len(first) < 140  # it shows whole while the description is folded
    assert f"[e2e]({run_link('4', 'parent')})" in note and f"({run_link('4', 'run2')})" in note
    matched = {**SUMMARY, "uniform_matched": {"returned": True}}
    assert "**Best: uniform pruning, fine-tuned longer**" in experiment_note(
        Outcome(matched, DENSE, _best(), PRUNED, 10, "4", 3), run_id="parent"
    )
    assert experiment_note(Outcome(SUMMARY, DENSE, None, None, 10, "4", 0), "p").startswith("**No model**")


def test_the_model_version_says_where_it_comes_from():
    text, tags = version_note("e2e", _best(), PRUNED, DENSE, "4", matched=False)
    assert f"trial [#3 magnitude/global]({run_link('4', 'run2')})" in text and "speed-up 2.00x" in text
    assert tags["autoprune.search"] == "e2e" and tags["autoprune.trial_id"] == "t2"
    assert tags["autoprune.policy"] == "channel/magnitude/global" and tags["autoprune.source"] == "trial"
    assert tags["flops_ratio"] == "0.500x" and tags["test_acc"] == "0.965"
    assert version_note("e2e", _best(), PRUNED, DENSE, "4", matched=True)[1]["autoprune.source"] == "uniform_matched"
