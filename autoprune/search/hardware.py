"""Latency tables by kind of hardware. A latency is a property of the hardware it was timed
on, so each kind of hardware trials run on (a GPU model, a CPU model: ``engine.measure.device_name``)
gets its own table of the dense model, built on a node of that kind; a trial predicts with the
table of the hardware it runs on (``search.trial.latency_here``)."""

from __future__ import annotations

import math
import sys

from ..config import SearchConfig
from .ray_connection import fitting_nodes
from .searchers import SEARCHERS


def trial_latency_table(dense, task, config: SearchConfig, say):
    """The latency table of the dense model on the trials' hardware (a GPU when trials get
    one and the driver has one), from the cache beside the dense model or built now, before
    any trial starts; the device it was built on; and, for a latency budget, the smallest
    latency fraction the policies can reach (a budget below it is refused here). A table
    that cannot be built only costs a FLOPs or params search its latency predictions (unless
    the AMC agent's reward is acc_latency)."""
    import copy

    from .. import engine

    device = _device(config.gpus_per_trial)
    model = dense if next(dense.parameters()).device == device else copy.deepcopy(dense).to(device)
    kind = config.budget.kind
    try:
        table = engine.task_latency_table(model, task, config.engine, say)
    except Exception as exc:  # noqa: BLE001 - a FLOPs or params search goes on without predictions
        if kind == "latency" or SEARCHERS.get(config.searcher).hooks().needs_latency(config):
            raise  # the budget or the searcher (AMC's acc_latency reward) needs it
        print(f"warning: no latency table ({type(exc).__name__}: {exc}); trials report no latency", file=sys.stderr)
        return None, device, 0.0
    return table, device, reachable(table, model, task, config)


def reachable(table, model, task, config: SearchConfig, where: str = "this hardware") -> float:
    """For a latency budget, the smallest latency fraction channel pruning reaches as ``table``
    predicts it (0.0 for other budgets); a budget below it is refused."""
    from ..config import Policy
    from ..engine.measure import model_device
    from ..engine.stages import smallest_fraction
    from ..errors import AutopruneError

    if config.budget.kind != "latency":
        return 0.0
    max_ratio = Policy().max_ratio
    floor = smallest_fraction(table, model, task.example_input().to(model_device(model)), max_ratio)
    if config.budget.fraction < floor:
        raise AutopruneError(
            f"--budget-latency {config.budget.fraction:g} is unreachable on {where}: with every channel "
            f"group at max_ratio {max_ratio:g} the latency table predicts {floor:.3f} of the dense latency; "
            f"ask for at least {math.ceil(floor * 1000) / 1000:g}"
        )
    return floor


def node_tables(dense, task, config: SearchConfig, say) -> dict[str, dict]:
    """On a cluster: the table of every kind of hardware among the alive nodes a trial fits
    on, each built (or read from that node's cache) by a task on one node of that kind, with
    the trial's resources. ``{hardware: {"table": LatencyTable, "node_id": ...}}``; empty if no
    node fits yet (nodes that join later build their own table in their first trial)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from ..engine.checkpoint import cpu_state

    cpus, gpus = config.cpus_per_trial, config.gpus_per_trial
    nodes = fitting_nodes(cpus, gpus)

    def on(node: str):
        return {
            "num_cpus": cpus,
            "num_gpus": gpus,
            "scheduling_strategy": NodeAffinitySchedulingStrategy(node, soft=False),
        }

    names = ray.get([ray.remote(_hardware).options(**on(n)).remote(gpus) for n in nodes])
    first = {}
    for node, name in zip(nodes, names):
        first.setdefault(name, node)
    state = ray.put(cpu_state(dense))
    build = ray.remote(_build)
    built = ray.get([build.options(**on(node)).remote(task, state, config, gpus) for node in first.values()])
    out = {}
    for (name, node), table in zip(first.items(), built):
        say(f"latency table for {name}: {'cached' if table.cached else 'built'} on node {node[:12]}")
        out[name] = {"table": table, "node_id": node}
    return out


def _device(gpus: float):
    import torch

    return torch.device("cuda" if gpus > 0 and torch.cuda.is_available() else "cpu")


def _hardware(gpus: float) -> str:
    from ..engine.measure import device_name

    return device_name(_device(gpus))


def _build(task, state: dict, config: SearchConfig, gpus: float):
    from .. import engine

    dense = task.model_factory()
    dense.load_state_dict(state)
    dense.eval().to(_device(gpus))
    return engine.task_latency_table(dense, task, config.engine)
