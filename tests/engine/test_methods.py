"""Pruning methods: each reaches its budget, and each does what its name promises
(docs/src/design/pruning.md, "Methods"): the iterative and gradual schedules, rewinding, pruning at init.

The shared tests run over the method registry: a new method is one module under
``autoprune/engine/methods/`` plus its row in ``ROWS``."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import pytest
import torch

from autoprune import engine
from autoprune.config import Budget, FinetuneConfig, Policy
from autoprune.engine.graph import PrunableGraph, clone
from autoprune.engine.methods import GRADUAL_END, METHODS, Method, cubic_fraction, gradual_steps, make_method
from autoprune.engine.solver import max_pruned
from autoprune.errors import AutopruneError

BUDGET = Budget("flops", 0.5)


@dataclass(frozen=True)
class Row:
    """What a method promises in the shared tests."""

    in_steps: bool  # prunes in several steps (a policy with exact ratios refuses it)
    phases: tuple[str, ...]  # the phases its pruning steps log, default options, one fine-tuning epoch on digits


ROWS = {
    "oneshot": Row(False, ("before fine-tuning",)),
    "rewind": Row(False, ("before retraining",)),
    "init": Row(False, ("at initialisation",)),
    "iterative": Row(True, tuple(f"round {i}/3" for i in range(1, 4))),
    "gradual": Row(True, tuple(f"step {i}/10" for i in range(1, 11))),
    "sfp": Row(False, ("soft prune 1/2", "soft prune 2/2")),
    "slimming": Row(False, ("after sparsifying",)),
    "group_lasso": Row(False, ("after sparsifying",)),
    "set": Row(False, ("initial masks", "final masks")),
    "rigl": Row(False, ("initial masks", "final masks")),
    "hardconcrete": Row(False, ("gates trained",)),
    "lottery": Row(True, ("round 1/1",)),  # rounds: at most one per fine-tuning epoch
}


@pytest.fixture(scope="module")
def short_cfg(engine_cfg):
    """init trains from scratch for ``train_epochs``: keep it short."""
    return dataclasses.replace(engine_cfg, train_epochs=1)


def _run(task, dense, metrics, cfg, **policy):
    policy.setdefault("finetune", FinetuneConfig(epochs=1))
    return engine.run(task, dense, Policy(**policy), BUDGET, cfg, metrics)


def test_every_method_is_one_module_with_a_test_row():
    assert set(METHODS.names()) == set(ROWS)
    for name in METHODS.names():
        cls = METHODS.get(name)
        assert issubclass(cls, Method) and cls.name == name
        assert cls.__module__ == f"autoprune.engine.methods.{name}"
        assert cls.summary.strip() and "\n" not in cls.summary
        assert set(cls.defaults) == set(cls.options)
        for key, spec in cls.options.items():
            assert spec.check(cls.defaults[key], key) == cls.defaults[key]
        assert cls.in_steps == ROWS[name].in_steps


@pytest.mark.parametrize("method", METHODS.names())
def test_exact_ratios_refuse_exactly_the_methods_that_prune_in_steps(method):
    """config.py names the stepwise methods itself (it imports no engine): it must agree with
    the registry."""

    def policy():
        return Policy(scope="per_layer", ratios={"stem.0": 0.2}, exact=True, method=method)

    if METHODS.get(method).in_steps:
        with pytest.raises(AutopruneError, match=f"method {method!r} prunes in steps"):
            policy()
    else:
        assert policy().method == method


def test_methods_are_taken_by_name_or_as_objects():
    method = make_method("oneshot")
    assert isinstance(method, METHODS.get("oneshot")) and make_method(method) is method
    with pytest.raises(AutopruneError, match="unknown method 'lotto'; choose one of: oneshot"):
        make_method("lotto")


@pytest.mark.parametrize("method", METHODS.names())
def test_an_option_the_method_lacks_is_refused_with_the_ones_it_has(method):
    cls = METHODS.get(method)
    with pytest.raises(AutopruneError, match=f"method {method!r} has no option 'warp'") as refused:
        engine.check_policy(Policy(method=method, method_options={"warp": 2}))
    assert (", ".join(cls.options) or "none") in str(refused.value)
    for key, default in cls.defaults.items():  # the defaults fill what a policy leaves unset
        assert make_method(method).settings(Policy(method=method))[key] == default


@pytest.mark.parametrize(
    "method, structure",
    [(m, s) for m in METHODS.names() for s in ("channel", "unstructured") if s in METHODS.get(m).structures],
)
def test_each_method_reaches_its_budget_and_its_model_reloads(
    digits_task, digits_dense, digits_dense_metrics, short_cfg, method, structure, tmp_path
):
    from autoprune.engine.checkpoint import load_model, save_model

    policy = Policy(structure=structure, criterion="snip", method=method, finetune=FinetuneConfig(epochs=1))
    result = engine.run(digits_task, digits_dense, policy, BUDGET, short_cfg, digits_dense_metrics)
    assert tuple(e["phase"] for e in result.events) == ROWS[method].phases
    assert 0.49 <= result.pruned["flops_ratio"] <= 0.50
    assert result.events and result.events[-1]["target"] == BUDGET.fraction
    assert result.events[-1]["reached"] == pytest.approx(result.pruned["flops_ratio"], abs=1e-9)
    assert result.pruned["val_acc"] > 0.5  # trained, not broken
    assert set(result.collapse) == {"kept_fraction", "at_floor", "empty"}
    # the saved model (a channel model: its history replayed on a fresh dense one) computes the same outputs
    save_model(tmp_path / "m.pt", result.model, short_cfg.task, structure, result.history, policy.to_dict(), {})
    model, _, _ = load_model(tmp_path / "m.pt")
    x = next(iter(digits_task.loader("test")))[0]
    torch.testing.assert_close(model(x), result.model.eval()(x), rtol=0, atol=0)
    assert set(model.state_dict()) == set(result.model.state_dict())


@pytest.mark.parametrize("method", [m for m in METHODS.names() if len(METHODS.get(m).structures) == 1])
def test_a_method_refuses_a_structure_it_does_not_prune(method):
    cls = METHODS.get(method)
    other = next(s for s in ("channel", "unstructured") if s not in cls.structures)
    with pytest.raises(
        AutopruneError, match=f"method {method!r} prunes structure\\(s\\) {cls.structures[0]}, not {other!r}"
    ):
        engine.check_policy(Policy(method=method, structure=other, criterion="magnitude"))


@pytest.mark.parametrize("structure", ["unstructured", "channel"])
def test_gradual_follows_the_cubic_schedule(digits_task, digits_dense, digits_dense_metrics, engine_cfg, structure):
    epochs, n = 2, 6
    result = _run(
        digits_task,
        digits_dense,
        digits_dense_metrics,
        engine_cfg,
        structure=structure,
        criterion="magnitude",
        method="gradual",
        method_options={"iterations": n},
        finetune=FinetuneConfig(epochs=epochs),
    )
    total = epochs * len(digits_task.loader("train", shuffle=True, seed=0))
    end = round(GRADUAL_END * total)
    steps = [e["step"] for e in result.events]
    assert steps == [round(i * end / n) for i in range(1, n + 1)] == gradual_steps(total, n)
    reached = [e["reached"] for e in result.events]
    for step, r in zip(steps, reached):
        s_f = 1 - BUDGET.fraction
        target = 1 - s_f * (1 - (1 - step / end) ** 3)  # Zhu & Gupta's s_t, as a kept fraction
        assert cubic_fraction(step, end, BUDGET.fraction) == pytest.approx(target)
        # the live model's measured cost at that step (effective FLOPs for masks)
        assert target - 0.01 <= r <= target + 1e-9
    assert all(a > b for a, b in zip(reached, reached[1:]))  # pruning only grows
    assert result.pruned["flops_ratio"] == pytest.approx(reached[-1], abs=1e-9)


def test_iterative_rounds_approach_the_budget_geometrically(
    digits_task, digits_dense, digits_dense_metrics, engine_cfg
):
    k = 3
    result = _run(
        digits_task,
        digits_dense,
        digits_dense_metrics,
        engine_cfg,
        structure="channel",
        criterion="magnitude",
        method="iterative",
        method_options={"iterations": k},
        max_ratio=0.35,
        scope="global",
        finetune=FinetuneConfig(epochs=3),
    )
    assert [e["target"] for e in result.events] == pytest.approx([0.5 ** (i / k) for i in range(1, k + 1)])
    for e in result.events:
        assert e["target"] - 0.011 <= e["reached"] <= e["target"] + 1e-9
    per_epoch = len(digits_task.loader("train", shuffle=True, seed=0))
    assert [e["step"] for e in result.events] == [0, per_epoch, 2 * per_epoch]  # one epoch per round
    assert len(result.epochs) == 3
    # max_ratio 0.35 holds against the dense widths, not round by round (0.35 per round
    # would compound to 0.73 over three rounds)
    for g, kept in result.collapse["kept_fraction"].items():
        assert kept >= 0.65 - 1e-9, (g, kept)
    assert result.collapse["at_floor"], "the cap must bind for this test to mean anything"


def test_iterative_unstructured_masks_only_grow(digits_task, digits_dense, digits_dense_metrics, engine_cfg):
    result = _run(
        digits_task,
        digits_dense,
        digits_dense_metrics,
        engine_cfg,
        structure="unstructured",
        criterion="random",
        method="iterative",
        method_options={"iterations": 2},
        finetune=FinetuneConfig(epochs=2),
    )
    # random scores would revive weights masked in round 1 if masks were not kept
    assert result.pruned["flops_ratio"] == pytest.approx(0.5, abs=0.005)
    assert result.events[0]["reached"] == pytest.approx(0.5**0.5, abs=0.005)


def test_rewind_is_fine_tuning_at_the_original_learning_rate(
    digits_task, digits_dense, digits_dense_metrics, engine_cfg
):
    """Known answer: rewind == oneshot whose fine-tuning uses the dense recipe's peak lr and
    cosine schedule; and it differs from oneshot at the fine-tuning lr."""
    ft = FinetuneConfig(epochs=1, lr=0.01, schedule="constant")
    rewound = _run(
        digits_task, digits_dense, digits_dense_metrics, engine_cfg, criterion="magnitude", method="rewind", finetune=ft
    )
    same = _run(
        digits_task,
        digits_dense,
        digits_dense_metrics,
        engine_cfg,
        criterion="magnitude",
        method="oneshot",
        finetune=dataclasses.replace(ft, lr=digits_task.train_lr, schedule="cosine"),
    )
    plain = _run(
        digits_task,
        digits_dense,
        digits_dense_metrics,
        engine_cfg,
        criterion="magnitude",
        method="oneshot",
        finetune=ft,
    )
    a, b, c = (r.model.state_dict() for r in (rewound, same, plain))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_init_prunes_the_untrained_network_before_any_training_step(digits_task, digits_dense, engine_cfg):
    def run(train_epochs):
        cfg = dataclasses.replace(engine_cfg, train_epochs=train_epochs)
        policy = Policy(
            structure="unstructured", criterion="snip", method="init", scope="global", finetune=FinetuneConfig(epochs=0)
        )
        return engine.run(digits_task, digits_dense, policy, BUDGET, cfg)

    untrained = run(0)
    engine.seed_everything(engine_cfg.seed)
    fresh = digits_task.model_factory().state_dict()
    pruned0 = untrained.model.state_dict()
    trained = run(2).model.state_dict()
    dense = digits_dense.state_dict()
    for name, m in untrained.model.named_modules():
        if isinstance(m, torch.nn.Conv2d | torch.nn.Linear):
            key = f"{name}.weight"
            keep = pruned0[key] != 0
            # the kept weights are the untrained ones: pruning happened before any step
            assert torch.equal(pruned0[key][keep], fresh[key][keep])
            assert not torch.equal(pruned0[key], dense[key])
            # the mask chosen at initialisation is held through training from scratch
            assert torch.equal(trained[key] != 0, keep)
            assert not torch.equal(trained[key], pruned0[key])
    assert untrained.events[0]["step"] == 0 and untrained.events[0]["phase"] == "at initialisation"


def test_collapse_report_names_groups_at_their_floor(digits_task, digits_dense, digits_dense_metrics, engine_cfg):
    # per_layer asks stem.0 for more than max_ratio allows, whatever the weights are (a global
    # scope reaches the cap or not depending on the trained weights)
    ratios = {
        g: 0.2 for g in ("layers.0.conv1", "layers.1.conv1", "layers.2.conv1", "layers.3.conv1", "layers.2.shortcut.0")
    } | {"stem.0": 0.99}
    result = engine.run(
        digits_task,
        digits_dense,
        Policy(
            criterion="magnitude", scope="per_layer", ratios=ratios, max_ratio=0.5, finetune=FinetuneConfig(epochs=0)
        ),
        Budget("flops", 0.6),
        engine_cfg,
        digits_dense_metrics,
    )
    kept = result.collapse["kept_fraction"]
    assert set(kept) == set(result.ratios)
    floor = result.collapse["at_floor"]
    assert "stem.0" in floor, "stem.0 asked for 0.99 with max_ratio 0.5 must be at the cap"
    model_groups = PrunableGraph(clone(digits_dense), digits_task.example_input()).groups
    sizes = {g.name: g.size for g in model_groups}
    for g, frac in kept.items():
        removed = round((1 - frac) * sizes[g])
        assert (g in floor) == (removed >= max_pruned(sizes[g], 0.5))
