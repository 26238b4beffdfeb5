"""The AMC agent's flags (``autoprune search --searcher amc``) and how they become an
:class:`~autoprune.config.AgentConfig`; and ``KEY=VALUE`` option lists, shared with the
criterion's options."""

from __future__ import annotations

import argparse
import dataclasses
import json
from typing import Any

from .config import REWARDS, AgentConfig
from .errors import AutopruneError


def key_values(items: list[str], flag: str) -> dict[str, Any]:
    """KEY=VALUE strings -> a dict; values are read as JSON (numbers, true/false) or kept as text."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise AutopruneError(f"{flag} {item!r} must look like KEY=VALUE, e.g. probes=20")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def add_agent_flags(p: argparse.ArgumentParser) -> None:
    d = AgentConfig()
    g = p.add_argument_group("the AMC agent (--searcher amc; --trials/--episodes counts its episodes)")
    g.add_argument(
        "--reward",
        choices=REWARDS,
        default=None,
        help="acc (default: accuracy under the hard budget), acc_flops (-error*log(FLOPs)) or acc_latency "
        "(acc*(latency/target)^w)",
    )
    g.add_argument(
        "--reward-weight",
        type=float,
        default=None,
        help=f"acc_latency's w above the target (default {d.reward_weight:g})",
    )
    g.add_argument(
        "--reward-weight-below", type=float, default=None, help="acc_latency's w at or below the target (default: w)"
    )
    g.add_argument(
        "--reward-target",
        type=float,
        default=None,
        help="acc_latency's target, a fraction of the dense latency (default: the budget's fraction)",
    )
    g.add_argument("--agent-criterion", default=None, help=f"which channels go within a group (default {d.criterion})")
    g.add_argument(
        "--warmup-episodes", type=int, default=None, help="episodes of random actions first (default: a quarter)"
    )
    g.add_argument(
        "--recalibrate-batches",
        type=int,
        default=None,
        help=f"training batches that recompute BN statistics before an episode's accuracy (default {d.recalibrate_batches})",
    )
    g.add_argument(
        "--agent-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a DDPG setting (AMC's by default): hidden, actor_lr, critic_lr, tau, batch, discount, sigma, "
        "sigma_decay, baseline_alpha, buffer, updates_per_step",
    )


def agent_config(args: argparse.Namespace, base: AgentConfig) -> AgentConfig:
    """``base`` (the defaults, or a resumed search's) with the agent flags given."""
    given = {
        "reward": args.reward,
        "reward_weight": args.reward_weight,
        "reward_weight_below": args.reward_weight_below,
        "reward_target": args.reward_target,
        "criterion": args.agent_criterion,
        "warmup_episodes": args.warmup_episodes,
        "recalibrate_batches": args.recalibrate_batches,
        "options": key_values(args.agent_option, "--agent-option") or None,
    }
    return dataclasses.replace(base, **{k: v for k, v in given.items() if v is not None})
