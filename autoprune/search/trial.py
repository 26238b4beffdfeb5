"""The trainable: one trial on a worker. It reads its :class:`~autoprune.contract.TrialConfig`,
turns it into a ``Policy`` and runs the engine, reporting as :mod:`autoprune.contract` says."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any

from ..config import Budget, EngineConfig, Policy
from ..contract import FINAL, PRUNED_METRICS, TrialConfig
from ..errors import AutopruneError

_ACTOR_CACHE: dict[str, tuple] = {}  # one entry: the setup and dense model of the current search


@dataclass
class TrialSetup:
    """Everything a trial needs besides its config; put into the object store once."""

    task: Any
    dense_state: dict
    dense_metrics: dict[str, Any]
    budget: Budget
    epochs: int
    engine: EngineConfig
    cpus_per_trial: float
    gpus_per_trial: float
    replay: dict[str, dict] = field(default_factory=dict)  # resume: final reports of trials that ended
    # after Tune's last snapshot; they are reported again instead of re-run


def _setup(ref) -> tuple[TrialSetup, Any]:
    """The search's setup and dense model, fetched once per worker process (actors are reused)."""
    import ray

    key = ref.hex()
    if key not in _ACTOR_CACHE:
        _ACTOR_CACHE.clear()
        setup = ray.get(ref)
        dense = setup.task.model_factory()
        dense.load_state_dict(setup.dense_state)
        _ACTOR_CACHE[key] = (setup, dense.eval())
    return _ACTOR_CACHE[key]


def pruned_cost(model, task, dense_metrics: dict[str, Any], ratios: dict[str, float]) -> dict[str, Any]:
    """The cost keys of the contract for a model that has its final structure (weight masks
    count as removed), against the dense model's."""
    from ..engine.measure import measure

    cost = measure(model, task.input_shape, None, latency=False)
    return {
        "flops": cost.flops,
        "params": cost.params,
        "flops_ratio": cost.flops / dense_metrics["flops"],
        "params_ratio": cost.params / dense_metrics["params"],
        "ratios": {k: float(v) for k, v in ratios.items()},
    }


def run_trial(config: dict, setup_ref: list) -> None:
    """One trial: config -> Policy -> engine, reporting validation accuracy every epoch, the
    pruned model's cost from the first epoch after pruning, and the final metrics with the
    last epoch."""
    import ray
    import torch
    from ray import tune

    from .. import engine

    setup, dense = _setup(setup_ref[0])
    replay = setup.replay.get(tune.get_context().get_trial_id())
    if replay is not None:
        tune.report(replay)
        return
    trial = TrialConfig.from_config(config)
    if trial.space_error is not None:
        raise AutopruneError(f"the search space failed: {trial.space_error}")
    torch.set_num_threads(max(1, int(setup.cpus_per_trial)))
    device = "cuda" if setup.gpus_per_trial > 0 and torch.cuda.is_available() else "cpu"
    dense.to(device)
    fields = dict(trial.policy)
    fields["finetune"] = {**fields.get("finetune", {}), "epochs": setup.epochs}
    policy = Policy.from_dict(fields)
    fraction = trial.budget_fraction or setup.budget.fraction
    budget = Budget(setup.budget.kind, fraction, setup.budget.tolerance)
    cfg = dataclasses.replace(setup.engine, device=device, train_epochs=setup.epochs, progress=False)
    node = ray.get_runtime_context().get_node_id()
    last: dict[str, Any] = {}
    cost: dict[str, Any] = {}
    reporting = [0.0]  # seconds spent in tune.report, which waits for the driver: not engine time

    def on_pruned(model, ratios) -> None:
        cost.update(pruned_cost(model, setup.task, setup.dense_metrics, ratios))

    def on_epoch(epoch: int, metrics: dict[str, float]) -> None:
        row = {"epoch": epoch + 1, "val_acc": metrics["val_acc"], "loss": metrics["loss"], "node_id": node, **cost}
        if epoch + 1 < setup.epochs:
            t = time.perf_counter()
            tune.report(row)
            reporting[0] += time.perf_counter() - t
        else:
            last.update(row)  # reported below, with the final metrics

    t0 = time.perf_counter()
    result = engine.run(
        setup.task, dense, policy, budget, cfg, setup.dense_metrics, on_epoch=on_epoch, on_pruned=on_pruned
    )
    engine_s = time.perf_counter() - t0 - reporting[0]
    p = result.pruned
    final = {k: p[k] for k in PRUNED_METRICS}
    tune.report(
        {
            **last,
            "epoch": setup.epochs,
            "node_id": node,
            **final,
            "engine_s": engine_s,
            "report_s": reporting[0],
            "ratios": {k: float(v) for k, v in result.ratios.items()},
            FINAL: True,
        }
    )
