"""Lottery-ticket weight rewinding (Frankle et al. 2019, 2020): the survivors of each round
restart from the dense run's weights after k steps, which the dense cache keeps."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import autoprune.engine.methods.lottery  # noqa: F401 - registers the method
from autoprune import engine
from autoprune.config import Budget, FinetuneConfig, Policy
from autoprune.engine.checkpoint import cpu_state, load_tensors
from autoprune.engine.graph import PRUNABLE_TYPES, clone, replay_history
from autoprune.engine.threads import using_threads
from autoprune.engine.train import DENSE_REWIND_STEP, dense_path, dense_threads, dense_training, rewind_path
from autoprune.errors import AutopruneError

BUDGET = Budget("flops", 0.5)


def _dense_file(task, cfg):
    engine.seed_everything(cfg.seed)
    return dense_path(task, cfg, task.train_epochs, task.model_factory())


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _same_run(a: dict, b: dict, device: torch.device) -> bool:
    """Two states of the seeded dense run: equal on the CPU; GPU kernels may differ in the
    last bits from run to run."""
    if device.type == "cpu":
        return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    return a.keys() == b.keys() and all(torch.allclose(a[k].float(), b[k].float(), atol=1e-4) for k in a)


def _run(task, dense, metrics, cfg, epochs=0, **policy):
    policy = Policy(method="lottery", finetune=FinetuneConfig(epochs=epochs), **policy)
    return engine.run(task, dense, policy, BUDGET, cfg, metrics)


def test_dense_training_keeps_its_step_k_weights_and_a_rerun_reproduces_them(digits_task, digits_dense, engine_cfg):
    path = _dense_file(digits_task, engine_cfg)
    early = load_tensors(rewind_path(path, DENSE_REWIND_STEP), "step-k weights")
    final = cpu_state(digits_dense)
    assert set(early) == set(final) and not all(torch.equal(early[k], final[k]) for k in final)
    # the seeded dense run is deterministic on the CPU: a run stopped at step k has the same weights
    # (with the torch threads it was trained with: float sums differ with them)
    device = _device(digits_dense)
    with using_threads(dense_threads(path) or torch.get_num_threads()):
        rerun = cpu_state(dense_training(digits_task, engine_cfg, digits_task.train_epochs, device, stop=16))
    assert _same_run(rerun, early, device)


def test_unstructured_survivors_are_the_step_k_weights(digits_task, digits_dense, digits_dense_metrics, engine_cfg):
    result = _run(digits_task, digits_dense, digits_dense_metrics, engine_cfg, structure="unstructured")
    assert [(e["phase"], e["step"]) for e in result.events] == [("round 1/1", 0)]
    assert 0.49 <= result.pruned["flops_ratio"] <= 0.50
    early = load_tensors(rewind_path(_dense_file(digits_task, engine_cfg), DENSE_REWIND_STEP), "step-k weights")
    final, got = cpu_state(digits_dense), cpu_state(result.model)
    masked = 0
    for name, module in result.model.named_modules():
        if isinstance(module, PRUNABLE_TYPES):
            key = f"{name}.weight"
            alive = got[key] != 0
            masked += int((~alive).sum())
            assert torch.equal(got[key][alive], early[key][alive])  # rewound, not the final weights
            assert not torch.equal(got[key][alive], final[key][alive])
    assert masked > 0
    masked_keys = {f"{n}.weight" for n, m in result.model.named_modules() if isinstance(m, PRUNABLE_TYPES)}
    for key in set(got) - masked_keys:  # biases, norm layers and their statistics are rewound too
        assert torch.equal(got[key], early[key]), key


def test_channel_survivors_are_the_step_k_weights_kept_slices(
    digits_task, digits_dense, digits_dense_metrics, engine_cfg
):
    result = _run(digits_task, digits_dense, digits_dense_metrics, engine_cfg, structure="channel")
    assert 0.49 <= result.pruned["flops_ratio"] <= 0.50 and result.history
    early = load_tensors(rewind_path(_dense_file(digits_task, engine_cfg), DENSE_REWIND_STEP), "step-k weights")
    final = cpu_state(digits_dense)
    got = cpu_state(result.model)
    # the stem conv reads the image (whose one channel is never pruned): each kept filter is a
    # whole step-k filter, in order; find which by matching them
    rows = early["stem.0.weight"].flatten(1)
    kept = [int(torch.nonzero((rows == r).all(1)).flatten()[0]) for r in got["stem.0.weight"].flatten(1)]
    assert kept == sorted(set(kept)) and len(kept) < len(rows)
    for key in ("stem.0.weight", "stem.1.weight", "stem.1.bias", "stem.1.running_mean", "stem.1.running_var"):
        assert torch.equal(got[key], early[key][kept]), key
        assert not torch.equal(got[key], final[key][kept]), key
    # every layer: the step-k weights with the result's channels removed
    engine.seed_everything(engine_cfg.seed)
    rebuilt = digits_task.model_factory()
    rebuilt.load_state_dict(early)
    replay_history(rebuilt, digits_task.example_input(), result.history)
    assert all(torch.equal(v, got[k]) for k, v in cpu_state(rebuilt).items())


def test_each_round_restarts_from_the_step_k_weights(digits_task, digits_dense, digits_dense_metrics, engine_cfg):
    dense_file = _dense_file(digits_task, engine_cfg)
    assert not rewind_path(dense_file, 5).exists()  # only the default k is kept by dense training
    seen = {}

    def on_pruned(model, ratios):  # the last round's network, rewound, before it is retrained
        seen.update({k: v.clone() for k, v in cpu_state(model).items()})

    policy = Policy(
        method="lottery",
        structure="unstructured",
        method_options={"iterations": 2, "rewind_step": 5},
        finetune=FinetuneConfig(epochs=2),
    )
    result = engine.run(
        digits_task, digits_dense, policy, BUDGET, engine_cfg, digits_dense_metrics, on_pruned=on_pruned
    )
    per_epoch = len(digits_task.loader("train", shuffle=True, seed=0))
    assert [(e["phase"], e["step"]) for e in result.events] == [("round 1/2", 0), ("round 2/2", per_epoch)]
    assert [e["target"] for e in result.events] == pytest.approx([0.5**0.5, 0.5])
    assert len(result.epochs) == 2 and 0.49 <= result.pruned["flops_ratio"] <= 0.50
    # another k than the cached one: the seeded dense run was replayed up to step 5 and cached
    early = load_tensors(rewind_path(dense_file, 5), "step-5 weights")
    device = _device(digits_dense)
    with using_threads(dense_threads(dense_file) or torch.get_num_threads()):
        replayed = dense_training(digits_task, engine_cfg, digits_task.train_epochs, device, stop=5)
    assert _same_run(cpu_state(replayed), early, device)
    got = cpu_state(result.model)
    for name, module in result.model.named_modules():
        if isinstance(module, PRUNABLE_TYPES):
            mask = seen[f"{name}.weight_mask"]
            assert torch.equal(seen[f"{name}.weight_orig"], early[f"{name}.weight"])  # rewound after round 1
            assert torch.equal(got[f"{name}.weight"] != 0, mask.bool())  # the mask held through retraining
    assert not torch.equal(got["stem.0.weight"], seen["stem.0.weight_orig"] * seen["stem.0.weight_mask"])


def test_a_dense_model_it_cannot_rewind_is_refused(digits_task, digits_dense, digits_dense_metrics, engine_cfg):
    def refused(cfg, dense=digits_dense, **options):
        with pytest.raises(AutopruneError, match="method 'lottery' rewinds") as caught:
            _run(digits_task, dense, digits_dense_metrics, cfg, method_options=options)
        return str(caught.value)

    said = refused(dataclasses.replace(engine_cfg, checkpoint="dense.pt"))
    assert "--checkpoint 'dense.pt'" in said and "drop --checkpoint" in said
    assert "--train-epochs 0 asks for an untrained model" in refused(dataclasses.replace(engine_cfg, train_epochs=0))
    foreign = clone(digits_dense)
    with torch.no_grad():
        foreign.fc.bias.add_(1.0)
    assert "no cached dense model has these weights" in refused(engine_cfg, dense=foreign)
    steps = digits_task.train_epochs * len(digits_task.loader("train", shuffle=True, seed=0))
    assert f"took only {steps} steps" in refused(engine_cfg, rewind_step=steps)


def test_channel_rounds_replay_the_whole_history_on_the_step_k_weights(
    digits_task, digits_dense, digits_dense_metrics, engine_cfg
):
    seen = {}

    def on_pruned(model, ratios):  # the last round's network, rewound, before it is retrained
        seen.update({k: v.clone() for k, v in cpu_state(model).items()})

    policy = Policy(method="lottery", method_options={"iterations": 2}, finetune=FinetuneConfig(epochs=2))
    result = engine.run(
        digits_task, digits_dense, policy, BUDGET, engine_cfg, digits_dense_metrics, on_pruned=on_pruned
    )
    assert [e["phase"] for e in result.events] == ["round 1/2", "round 2/2"]
    assert 0.49 <= result.pruned["flops_ratio"] <= 0.50
    early = load_tensors(rewind_path(_dense_file(digits_task, engine_cfg), DENSE_REWIND_STEP), "step-k weights")
    engine.seed_everything(engine_cfg.seed)
    rebuilt = digits_task.model_factory()
    rebuilt.load_state_dict(early)
    replay_history(rebuilt, digits_task.example_input(), result.history)  # both rounds' removals
    assert all(torch.equal(v, seen[k]) for k, v in cpu_state(rebuilt).items())
    assert seen["stem.0.weight"].shape[0] < early["stem.0.weight"].shape[0]
    assert not torch.equal(cpu_state(result.model)["stem.0.weight"], seen["stem.0.weight"])  # then retrained
    for group, ratio in result.ratios.items():  # pruned fractions of the dense widths, over both rounds
        width = dict(digits_dense.named_modules())[group].out_channels
        assert dict(result.model.named_modules())[group].out_channels == width - round(ratio * width), group
