"""AMC's pruning environment (He et al., "AMC: AutoML for Model Compression and Acceleration
on Mobile Devices", ECCV 2018) as a gymnasium environment, ``autoprune/Pruning-v0``.

One episode walks the dense model's channel groups in network order; one step sets one
group's pruned fraction. The observation is AMC's layer embedding (:data:`episode.FEATURES`,
ten features in [0, 1]); the action, a fraction in [0, 1], is clipped to the legal range and
rounded to whole channels before it is applied, so every finished allocation meets the hard
budget (FLOPs, parameters, or latency as the hardware's latency table predicts it). The
reward comes at the end of the episode (0.0 before): the pruned network, not fine-tuned, is
evaluated on the task's validation split (held out from the training data, never the test
split) after its BN statistics are recomputed on a few training batches (EagleEye, Li et al.
2020). Its forms (:func:`episode.reward`): the accuracy; AMC's ``-error * log(FLOPs)``; and
MnasNet's ``acc * (latency / target) ** w`` (Tan et al. 2019), on the latency the table
predicts, so the reward does not depend on what runs beside the episode.

The pruning itself is the shared engine's (:func:`autoprune.engine.run` with an ``exact``
per-group policy), so an episode's network is exactly the one ``autoprune prune`` would give.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

import gymnasium
import numpy as np
import torch
from gymnasium import spaces

from autoprune import engine as engine_mod
from autoprune.config import REWARDS, AgentConfig, Budget, EngineConfig, Policy, TaskConfig
from autoprune.engine.allocation import AllocationSpace, allocation_space
from autoprune.engine.tasks import check_task_config, get_task
from autoprune.errors import AutopruneError

from .episode import FEATURES, RewardSpec, Walk, episode_policy

_AGENT_KEYWORDS = (
    "reward",
    "reward_weight",
    "reward_weight_below",
    "reward_target",
    "criterion",
    "recalibrate_batches",
)


@contextlib.contextmanager
def _engine_work(threads: int | None, device: torch.device):
    """Torch's intra-op threads at ``threads`` (unchanged when None), and the caller's global
    random states (torch, numpy) restored afterwards: the engine reseeds them, which would
    otherwise reset an agent's exploration noise and minibatch sampling every episode."""
    saved_threads, saved_numpy = torch.get_num_threads(), np.random.get_state()
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        if threads is not None:
            torch.set_num_threads(threads)
        try:
            yield
        finally:
            torch.set_num_threads(saved_threads)
            np.random.set_state(saved_numpy)


def _budget(budget: Budget | tuple[str, float] | float | None) -> Budget:
    if budget is None:
        return Budget()
    if isinstance(budget, Budget):
        return budget
    if isinstance(budget, (int, float)) and not isinstance(budget, bool):
        return Budget("flops", float(budget))
    if isinstance(budget, (tuple, list)) and len(budget) == 2:
        return Budget(*budget)
    raise AutopruneError(
        f"PruningEnv budget must be a Budget, a (kind, fraction) pair such as ('latency', 0.7) or a FLOPs "
        f"fraction, got {budget!r}"
    )


def _task_config(task: TaskConfig | str | None, cfg: EngineConfig) -> TaskConfig:
    if task is None:
        return cfg.task
    if isinstance(task, TaskConfig):
        return task
    if isinstance(task, str):
        return TaskConfig(name=task)
    raise AutopruneError(f"PruningEnv task must be a TaskConfig or a task name, got {type(task).__name__}")


class PruningEnv(gymnasium.Env):
    """AMC's channel-pruning episode over one dense model (see the module docstring).

    Keywords (all optional; the defaults are those of :mod:`autoprune.config`):
    ``task`` (a :class:`TaskConfig` or a task name; default the engine's task, digits),
    ``budget`` (a :class:`Budget`, ``(kind, fraction)`` or a FLOPs fraction; the hard budget
    the action clip keeps), ``reward`` (``acc``, ``acc_flops`` or ``acc_latency``),
    ``reward_weight`` and ``reward_target`` (``acc_latency``'s exponent, and its target as a
    fraction of the dense predicted latency, default the budget's fraction), ``criterion``
    (which channels go within a group: any registered criterion), ``engine`` (an
    :class:`EngineConfig`: dense model, cache, device, latency batch and threads),
    ``max_ratio`` (no group loses more of its channels), ``recalibrate_batches`` (training
    batches that recompute BN statistics before the accuracy is taken), ``threads`` (torch's
    intra-op threads while the environment works; default: left as they are) and ``seed``
    (the episodes' engine seed: recalibration batches, a random criterion; default the
    engine's seed, which always trains the dense model).

    ``info``: every step has ``ratio`` (the fraction applied) and ``legal`` (the range it was
    clipped to); the last step adds the task's metric (``val_acc``), ``flops``, ``flops_ratio``, ``params_ratio``,
    ``ratios`` (applied fraction per group), ``actions`` (as proposed) and, when a latency
    table exists (``acc_latency`` or a latency budget), ``latency_predicted_ms`` and ``latency_ratio``
    (predicted).
    """

    metadata: dict[str, Any] = {"render_modes": []}

    def __init__(
        self,
        *,
        task: TaskConfig | str | None = None,
        budget: Budget | tuple[str, float] | float | None = None,
        reward: str | None = None,
        criterion: str | None = None,
        engine: EngineConfig | None = None,
        max_ratio: float | None = None,
        recalibrate_batches: int | None = None,
        reward_weight: float | None = None,
        reward_weight_below: float | None = None,
        reward_target: float | None = None,
        threads: int | None = None,
        seed: int | None = None,
        render_mode: str | None = None,
    ) -> None:
        super().__init__()
        if render_mode is not None:
            raise AutopruneError(f"PruningEnv renders nothing: render_mode must be None, got {render_mode!r}")
        if reward is not None and reward not in REWARDS:
            raise AutopruneError(f"PruningEnv reward must be one of: {', '.join(REWARDS)}; got {reward!r}")
        values = (reward, reward_weight, reward_weight_below, reward_target, criterion, recalibrate_batches)
        given = dict(zip(_AGENT_KEYWORDS, values))
        self.agent = AgentConfig(**{k: v for k, v in given.items() if v is not None})
        cfg = engine if engine is not None else EngineConfig(progress=False)
        if not isinstance(cfg, EngineConfig):
            raise AutopruneError(f"PruningEnv engine must be an EngineConfig, got {type(cfg).__name__}")
        cfg = dataclasses.replace(cfg, task=_task_config(task, cfg))
        self.budget = _budget(budget)
        self.max_ratio = Policy().max_ratio if max_ratio is None else max_ratio
        engine_mod.check_policy(Policy(criterion=self.agent.criterion, max_ratio=self.max_ratio))
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
            raise AutopruneError(f"PruningEnv threads must be an integer >= 1 (or None), got {threads!r}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
            raise AutopruneError(f"PruningEnv seed must be an integer >= 0 (or None), got {seed!r}")
        check_task_config(cfg.task)
        self.threads, self.cfg = threads, cfg
        self.run_cfg = cfg if seed is None else dataclasses.replace(cfg, seed=seed)
        self.device = engine_mod.resolve_device(cfg.device)

        with _engine_work(threads, self.device):
            self.task = get_task(cfg.task)
            self.dense = engine_mod.dense_model(self.task, cfg, log=lambda _: None)
            self.dense_metrics = engine_mod.measure_model(self.dense, self.task, cfg.measure, latency=False)
            self.latency = None
            try:  # cached beside the dense model: the info dict's predicted latency
                self.latency = engine_mod.task_latency_table(self.dense, self.task, cfg)
            except Exception:
                if self.agent.reward == "acc_latency" or self.budget.kind == "latency":
                    raise  # the reward or the budget needs it
            example = self.task.example_input().to(self.device)
            self.space: AllocationSpace = allocation_space(self.dense, example, self.max_ratio, self.latency)
        self.walk = Walk(self.space, self.budget.kind, self.budget.fraction)  # raises when out of reach
        self.reward_spec = RewardSpec.of(self.agent, self.budget.fraction, self.latency)
        self.observation_space = spaces.Box(0.0, 1.0, (len(FEATURES),), np.float32)
        self.action_space = spaces.Box(0.0, 1.0, (1,), np.float32)

    @property
    def groups(self) -> list[str]:
        """The channel groups an episode walks, in order."""
        return [g.name for g in self.space.groups]

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        return self.walk.reset(), {}

    def step(self, action):
        if self.walk.done:
            raise AutopruneError("the episode is over: call reset() before step()")
        value = np.asarray(action, dtype=np.float64).reshape(-1)
        if value.size != 1 or not np.isfinite(value[0]):
            raise AutopruneError(f"PruningEnv takes one finite pruned fraction per step, got {action!r}")
        obs, applied = self.walk.step(float(value[0]))
        info: dict[str, Any] = {"ratio": applied, "legal": self.walk.ranges[-1]}
        if not self.walk.done:
            return obs, 0.0, False, False, info
        info.update(self.evaluate())
        return obs, self.reward_of(info), True, False, info

    def evaluate(self) -> dict[str, Any]:
        """Prune the finished allocation through the engine and measure it (not fine-tuned)."""
        fields = episode_policy(
            self.walk.ratios(), self.agent.criterion, self.agent.recalibrate_batches, self.max_ratio
        )
        policy = Policy.from_dict(fields)
        with _engine_work(self.threads, self.device):
            result = engine_mod.run(
                self.task,
                self.dense,
                policy,
                self.budget,
                self.run_cfg,
                self.dense_metrics,
                latency=self.latency,
                measure_latency=False,
            )
        pruned = result.pruned
        out = {k: float(pruned[k]) for k in (self.task.metric_key(), "flops", "flops_ratio", "params_ratio")}
        if self.latency is not None:
            out["latency_predicted_ms"] = float(pruned["latency_predicted_ms"])
            out["latency_ratio"] = float(pruned["latency_ratio"])
        out["ratios"] = self.walk.ratios()
        out["actions"] = list(self.walk.actions)
        return out

    def reward_of(self, metrics: dict[str, Any]) -> float:
        """The episode's reward from its final metrics (the task's, e.g. ``val_acc``; ``flops``,
        ``latency_predicted_ms``)."""
        score = metrics[self.task.metric_key()]
        return self.reward_spec(score, metrics.get("flops"), metrics.get("latency_predicted_ms"))

    @property
    def target_ms(self) -> float | None:
        """``acc_latency``'s target latency (ms), or None without a latency table."""
        return self.reward_spec.target_ms
