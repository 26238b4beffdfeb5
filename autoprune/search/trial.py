"""The trainable: one trial on a worker. It reads its :class:`~autoprune.contract.TrialConfig`,
turns it into a ``Policy`` and runs the engine, reporting as :mod:`autoprune.contract` says."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any

from ..config import Budget, EngineConfig, Policy
from ..contract import FINAL, TrialConfig
from ..errors import AutopruneError

_ACTOR_CACHE: dict[str, tuple] = {}  # one entry: the setup and dense model of the current search


@dataclass(kw_only=True)
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
    latency: Any = None  # the hardware's engine.LatencyTable for the dense model (predictions)
    on_pruned: Any = None  # the searcher's trial hook (SearcherHooks.trial_hook): extra report keys once pruned
    tables: dict[str, Any] = field(default_factory=dict)  # hardware (engine.measure.device_name) -> its
    # LatencyTable, each built on a node of that kind (search.hardware); trials predict with their own


def latency_here(setup: TrialSetup, dense, device):
    """The latency table of the hardware this trial runs on. A kind of hardware the search
    did not see at its start (a node that joined since) gets its table built here, once per
    worker process (the setup is cached per worker), from that node's cache when it has one."""
    from .. import engine
    from ..engine.measure import device_name

    if setup.latency is None:
        return None  # the search runs without latency predictions
    name = device_name(device)
    if name not in setup.tables:
        setup.tables[name] = engine.task_latency_table(dense, setup.task, setup.engine)
    return setup.tables[name]


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


def pruned_cost(model, task, dense_metrics: dict[str, Any], ratios: dict[str, float], latency=None) -> dict[str, Any]:
    """The cost keys of the contract for a model that has its final structure (weight masks
    count as removed), against the dense model's; latency as ``latency`` (the table) predicts it."""
    from ..engine.measure import measure

    cost = measure(model, task.input_shape, None, latency=False)
    out = {
        "flops": cost.flops,
        "params": cost.params,
        "flops_ratio": cost.flops / dense_metrics["flops"],
        "params_ratio": cost.params / dense_metrics["params"],
        "ratios": {k: float(v) for k, v in ratios.items()},
    }
    if latency is not None:
        out["latency_predicted_ms"] = latency.predict_model(model)
        out["latency_ratio"] = out["latency_predicted_ms"] / latency.predict()
    return out


def trial_device(gpus_per_trial: float) -> str:
    """The torch device of a trial: the GPU Ray assigned it, or the CPU. Ray makes only the
    assigned GPU visible (CUDA_VISIBLE_DEVICES), so it is cuda:0 there; where Ray was told to
    leave CUDA_VISIBLE_DEVICES alone, it is the assigned GPU's own index."""
    import os

    import ray
    import torch

    if gpus_per_trial <= 0 or not torch.cuda.is_available():
        return "cpu"
    ids = ray.get_gpu_ids()
    index = 0 if not ids or os.environ.get("CUDA_VISIBLE_DEVICES") else int(ids[0])
    torch.cuda.set_device(index)
    return f"cuda:{index}"


def run_trial(config: dict, setup_ref: list) -> None:
    """One trial: config -> Policy -> engine, reporting validation accuracy every epoch, the
    pruned model's cost from the first epoch after pruning, and the final metrics with the
    last epoch."""
    import ray
    import torch
    from ray import tune

    from .. import engine

    setup, dense = _setup(setup_ref[0])
    trial = TrialConfig.from_config(config)
    if trial.space_error is not None:
        raise AutopruneError(f"the search space failed: {trial.space_error}")
    torch.set_num_threads(max(1, int(setup.cpus_per_trial)))
    device = trial_device(setup.gpus_per_trial)
    dense.to(device)
    table = latency_here(setup, dense, device)
    policy, budget = _policy_and_budget(trial, setup)
    cfg = dataclasses.replace(setup.engine, device=device, train_epochs=setup.epochs, progress=False)
    node = ray.get_runtime_context().get_node_id()
    last: dict[str, Any] = {}
    cost: dict[str, Any] = {}
    searcher_keys: dict[str, Any] = {}
    reporting = [0.0]  # seconds spent in tune.report, which waits for the driver: not engine time

    def on_pruned(model, ratios) -> None:
        cost.update(pruned_cost(model, setup.task, setup.dense_metrics, ratios, table))
        if setup.on_pruned is not None:  # the searcher's keys (an AMC episode's reward), before fine-tuning
            searcher_keys.update(setup.on_pruned(model, setup.task, cost, device))
            cost.update(searcher_keys)

    def on_epoch(epoch: int, metrics: dict[str, float]) -> None:
        row = {
            "epoch": epoch + 1,
            setup.task.metric_key(): metrics[setup.task.metric_key()],
            "val_loss": metrics["val_loss"],
            "loss": metrics["loss"],
            "node_id": node,
            **cost,
        }
        if epoch + 1 < setup.epochs:
            t = time.perf_counter()
            tune.report(row)
            reporting[0] += time.perf_counter() - t
        else:
            last.update(row)  # reported below, with the final metrics

    t0 = time.perf_counter()
    result = engine.run(
        setup.task,
        dense,
        policy,
        budget,
        cfg,
        setup.dense_metrics,
        on_epoch=on_epoch,
        on_pruned=on_pruned,
        latency=table,
        measure_latency=False,
    )
    final = final_metrics(result, setup.task, last, cfg)
    engine_s = time.perf_counter() - t0 - reporting[0]
    tune.report(
        {
            **last,
            "epoch": setup.epochs,
            "node_id": node,
            **final,
            "engine_s": engine_s,
            "report_s": reporting[0],
            "ratios": {k: float(v) for k, v in result.ratios.items()},
            **searcher_keys,
            FINAL: True,
        }
    )


def _policy_and_budget(trial: TrialConfig, setup: TrialSetup) -> tuple[Policy, Budget]:
    """The trial's policy (fine-tuned for the search's epochs) and budget (its own fraction
    where the searcher chose one)."""
    fields = dict(trial.policy)
    fields["finetune"] = {**fields.get("finetune", {}), "epochs": setup.epochs}
    fraction = trial.budget_fraction or setup.budget.fraction
    return Policy.from_dict(fields), Budget(setup.budget.kind, fraction, setup.budget.tolerance)


def final_metrics(result, task, last: dict[str, Any], cfg: EngineConfig) -> dict[str, Any]:
    """The final report's figures of the trial's model (``result``, the engine's): its cost,
    accuracy, predicted latency and the trial's own timing of it (for information only:
    other trials run beside it)."""
    from ..engine.measure import latency_ms

    p = result.pruned
    return {
        **{k: p[k] for k in ("flops", "params", "flops_ratio", "params_ratio")},
        "latency_predicted_ms": p.get("latency_predicted_ms"),
        "latency_ratio": p.get("latency_ratio"),
        task.metric_key(): p[task.metric_key()],
        "val_loss": last.get("val_loss"),
        "predicted_speedup": p.get("predicted_speedup"),
        "latency_measured_ms": latency_ms(result.model, task.input_shape, cfg.measure.latency_batch, cfg.measure),
    }
