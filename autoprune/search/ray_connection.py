"""The search's Ray: a local instance sized to this machine, or a cluster at ``--address``."""

from __future__ import annotations

from ..errors import AutopruneError
from ..rayenv import quiet_environment
from .plan import Plan, check_fits


def connect(plan: Plan) -> None:
    """Start a local Ray instance sized to this machine, or join ``address``, and check
    that the cluster can run a trial."""
    quiet_environment()
    import ray

    common = dict(log_to_driver=False, logging_level="ERROR", configure_logging=True)
    if plan.address:
        try:
            ray.init(address=plan.address, **common)
        except (ConnectionError, RuntimeError) as exc:
            raise AutopruneError(f"cannot join the Ray cluster at {plan.address!r}: {exc}") from None
        nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
        check_fits(
            plan.config,
            max((n.get("CPU", 0) for n in nodes), default=0),
            max((n.get("GPU", 0) for n in nodes), default=0),
            "any node of the cluster",
        )
        return
    ray.init(address="local", num_cpus=plan.local_cpus, num_gpus=plan.local_gpus, include_dashboard=False, **common)


def concurrency(plan: Plan) -> int:
    if plan.config.concurrency:
        return plan.config.concurrency
    import ray

    res = ray.cluster_resources()
    n = int(res.get("CPU", 1) // plan.config.cpus_per_trial)
    if plan.config.gpus_per_trial:
        n = min(n, int(res.get("GPU", 0) // plan.config.gpus_per_trial))
    return max(1, min(n, plan.trials))
