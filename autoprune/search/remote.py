"""Where the driver's own heavy work runs. On a cluster the driver sits on the head, which has
no accelerator in any launch file (and no CPUs for trials): the dense model's training and the
final re-runs of the best policy then run as Ray tasks with a trial's resources (its GPU when
trials have one), on a node like those the trials ran on. On this machine's own instance they
run in the driver, as before."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from ..errors import AutopruneError
from .plan import Plan

LABELS = {"dense": "dense model's training", "final": "final re-run"}
_where: dict[str, str] = {}  # what ran where on a cluster: "dense" / "final" -> Ray node id


def on_cluster(plan: Plan) -> bool:
    import ray

    return bool(plan.address) and ray.is_initialized()


def call(plan: Plan, what: str, fn, *args, **kwargs) -> Any:
    """``fn(*args, **kwargs)``: here, or on a cluster as a Ray task with a trial's CPUs and
    GPUs. A model among the arguments goes to the task's device; models and tensors in what
    it returns come back on the CPU (the head may have no GPU)."""
    if not on_cluster(plan):
        return fn(*args, **kwargs)
    import ray

    config = plan.config
    task = ray.remote(num_cpus=config.cpus_per_trial, num_gpus=config.gpus_per_trial, max_retries=1)(_run)
    ref = task.remote(fn, args, kwargs)
    _wait_for_a_node(plan, ref, what)
    result, node = ray.get(ref)
    _where[what] = node
    return result


def _wait_for_a_node(plan: Plan, ref, what: str) -> None:
    """Wait for the task; while no alive node can hold it (an autoscaler may add one), at most
    ``--node-wait`` seconds, as the trials do."""
    import ray

    from .ray_connection import fitting_nodes

    cpus, gpus, wait_s = plan.config.cpus_per_trial, plan.config.gpus_per_trial, plan.config.node_wait
    since = None
    while not ray.wait([ref], timeout=2.0)[0]:
        if fitting_nodes(cpus, gpus):
            since = None
            continue
        since = since or time.monotonic()
        if time.monotonic() - since > wait_s:
            ray.cancel(ref, force=True)
            raise AutopruneError(
                f"the cluster has had no node that can run a trial ({cpus:g} CPU, {gpus:g} GPU) for {wait_s:g} s "
                f"(--node-wait), and the {LABELS.get(what, what)} runs on one: bring nodes up (or let an autoscaler add them) "
                "and start the search again"
            )


def need(plan: Plan) -> str:
    return f"{plan.config.cpus_per_trial:g} CPU, {plan.config.gpus_per_trial:g} GPU"


def ran_on() -> dict[str, str]:
    """The Ray node ids the driver's work ran on this search (empty off a cluster)."""
    return dict(_where)


def reset() -> None:
    _where.clear()


def _run(fn, args: tuple, kwargs: dict):
    """The task's body: on the node's device, back on the CPU."""
    import ray
    import torch

    device = torch.device("cuda:0" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu")
    args = tuple(a.to(device) if isinstance(a, torch.nn.Module) else a for a in args)
    result = fn(*args, **kwargs)
    return _to_cpu(result), ray.get_runtime_context().get_node_id()


def _to_cpu(value):
    import torch

    if isinstance(value, (torch.nn.Module, torch.Tensor)):
        return value.cpu()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        moved = {
            f.name: _to_cpu(getattr(value, f.name))
            for f in dataclasses.fields(value)
            if isinstance(getattr(value, f.name), (torch.nn.Module, torch.Tensor))
        }
        return dataclasses.replace(value, **moved) if moved else value
    return value
