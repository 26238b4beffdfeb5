"""The AMC pruning environment (``autoprune/Pruning-v0``, agents/env.py): gymnasium's checker,
the hard budget under random actions (FLOPs by fvcore on really pruned models, latency as
the table predicts it), the reward forms, a stable-baselines3 agent, and bad input.

Every environment here is built on the session's cached digits model (conftest's
``digits_dense``), so nothing is trained again."""

from __future__ import annotations

import math
import sys
import warnings

import gymnasium
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env

from autoprune import engine
from autoprune.agents import ENV_ID
from autoprune.agents.env import PruningEnv
from autoprune.agents.episode import REWARDS, Walk, reward
from autoprune.config import AgentConfig, Budget, EngineConfig, Policy
from autoprune.engine.measure import flops_by_module
from autoprune.engine.prune import prune_channels
from autoprune.errors import AutopruneError

FLOPS_BUDGETS = (0.5, 0.3, 0.1)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tests' own torch work on one thread (the machine is shared); restored after."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="module")
def make(engine_cfg, digits_dense):
    def build(**kwargs) -> gymnasium.Env:
        return gymnasium.make(ENV_ID, engine=engine_cfg, threads=1, **kwargs)

    return build


@pytest.fixture(scope="module")
def env(make) -> gymnasium.Env:
    return make()


def episode(env: gymnasium.Env, actions) -> tuple[float, dict]:
    """Run one whole episode of ``actions``; its final reward and info, after checking every step."""
    obs, info = env.reset(seed=0)
    assert env.observation_space.contains(obs) and info == {}
    n = len(env.unwrapped.groups)
    assert len(actions) == n
    for i, a in enumerate(actions):
        obs, r, terminated, truncated, info = env.step(np.array([a], dtype=np.float32))
        assert env.observation_space.contains(obs) and not truncated
        lo, hi = info["legal"]
        assert lo - 1e-9 <= info["ratio"] <= hi + 1e-9
        assert terminated == (i == n - 1)
        if not terminated:
            assert r == 0.0 and set(info) == {"ratio", "legal"}
    return r, info


def action_sequences(n: int, count: int, seed: int) -> list[list[float]]:
    """All 0, all 1, then uniform random actions (seeded)."""
    rng = np.random.default_rng(seed)
    return [[0.0] * n, [1.0] * n, *(rng.random(n).tolist() for _ in range(count - 2))]


def lowest_magnitude_plan(dense, space, counts) -> dict[str, np.ndarray]:
    """The ``counts[i]`` lowest-L1 output channels of each group's root layer."""
    modules = dict(dense.named_modules())
    plan = {}
    for group, k in zip(space.groups, counts):
        norms = modules[group.name].weight.detach().abs().flatten(1).sum(1).cpu().numpy()
        plan[group.name] = np.argsort(norms, kind="stable")[:k]
    return plan


# ------------------------------------------------------------------ the gymnasium API


def test_check_env_passes_without_warnings(env):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_env(env.unwrapped)
    assert [f"{w.category.__name__}: {w.message}" for w in caught] == []


def test_spaces_and_defaults(env):
    inner = env.unwrapped
    assert isinstance(inner, PruningEnv)
    assert env.observation_space == gymnasium.spaces.Box(0.0, 1.0, (10,), np.float32)
    assert env.action_space == gymnasium.spaces.Box(0.0, 1.0, (1,), np.float32)
    assert inner.budget == Budget()
    assert inner.agent == AgentConfig()
    assert inner.max_ratio == Policy().max_ratio
    assert inner.latency is not None  # cached beside the dense model: the info dict predicts latency
    assert len(inner.groups) >= 2


def test_seed_seeds_the_episodes_not_the_dense_model(make, engine_cfg, digits_dense):
    inner = make(seed=3).unwrapped
    assert inner.run_cfg.seed == 3 and inner.cfg.seed == engine_cfg.seed
    dense = digits_dense.state_dict()
    assert all(torch.equal(v, dense[k]) for k, v in inner.dense.state_dict().items())


def test_make_without_arguments_uses_the_cached_dense_model(monkeypatch, engine_cfg, digits_dense):
    monkeypatch.setenv("AUTOPRUNE_CACHE", engine_cfg.cache_dir)

    def no_training(*args, **kwargs):
        raise AssertionError("gymnasium.make() trained the dense model again instead of using the cache")

    monkeypatch.setattr(sys.modules["autoprune.engine.train"], "train", no_training)
    env = gymnasium.make(ENV_ID)
    inner = env.unwrapped
    assert inner.cfg == EngineConfig(progress=False)
    assert inner.task.name == "digits"
    dense = digits_dense.state_dict()
    assert all(torch.equal(v, dense[k]) for k, v in inner.dense.state_dict().items())
    obs, _ = env.reset(seed=0)
    assert env.observation_space.contains(obs)


def test_an_episode_keeps_to_its_threads_and_leaves_the_callers_random_state(env, monkeypatch):
    inner = env.unwrapped
    run, seen = engine.run, []

    def counting_run(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return run(*args, **kwargs)

    monkeypatch.setattr(engine, "run", counting_run)  # what the env calls
    n = len(inner.groups)
    torch.set_num_threads(2)
    np.random.seed(7)
    torch.manual_seed(7)
    expected = (np.random.random(), torch.rand(3))
    np.random.seed(7)
    torch.manual_seed(7)
    try:
        episode(env, [0.4] * n)  # the engine reseeds both inside
        assert seen == [1] and torch.get_num_threads() == 2  # the env's threads=1 inside, the caller's after
    finally:
        torch.set_num_threads(1)
    assert np.random.random() == expected[0] and torch.equal(torch.rand(3), expected[1])
    with pytest.raises(AutopruneError, match="reset"):
        env.step(np.array([0.5], dtype=np.float32))


# ------------------------------------------------------------------ the hard budget


@pytest.mark.slow
@pytest.mark.parametrize("budget", FLOPS_BUDGETS)
def test_random_allocations_meet_the_flops_budget_really_pruned(env, digits_task, digits_dense, budget):
    """100 action sequences per budget (300 in all): each finished allocation, really pruned
    (its lowest-magnitude channels removed), keeps at most ``budget`` of the dense FLOPs."""
    space = env.unwrapped.space
    example = digits_task.example_input()
    dense_flops = flops_by_module(digits_dense, example)[0]
    walk = Walk(space, "flops", budget)
    for actions in action_sequences(walk.steps, 100, seed=int(budget * 100)):
        walk.reset()
        for a in actions:
            walk.step(a)
        assert walk.done
        pruned, _ = prune_channels(digits_dense, example, lowest_magnitude_plan(digits_dense, space, walk.counts))
        real = flops_by_module(pruned, example)[0] / dense_flops
        assert real <= budget, (actions, walk.counts, real)
        assert real <= walk.fraction("flops") + 1e-9  # the estimate the clip works on is never optimistic
        # and it uses the budget: the allocation is scaled back until it lands within 1% below it
        assert real >= budget - 0.01, (actions, walk.proposed, walk.counts, real)
        assert all(k <= p for k, p in zip(walk.counts, walk.proposed))


@pytest.mark.slow
@pytest.mark.parametrize("budget", FLOPS_BUDGETS)
def test_episodes_end_to_end_meet_the_flops_budget(make, budget):
    env = make(budget=budget)
    n = len(env.unwrapped.groups)
    for actions in action_sequences(n, 7, seed=int(budget * 1000)):
        r, info = episode(env, actions)
        assert budget - 0.01 <= info["flops_ratio"] <= budget
        assert r == info["val_acc"] and 0.0 <= r <= 1.0  # the default reward: accuracy
        assert info["actions"] == pytest.approx(actions)
        assert list(info["ratios"]) == env.unwrapped.groups
        assert max(info["ratios"].values()) <= Policy().max_ratio
        assert 0 < info["latency_ratio"] < 1 and info["latency_predicted_ms"] > 0  # predicted by the table


@pytest.mark.slow
def test_random_allocations_meet_a_latency_budget_as_predicted(make, digits_task, digits_dense):
    smallest = make(reward="acc_latency").unwrapped.space.smallest("latency")  # builds the table once
    budget = round((1.0 + smallest) / 2, 3)  # reachable whatever this machine's timings
    env = make(budget=("latency", budget))
    inner = env.unwrapped
    table, example = inner.latency, digits_task.example_input()
    dense_ms = table.predict()
    walk = Walk(inner.space, "latency", budget)
    for actions in action_sequences(walk.steps, 60, seed=3):
        walk.reset()
        for a in actions:
            walk.step(a)
        pruned, _ = prune_channels(digits_dense, example, lowest_magnitude_plan(digits_dense, inner.space, walk.counts))
        assert table.predict_model(pruned) / dense_ms <= budget + 1e-9, (actions, walk.counts)
    for actions in action_sequences(walk.steps, 3, seed=4):
        _, info = episode(env, actions)
        assert info["latency_ratio"] <= budget + 1e-9
        assert info["latency_predicted_ms"] == pytest.approx(info["latency_ratio"] * dense_ms)


# ------------------------------------------------------------------ rewards


def test_reward_forms_match_their_formulas():
    assert reward("acc", 0.8) == 0.8
    assert reward("acc_flops", 0.8, flops=2.5e6) == pytest.approx(-0.2 * math.log(2.5e6))
    assert reward("acc_latency", 0.8, latency_ms=2.0, target_ms=4.0, weight=-0.07) == pytest.approx(0.8 * 0.5**-0.07)
    assert reward("acc_latency", 0.8, latency_ms=4.0, target_ms=4.0) == pytest.approx(0.8)  # on target: the accuracy
    assert reward("acc_latency", 0.8, latency_ms=8.0, target_ms=4.0) < 0.8  # slower than the target costs
    # MnasNet's hard constraint: no bonus below the target, a steep cost above it
    hard = {"target_ms": 4.0, "weight": -1.0, "weight_below": 0.0}
    assert reward("acc_latency", 0.8, latency_ms=2.0, **hard) == pytest.approx(0.8)
    assert reward("acc_latency", 0.8, latency_ms=8.0, **hard) == pytest.approx(0.4)
    assert reward("acc_flops", 0.9, flops=1e6) > reward("acc_flops", 0.8, flops=1e6)
    assert reward("acc_flops", 0.8, flops=1e5) > reward("acc_flops", 0.8, flops=1e6)
    with pytest.raises(AutopruneError, match="acc, acc_flops, acc_latency"):
        reward("accuracy", 0.8)
    with pytest.raises(AutopruneError, match="FLOPs"):
        reward("acc_flops", 0.8)
    with pytest.raises(AutopruneError, match="latency table"):
        reward("acc_latency", 0.8, latency_ms=2.0)


@pytest.mark.slow
def test_acc_flops_episode_reward_is_the_formula_on_its_info(make):
    env = make(reward="acc_flops")
    r, info = episode(env, [0.3] * len(env.unwrapped.groups))
    assert r == pytest.approx(-(1.0 - info["val_acc"]) * math.log(info["flops"]))
    assert 0.0 < info["flops_ratio"] <= 0.5


@pytest.mark.slow
def test_acc_latency_episode_reward_uses_the_predicted_latency(make):
    env = make(reward="acc_latency", reward_target=0.6, reward_weight=-0.1)
    inner = env.unwrapped
    dense_ms = inner.latency.predict()
    assert inner.target_ms == pytest.approx(0.6 * dense_ms)
    r, info = episode(env, [0.5] * len(inner.groups))
    assert info["latency_ratio"] == pytest.approx(inner.walk.fraction("latency"))  # the allocation's prediction
    assert r == pytest.approx(info["val_acc"] * (info["latency_predicted_ms"] / (0.6 * dense_ms)) ** -0.1)
    assert make(reward="acc_latency").unwrapped.target_ms == pytest.approx(0.5 * dense_ms)  # default: the budget


# ------------------------------------------------------------------ stable-baselines3


@pytest.mark.slow
def test_stable_baselines3_td3_trains_on_it(make):
    from stable_baselines3 import TD3

    env = make()
    agent = TD3(
        "MlpPolicy",
        env,
        learning_starts=30,
        batch_size=32,
        buffer_size=1000,
        policy_kwargs={"net_arch": [32, 32]},
        seed=0,
        device="cpu",
    )
    agent.learn(total_timesteps=300)
    assert agent.num_timesteps >= 300
    episodes = list(agent.ep_info_buffer)
    assert len(episodes) >= 300 // len(env.unwrapped.groups) - 1
    assert all(0.0 <= e["r"] <= 1.0 and e["l"] == len(env.unwrapped.groups) for e in episodes)


# ------------------------------------------------------------------ bad input


def test_unknown_criterion_and_reward_fail_before_any_work(engine_cfg):
    with pytest.raises(AutopruneError, match=r"unknown criterion 'nope'; choose one of: .*magnitude"):
        PruningEnv(engine=engine_cfg, criterion="nope")
    with pytest.raises(AutopruneError, match=", ".join(REWARDS)):
        PruningEnv(engine=engine_cfg, reward="accuracy")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"budget": "half"}, "Budget, a \\(kind, fraction\\) pair"),
        ({"budget": ("time", 0.5)}, "flops, params, latency"),
        ({"budget": 1.5}, "\\(0, 1\\]"),
        ({"task": 3}, "TaskConfig or a task name"),
        ({"task": "no_such_task"}, "unknown task 'no_such_task'"),
        ({"max_ratio": 1.5}, "max_ratio"),
        ({"threads": 0}, "threads must be an integer >= 1"),
        ({"recalibrate_batches": 0}, "recalibrate-batches must be an integer >= 1"),
        ({"render_mode": "human"}, "render_mode must be None"),
        ({"engine": "cfg"}, "engine must be an EngineConfig"),
    ],
)
def test_bad_keywords_name_what_is_allowed(engine_cfg, kwargs, message):
    with pytest.raises(AutopruneError, match=message):
        PruningEnv(**{"engine": engine_cfg, **kwargs})


def test_unreachable_budgets_name_the_reachable_fraction(env, engine_cfg):
    smallest = env.unwrapped.space.smallest("flops")
    with pytest.raises(AutopruneError, match=rf"unreachable.*ask for at least {math.ceil(smallest * 1000) / 1000:g}"):
        PruningEnv(engine=engine_cfg, budget=round(smallest / 2, 4))
    with pytest.raises(AutopruneError, match=r"--budget-latency 0.05 is unreachable.*ask for at least"):
        PruningEnv(engine=engine_cfg, budget=("latency", 0.05))
