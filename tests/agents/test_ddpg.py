"""AMC's DDPG agent on a synthetic allocation problem: it learns, it is seeded, it checkpoints exactly,
and it explores as AMC does (uniform warm-up, then truncated-normal noise around the actor)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from autoprune.agents.ddpg import DDPG, DDPGConfig

BEST = np.array([0.2, 0.7, 0.4, 0.9, 0.1])  # the known best action of each of the N steps
N = len(BEST)
OBS_DIM = N + 1  # one-hot step (all zeros after the last step) + the previous action

# Random actions score 1 - 4 * E[(U - b)^2] = 0.30 on average (per-episode std 0.34), so the difference
# between two means of 20 random episodes has std 0.106: 0.4 is 3.8 of those std (no random pair out of
# 5000 simulated reached it). Measured with the test's config (150 episodes, last 20 against the 20
# warm-up ones) over seeds 0-19: margin 0.48 to 0.83, mean 0.64; seed 0 (the one used): 0.83.
LEARNING_MARGIN = 0.4
LAST_K = 20  # episodes averaged at the end of training

# Short test runs: 20 warm-up episodes instead of 10 to give the buffer a minibatch's worth of random
# steps, and 64 hidden units instead of 300 (same architecture; ~2.5x cheaper per update on a CPU and
# it learns this 6-input toy sooner). Everything else is AMC's default.
LEARN_CFG = DDPGConfig(warmup_episodes=20, hidden=64)
# Learning after one warm-up episode, from minibatches of 8, so that a few episodes exercise updates.
QUICK_CFG = DDPGConfig(warmup_episodes=1, batch=8, hidden=32)


def _obs(step: int, prev: float) -> np.ndarray:
    o = np.zeros(OBS_DIM, np.float32)
    if step < N:
        o[step] = 1.0
    o[N] = prev
    return o


def _episode(agent: DDPG, episode: int) -> tuple[list, float, list[float]]:
    """One episode of the toy problem: transitions, final reward, actions."""
    prev, transitions, actions = 0.0, [], []
    for i in range(N):
        s = _obs(i, prev)
        a = agent.act(s, episode)
        transitions.append((s, a, _obs(i + 1, a), i == N - 1))
        actions.append(a)
        prev = a
    reward = 1.0 - 4.0 * float(np.mean((np.array(actions) - BEST) ** 2))
    return transitions, reward, actions


def _run(agent: DDPG, episodes: range) -> tuple[list[float], list[dict[str, float]]]:
    """Play and learn ``episodes``; all actions taken and all learn() stats."""
    actions, stats_ = [], []
    for ep in episodes:
        transitions, reward, acts = _episode(agent, ep)
        actions += acts
        stats_.append(agent.learn(transitions, reward))
    return actions, stats_


def test_agent_learns_the_best_allocation():
    agent = DDPG(OBS_DIM, LEARN_CFG, seed=0)
    rewards = []
    for ep in range(150):
        transitions, reward, _ = _episode(agent, ep)
        agent.learn(transitions, reward)
        rewards.append(reward)
    warmup = float(np.mean(rewards[: LEARN_CFG.warmup_episodes]))
    last = float(np.mean(rewards[-LAST_K:]))
    assert last - warmup >= LEARNING_MARGIN, (warmup, last)


def test_same_seed_same_actions_and_learning():
    a, b, c = DDPG(OBS_DIM, QUICK_CFG, seed=3), DDPG(OBS_DIM, QUICK_CFG, seed=3), DDPG(OBS_DIM, QUICK_CFG, seed=4)
    acts_a, stats_a = _run(a, range(5))
    acts_b, stats_b = _run(b, range(5))
    acts_c, _ = _run(c, range(5))
    assert acts_a == acts_b
    np.testing.assert_equal(stats_a, stats_b)
    assert acts_a != acts_c
    assert math.isnan(stats_a[0]["critic_loss"]) and math.isfinite(stats_a[-1]["critic_loss"])  # updates ran
    assert a.updates == 4 * N * QUICK_CFG.updates_per_step
    for p, q in zip(a.actor.parameters(), b.actor.parameters()):
        assert torch.equal(p, q)


def test_baseline_and_advantage():
    agent = DDPG(OBS_DIM, QUICK_CFG, seed=0)
    transitions, _, _ = _episode(agent, 0)
    first = agent.learn(transitions, 0.8)
    assert (first["baseline"], first["advantage"]) == (0.8, 0.0)  # the baseline starts at the first reward
    second = agent.learn(transitions, 0.2)
    assert second["baseline"] == pytest.approx(0.8) and second["advantage"] == pytest.approx(-0.6)
    assert agent.baseline == pytest.approx(0.5)  # b += 0.5 (R - b)
    assert agent.buf_reward[N : 2 * N].flatten().tolist() == pytest.approx([-0.6] * N)  # every step, same value


def test_state_dict_round_trip(tmp_path):
    a = DDPG(OBS_DIM, QUICK_CFG, seed=1)
    _run(a, range(6))
    state = a.state_dict()
    path = tmp_path / "agent.pt"
    torch.save(state, path)
    b, c = DDPG(OBS_DIM, QUICK_CFG, seed=99), DDPG(OBS_DIM, QUICK_CFG, seed=7)
    b.load_state_dict(state)
    c.load_state_dict(torch.load(path, weights_only=True))  # plain data only
    acts_a, stats_a = _run(a, range(6, 10))
    acts_b, stats_b = _run(b, range(6, 10))
    acts_c, stats_c = _run(c, range(6, 10))
    assert acts_a == acts_b == acts_c
    np.testing.assert_equal(stats_a, stats_b)
    np.testing.assert_equal(stats_a, stats_c)
    assert math.isfinite(stats_a[-1]["critic_loss"])
    for net in ("actor", "critic", "actor_target", "critic_target"):
        for p, q in zip(getattr(a, net).parameters(), getattr(c, net).parameters()):
            assert torch.equal(p, q)
    # The state is a copy: the agent's later learning did not change it.
    torch.testing.assert_close(state["buf_obs"], torch.load(path, weights_only=True)["buf_obs"])


def test_exploration_is_uniform_then_truncated_normal():
    cfg = DDPGConfig(warmup_episodes=3, hidden=32)
    agent = DDPG(OBS_DIM, cfg, seed=0)
    obs = _obs(2, 0.5)
    warm = np.array([agent.act(obs, ep % 3) for ep in range(2000)])
    assert warm.min() >= 0.0 and warm.max() <= 1.0
    assert stats.kstest(warm, "uniform").pvalue > 0.01
    mu = agent.greedy(obs)
    for episode in (3, 23):  # sigma 0.5, then 0.5 * 0.95 ** 20
        sigma = cfg.sigma * cfg.sigma_decay ** (episode - 3)
        later = np.array([agent.act(obs, episode) for _ in range(2000)])
        assert later.min() >= 0.0 and later.max() <= 1.0
        assert not np.any((later == 0.0) | (later == 1.0))  # truncated, not clipped: no mass on the bounds
        truncated = stats.truncnorm((0 - mu) / sigma, (1 - mu) / sigma, loc=mu, scale=sigma)
        assert stats.kstest(later, truncated.cdf).pvalue > 0.01
    still = DDPG(OBS_DIM, DDPGConfig(warmup_episodes=3, hidden=32, sigma=1e-6), seed=0)
    for step in range(N):
        obs = _obs(step, 0.3)
        assert 0.0 <= still.act(obs, 3) <= 1.0
        assert still.act(obs, 10) == pytest.approx(still.greedy(obs), abs=1e-3)
