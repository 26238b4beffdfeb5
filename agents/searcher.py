"""The AMC agent as a Ray Tune searcher (``autoprune search --searcher amc``).

The driver builds each episode's actions: the DDPG actor (uniform random during the warm-up,
then the actor's output with truncated-normal noise) walks the channel groups of the
:class:`~autoprune.engine.allocation.AllocationSpace`, each action clipped to the legal range,
and the finished allocation becomes the trial's policy (``per_layer`` ratios, ``exact``, BN
recalibration, no fine-tuning unless ``--epochs``). The trial prunes it, recalibrates BN,
takes the validation accuracy and reports the episode's ``reward`` (``autoprune.contract.SEARCHER_KEYS``).
When a trial completes, the agent stores that episode's transitions with the reward and learns.
Episodes run ``--concurrency`` at a time, so an episode may start before earlier ones have
taught the agent anything; episodes that fail teach it nothing. Each trial's config carries
its episode (the walk's transitions) as the searcher's data, so the search's record of the
trial holds it: ``--resume`` replays the recorded episodes into a new agent, in the order
they started, and goes on learning from there (:meth:`AMCSearch.tell_finished`).
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

import numpy as np
import torch
from ray.tune.search import Searcher

from autoprune.config import AgentConfig, Budget
from autoprune.contract import TrialConfig
from autoprune.errors import AutopruneError
from autoprune.search.searchers import SearcherHooks

from .ddpg import DDPG, DDPGConfig
from .episode import FEATURES, RewardSpec, Walk, episode_policy


def ddpg_config(agent: AgentConfig, episodes: int, groups: int | None = None) -> DDPGConfig:
    """The DDPG settings of ``agent`` (its options by field name, checked), with the warm-up
    defaulting to a quarter of the episodes and the replay buffer to 100 transitions per
    group (AMC's code) when the number of ``groups`` is known."""
    fields = {f.name: f for f in dataclasses.fields(DDPGConfig) if f.name != "warmup_episodes"}
    unknown = sorted(set(agent.options) - set(fields))
    if unknown:
        raise AutopruneError(
            f"unknown --agent-option {', '.join(unknown)}; choose from {', '.join(fields)} "
            "(the warm-up is --warmup-episodes)"
        )
    options = {
        name: fields[name].metadata["spec"].check(value, f"--agent-option {name}={value!r}")
        for name, value in agent.options.items()
    }
    if groups and "buffer" not in options:
        options["buffer"] = min(100 * groups, fields["buffer"].metadata["spec"].most)
    return DDPGConfig(**{**options, "warmup_episodes": agent.resolved(episodes).warmup_episodes})


@contextlib.contextmanager
def _one_thread():
    """The agent's networks are tiny: on a machine busy with trials, torch's thread pool only
    slows them down (20-50x measured), so the driver acts and learns on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class AMCSearch(Searcher):
    """AMC's DDPG agent behind Ray Tune's ``Searcher`` interface (see the module docstring)."""

    def __init__(self, space, budget: Budget, episodes: int, seed: int, agent: AgentConfig) -> None:
        super().__init__(metric="reward", mode="max")
        self.walk = Walk(space, budget.kind, budget.fraction)
        self.agent = agent
        self.episodes = episodes
        self.ddpg = DDPG(len(FEATURES), ddpg_config(agent, episodes, len(space.groups)), seed)
        self.started = 0  # episodes suggested so far (their order sets the noise schedule)
        self.pending: dict[str, list] = {}  # trial id -> its episode's transitions, until the trial completes
        self.history: list[dict[str, float]] = []  # per learned episode: reward and the agent's stats

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        return True  # the agent always learns from the trials' "reward"; Tune's metric picks nothing here

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        if self.started >= self.episodes:
            return Searcher.FINISHED
        episode, self.started = self.started, self.started + 1
        obs, transitions = self.walk.reset(), []
        with _one_thread():
            while not self.walk.done:
                action = self.ddpg.act(obs, episode)
                nxt, applied = self.walk.step(action)
                transitions.append((obs, applied, nxt, self.walk.done))
                obs = nxt
        self.pending[trial_id] = transitions
        agent, walk = self.agent, self.walk
        policy = episode_policy(walk.ratios(), agent.criterion, agent.recalibrate_batches, walk.space.max_ratio)
        return TrialConfig(policy, searcher={"episode": episode, "transitions": _plain(transitions)}).to_config()

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        transitions = self.pending.pop(trial_id, None)
        if error or transitions is None or not result or result.get("reward") is None:
            return
        self._learn(transitions, float(result["reward"]))

    def _learn(self, transitions: list, reward: float) -> None:
        with _one_thread():
            stats = self.ddpg.learn(transitions, reward)
        self.history.append({"reward": reward, **stats})

    def tell_finished(self, records: list[dict]) -> None:
        """A resume: learn from the recorded episodes again (those that ended with a reward,
        in the order they started), and go on with the next episode's noise."""
        width = len(FEATURES)
        for rec in records:
            memo = rec["config"].get("searcher") or {}
            reward = rec["report"].get("reward")
            if rec["status"] == "failed" or reward is None:
                continue
            try:
                steps = [
                    (
                        np.asarray(o, np.float32).reshape(width),
                        float(a),
                        np.asarray(n, np.float32).reshape(width),
                        bool(d),
                    )
                    for o, a, n, d in memo["transitions"]
                ]
            except (KeyError, TypeError, ValueError) as exc:
                raise AutopruneError(
                    f"trial record {rec['trial_id']!r} holds no episode the agent can learn from ({exc}); it was altered"
                ) from None
            if len(steps) != len(self.walk.space.groups):
                raise AutopruneError(
                    f"trial record {rec['trial_id']!r} holds an episode of {len(steps)} steps; this model has "
                    f"{len(self.walk.space.groups)} channel groups"
                )
            self._learn(steps, float(reward))
        self.started = max(self.started, len(records))

    # ---- Tune's searcher state, written at its snapshots (a resume reads the trial records
    # instead: tell_finished); plain data, loaded with weights_only=True

    def save(self, checkpoint_path: str) -> None:
        pending = {
            t: [[np.asarray(o).tolist(), float(a), np.asarray(n).tolist(), bool(d)] for o, a, n, d in steps]
            for t, steps in self.pending.items()
        }
        state = {"ddpg": self.ddpg.state_dict(), "started": self.started, "pending": pending, "history": self.history}
        torch.save(state, checkpoint_path)

    def restore(self, checkpoint_path: str) -> None:
        state = torch.load(checkpoint_path, weights_only=True)
        self.ddpg.load_state_dict(state["ddpg"])
        self.started = int(state["started"])
        self.pending = {
            t: [(np.asarray(o, np.float32), a, np.asarray(n, np.float32), d) for o, a, n, d in steps]
            for t, steps in state["pending"].items()
        }
        self.history = list(state["history"])


def _plain(transitions: list) -> list:
    """An episode's transitions as JSON data: observation, action, next observation, done."""
    return [
        [np.asarray(o).astype(float).tolist(), float(a), np.asarray(n).astype(float).tolist(), bool(d)]
        for o, a, n, d in transitions
    ]


def make_amc(ctx) -> AMCSearch:
    """The ``amc`` entry of the searcher registry: ``ctx`` is a ``SearcherContext`` whose
    ``extra`` holds the model's ``allocation`` space and the ``agent`` settings (AMC_HOOKS.context)."""
    if ctx.extra.get("allocation") is None:
        raise AutopruneError("searcher 'amc' needs the model's allocation space (SearcherContext.extra['allocation'])")
    return AMCSearch(ctx.extra["allocation"], ctx.budget, ctx.trials, ctx.seed, ctx.extra.get("agent") or AgentConfig())


@dataclasses.dataclass(frozen=True)
class EpisodeScore:
    """What an AMC trial reports once its model is pruned (the searcher's trial hook):
    ``recal_acc``, the task's validation metric (accuracy, mean IoU) of the pruned model with its BN statistics
    recalibrated by the engine, before any fine-tuning, and the episode's ``reward`` from it."""

    reward: RewardSpec

    def __call__(self, model, task, cost: dict[str, Any], device) -> dict[str, float]:
        from autoprune.engine.train import evaluate

        acc = evaluate(model, task.loader("val", device=device), device, task)
        return {"recal_acc": acc, "reward": self.reward(acc, cost["flops"], cost.get("latency_predicted_ms"))}


class AMCHooks(SearcherHooks):
    """What the AMC agent adds to a search (``search.searchers.SearcherHooks``)."""

    settings = "agent"  # SearchConfig.agent: --reward, --agent-criterion, --agent-option, ...
    report_keys = ("recal_acc", "reward")

    def check(self, config, structures, trials) -> None:
        """Channel pruning, no space, a known criterion, no --metric, valid DDPG options."""
        from autoprune import engine
        from autoprune.config import Policy

        if structures != ("channel",):
            raise AutopruneError(f"searcher {config.searcher!r} allocates channels: it needs --structure channel")
        if config.space != "default":
            raise AutopruneError(
                f"searcher {config.searcher!r} proposes its own per-group allocations; "
                "--space is for the Optuna searchers"
            )
        engine.check_policy(Policy(criterion=config.agent.criterion))
        if config.metric is not None:
            raise AutopruneError(
                f"searcher {config.searcher!r} picks its best episode by its reward (--reward); "
                "--metric is for the others"
            )
        ddpg_config(config.agent, trials)  # checks --agent-option

    def check_task(self, config, task) -> None:
        """The reward is built on a metric in 0..1 where higher is better (accuracy, mean IoU)."""
        if task.metric.mode != "max" or not task.metric.percent:
            raise AutopruneError(
                f"searcher {config.searcher!r} rewards a metric in 0..1 where higher is better (accuracy, mean "
                f"IoU); task {task.name!r} reports {task.metric_key()}: use --searcher tpe, random, nsga2 or grid"
            )

    def context(self, config, dense, task, latency) -> dict[str, Any]:
        from autoprune.config import Policy
        from autoprune.engine.allocation import allocation_space

        example = task.example_input().to(next(dense.parameters()).device)  # traced where the dense model is
        return {"allocation": allocation_space(dense, example, Policy().max_ratio, latency), "agent": config.agent}

    def trial_hook(self, config, latency) -> EpisodeScore:
        return EpisodeScore(RewardSpec.of(config.agent, config.budget.fraction, latency))

    def describe(self, config) -> str:
        return f"reward {config.agent.reward}"

    def summary(self, config) -> dict[str, Any]:
        return {"agent": dataclasses.asdict(config.agent)}

    def needs_latency(self, config) -> bool:
        return config.agent.reward == "acc_latency"


AMC_HOOKS = AMCHooks()
