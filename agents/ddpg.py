"""The DDPG agent of AMC (He et al., "AMC: AutoML for Model Compression and Acceleration on Mobile
Devices", ECCV 2018), written from the paper's description in plain torch + numpy.

The agent walks the layers of a network one step at a time: it sees the layer's embedding
(``obs``) and answers one continuous action in [0, 1] (the layer's pruning ratio, before any
budget correction). An episode earns one reward at its end; every step of the episode is stored
in the replay buffer with that reward minus a moving-average baseline (AMC's variance reduction),
and DDPG (Lillicrap et al. 2016) learns from minibatches of the buffer with target networks.

Exploration follows AMC: uniform random actions for the warm-up episodes, then a normal
distribution centred on the actor's output, truncated to [0, 1], whose std decays
exponentially per episode.

Everything random is seeded by the agent's ``seed``: network initialisation (in a forked torch
RNG, so the global torch RNG is untouched) and the agent's own numpy Generator (exploration and
minibatches). After initialisation the agent draws nothing from torch, so its numpy Generator's
state is the whole random state that :meth:`DDPG.state_dict` has to carry.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy.special import ndtr, ndtri
from torch import nn

from autoprune.schema import MAX_BATCH, checked, integer, number, validate

RATE = number(0.0, 1.0, low_open=True)  # an Adam learning rate
SHARE = number(0.0, 1.0)  # a fraction: soft-update rate, discount, decay

Transition = tuple[np.ndarray, float, np.ndarray, bool]  # (obs, action taken, next obs, done)


@dataclass(frozen=True)
class DDPGConfig:
    """Hyper-parameters of the agent; the defaults are AMC's (its released search script), but for
    ``warmup_episodes``."""

    hidden: int = checked(
        integer(1, most=4_096), 300
    )  # units in each of the two hidden layers, actor and critic (AMC: 300)
    actor_lr: float = checked(RATE, 1e-4)  # Adam learning rate of the actor (AMC: 1e-4)
    critic_lr: float = checked(RATE, 1e-3)  # Adam learning rate of the critic (AMC: 1e-3)
    tau: float = checked(SHARE, 0.01)  # soft target update: target += tau * (online - target) (AMC: 0.01)
    batch: int = checked(integer(1, most=MAX_BATCH), 64)  # minibatch size (AMC: 64)
    discount: float = checked(SHARE, 1.0)  # discount of the bootstrapped target (AMC: 1)
    sigma: float = checked(
        number(0.0, most=10.0), 0.5
    )  # initial std of the truncated-normal exploration noise (AMC: 0.5)
    sigma_decay: float = checked(SHARE, 0.95)  # sigma multiplier per episode after the warm-up (AMC: 0.95)
    baseline_alpha: float = checked(SHARE, 0.5)  # moving-average baseline: b += alpha * (R - b) (AMC: 0.5)
    buffer: int = checked(integer(1, most=10_000_000), 2000)  # replay buffer capacity, in transitions (AMC's code: 100
    # per layer, 2000 for 20 layers)
    warmup_episodes: int = checked(integer(0, most=100_000), 10)  # episodes of uniform random actions before the actor
    # acts and learning starts (AMC's code: 100 of its 800 episodes)
    updates_per_step: int = checked(
        integer(0, most=100), 1
    )  # gradient updates per stored transition, after the warm-up
    # (AMC: 1)

    def __post_init__(self) -> None:
        validate(self, "DDPGConfig", flags_first=False)


def _mlp(n_in: int, hidden: int, head: list[nn.Module]) -> nn.Sequential:
    return nn.Sequential(nn.Linear(n_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), *head)


def _soft_update(target: nn.Module, online: nn.Module, tau: float) -> None:
    with torch.no_grad():
        for t, o in zip(target.parameters(), online.parameters()):
            t.lerp_(o, tau)


class DDPG:
    """AMC's agent: one scalar action in [0, 1] per step, one reward per episode."""

    def __init__(self, obs_dim: int, config: DDPGConfig = DDPGConfig(), seed: int = 0) -> None:
        self.obs_dim = int(obs_dim)
        self.config = config
        c = config
        with torch.random.fork_rng(devices=[]):  # seeded init without touching the global torch RNG
            torch.manual_seed(seed)
            self.actor = _mlp(obs_dim, c.hidden, [nn.Linear(c.hidden, 1), nn.Sigmoid()])
            self.critic = _mlp(obs_dim + 1, c.hidden, [nn.Linear(c.hidden, 1)])
        self.actor_target = copy.deepcopy(self.actor)
        self.critic_target = copy.deepcopy(self.critic)
        for p in (*self.actor_target.parameters(), *self.critic_target.parameters()):
            p.requires_grad_(False)
        self.actor_optim = torch.optim.Adam(self.actor.parameters(), lr=c.actor_lr)
        self.critic_optim = torch.optim.Adam(self.critic.parameters(), lr=c.critic_lr)
        self.rng = np.random.default_rng(seed)
        # Replay buffer (a ring): float32 tensors, so the state dict loads with weights_only=True.
        self.buf_obs = torch.zeros(c.buffer, obs_dim)
        self.buf_action = torch.zeros(c.buffer, 1)
        self.buf_reward = torch.zeros(c.buffer, 1)
        self.buf_next = torch.zeros(c.buffer, obs_dim)
        self.buf_done = torch.zeros(c.buffer, 1)
        self.buf_pos = 0  # next slot to write
        self.buf_count = 0  # filled slots, at most c.buffer
        self.baseline = 0.0  # moving average of episode rewards; set to the first episode's reward when it arrives
        self.episodes_learned = 0  # learn() calls so far
        self.updates = 0  # gradient updates so far

    # -- acting ---------------------------------------------------------------------------------

    def _obs(self, obs: np.ndarray) -> torch.Tensor:
        x = torch.as_tensor(np.asarray(obs, dtype=np.float32)).reshape(-1)
        if x.numel() != self.obs_dim:
            raise ValueError(f"observation has {x.numel()} values, the agent expects {self.obs_dim}")
        return x

    def greedy(self, obs: np.ndarray) -> float:
        """The actor's output for ``obs``, without noise."""
        with torch.no_grad():
            return float(self.actor(self._obs(obs).unsqueeze(0)).item())

    def sigma(self, episode: int) -> float:
        """Exploration std for episode ``episode`` (after the warm-up)."""
        c = self.config
        return c.sigma * c.sigma_decay ** max(episode - c.warmup_episodes, 0)

    def act(self, obs: np.ndarray, episode: int) -> float:
        """Action in [0, 1] for one step of episode ``episode`` (0-based, in the order episodes were
        started): uniform random during the warm-up, later the actor's output plus truncated-normal
        noise of std :meth:`sigma`."""
        if episode < self.config.warmup_episodes:
            return float(self.rng.uniform(0.0, 1.0))
        mu = self.greedy(obs)
        std = self.sigma(episode)
        u = self.rng.uniform()  # drawn even when std is 0, so the stream does not depend on sigma
        if std <= 0.0 or not math.isfinite(std):
            return mu
        # Inverse-CDF sampling of N(mu, std) restricted to [0, 1]; mu lies in [0, 1], so the
        # interval always holds the mode and its mass never underflows to nothing.
        lo, hi = ndtr((0.0 - mu) / std), ndtr((1.0 - mu) / std)
        x = mu + std * float(ndtri(lo + u * (hi - lo)))
        return float(min(max(x, 0.0), 1.0))  # guards only against rounding at the bounds

    # -- learning -------------------------------------------------------------------------------

    def _store(self, obs: np.ndarray, action: float, reward: float, next_obs: np.ndarray, done: bool) -> None:
        i = self.buf_pos
        self.buf_obs[i] = self._obs(obs)
        self.buf_action[i, 0] = float(action)
        self.buf_reward[i, 0] = float(reward)
        self.buf_next[i] = self._obs(next_obs)
        self.buf_done[i, 0] = float(bool(done))
        self.buf_pos = (i + 1) % self.config.buffer
        self.buf_count = min(self.buf_count + 1, self.config.buffer)

    def _update(self) -> tuple[float, float]:
        c = self.config
        idx = torch.as_tensor(self.rng.integers(0, self.buf_count, size=c.batch))
        s, a, r = self.buf_obs[idx], self.buf_action[idx], self.buf_reward[idx]
        s2, done = self.buf_next[idx], self.buf_done[idx]
        with torch.no_grad():
            q_next = self.critic_target(torch.cat([s2, self.actor_target(s2)], dim=1))
            target = r + c.discount * (1.0 - done) * q_next
        critic_loss = nn.functional.mse_loss(self.critic(torch.cat([s, a], dim=1)), target)
        self.critic_optim.zero_grad()
        critic_loss.backward()
        self.critic_optim.step()
        actor_q = self.critic(torch.cat([s, self.actor(s)], dim=1)).mean()
        self.actor_optim.zero_grad()
        (-actor_q).backward()
        self.actor_optim.step()
        _soft_update(self.actor_target, self.actor, c.tau)
        _soft_update(self.critic_target, self.critic, c.tau)
        self.updates += 1
        return float(critic_loss.item()), float(actor_q.item())

    def learn(self, transitions: list[Transition], reward: float) -> dict[str, float]:
        """Learn from one finished episode: its steps as (obs, action taken, next obs, done) and its
        final reward. Episodes may arrive in any order (several evaluated in parallel).

        Every step is stored with the advantage ``reward - baseline``; the baseline (the first
        episode's reward at first, as in AMC's code) then moves towards ``reward``. Once more than ``warmup_episodes`` episodes have been
        learned and the buffer holds a minibatch, ``len(transitions) * updates_per_step`` DDPG
        updates run. Returns ``baseline`` (the one subtracted), ``advantage``, and the mean
        ``critic_loss`` and ``actor_q`` (Q(s, mu(s))) of the updates, nan when none ran."""
        c = self.config
        baseline = float(reward) if self.episodes_learned == 0 else self.baseline  # starts at the first reward
        advantage = float(reward) - baseline
        for obs, action, next_obs, done in transitions:
            self._store(obs, action, advantage, next_obs, done)
        self.baseline = baseline + c.baseline_alpha * (float(reward) - baseline)
        self.episodes_learned += 1
        losses, qs = [], []
        if self.episodes_learned > c.warmup_episodes and self.buf_count >= c.batch:
            for _ in range(len(transitions) * c.updates_per_step):
                loss, q = self._update()
                losses.append(loss)
                qs.append(q)
        return {
            "baseline": baseline,
            "advantage": advantage,
            "critic_loss": float(np.mean(losses)) if losses else math.nan,
            "actor_q": float(np.mean(qs)) if qs else math.nan,
        }

    # -- checkpointing --------------------------------------------------------------------------

    _NETS = ("actor", "critic", "actor_target", "critic_target", "actor_optim", "critic_optim")
    _BUFFER = ("buf_obs", "buf_action", "buf_reward", "buf_next", "buf_done")
    _SCALARS = ("buf_pos", "buf_count", "baseline", "episodes_learned", "updates")

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly, as tensors, Python numbers, strings and dicts only
        (a copy: it loads with ``torch.load(..., weights_only=True)`` and does not alias the agent)."""
        state: dict[str, Any] = {"obs_dim": self.obs_dim}
        state.update({name: getattr(self, name).state_dict() for name in self._NETS})
        state.update({name: getattr(self, name) for name in self._BUFFER + self._SCALARS})
        state["rng"] = self.rng.bit_generator.state
        return copy.deepcopy(state)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output into an agent of the same ``obs_dim`` and config."""
        state = copy.deepcopy(state)
        if state["obs_dim"] != self.obs_dim or state["buf_obs"].shape != self.buf_obs.shape:
            raise ValueError("state was saved by an agent of another obs_dim or buffer size")
        for name in self._NETS:
            getattr(self, name).load_state_dict(state[name])
        for name in self._BUFFER:
            setattr(self, name, state[name].float())
        for name in self._SCALARS:
            setattr(self, name, type(getattr(self, name))(state[name]))
        self.rng = np.random.Generator(np.random.PCG64())
        self.rng.bit_generator.state = state["rng"]
