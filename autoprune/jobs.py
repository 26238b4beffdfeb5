"""Whole jobs behind the CLI: check everything cheap first, then do the expensive work."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from .config import Budget, EngineConfig, MeasureConfig, Policy, TaskConfig
from .errors import AutopruneError


def prune_job(cfg: EngineConfig, policy: Policy, budget: Budget, out: Path, overwrite: bool = False) -> dict[str, Any]:
    """``autoprune prune``: dense model -> engine -> DIR/summary.json, model.pt, policy.json.
    ``out`` must be new or empty unless ``overwrite``."""
    from . import engine
    from .engine.checkpoint import architecture_key, reload_flags
    from .engine.preflight import preflight
    from .engine.tasks import check_task_config, get_task
    from .paths import check_free_space, check_output_dir
    from .report import comparison, latency_note

    engine.check_policy(policy)
    check_task_config(cfg.task)
    device = engine.resolve_device(cfg.device)
    check_output_dir(out, "--out", fresh=not overwrite)
    engine.check_runtime(cfg.measure.runtime, device)
    if not cfg.checkpoint:
        check_output_dir(engine.cache_dir(cfg), "--cache-dir" if cfg.cache_dir else "the dense-model cache")
    task = get_task(cfg.task)
    check_free_space(out, preflight(task, policy, budget, cfg.measure.latency_batch, device), "--out")
    t0 = time.perf_counter()
    dense = engine.dense_model(task, cfg)
    dense_metrics = engine.measure_model(dense, task, cfg.measure, test=True, latency=False)  # timed by run
    latency = None
    if engine.needs_latency_table(policy, budget):
        latency = engine.task_latency_table(dense, task, cfg, print)
    print(
        f"pruning: {policy.structure} / {policy.criterion} / {policy.scope} / {policy.method}, "
        f"budget {budget.kind} {budget.fraction:g}"
    )
    result = engine.run(task, dense, policy, budget, cfg, dense_metrics, test=True, latency=latency)
    landed = result.pruned[f"{budget.kind}_ratio"]
    if landed < budget.fraction - budget.tolerance and len(result.latency_checks) < 2:
        print(
            f"note: landed at {budget.kind} fraction {landed:.4f}, more than {budget.tolerance:g} below the "
            "budget: the channels this policy may remove are too coarse to get closer"
        )
    summary = {
        "task": task.name,
        "model": task.model_name,
        "metric": task.metric_info(),
        "policy": policy.to_dict(),
        "budget": {"kind": budget.kind, "fraction": budget.fraction},
        "ratios": result.ratios,
        "collapse": result.collapse,
        "prune_events": result.events,
        "latency_checks": result.latency_checks,
        "dense": result.dense,
        "pruned": result.pruned,
        "finetune_history": result.epochs,
        "seed": cfg.seed,
        "device": str(next(result.model.parameters()).device),
        "wall_time_s": time.perf_counter() - t0,
    }
    _write_results(out, result, cfg, policy, summary, architecture_key(dense))
    print()
    print(comparison(result.dense, result.pruned))
    note = latency_note(result.latency_checks, budget)
    if note:
        print(f"\n{note}")
    if result.collapse["empty"] or result.collapse["at_floor"]:
        print(
            f"\nlayer collapse: {len(result.collapse['empty'])} emptied, {len(result.collapse['at_floor'])} "
            "pruned to their floor (see collapse in summary.json)"
        )
    print(f"\nwrote {out / 'model.pt'}, {out / 'policy.json'}, {out / 'summary.json'}")
    print(f"reload it with: autoprune evaluate {out / 'model.pt'}{reload_flags(cfg.task)}")
    return summary


def _write_results(out: Path, result, cfg: EngineConfig, policy: Policy, summary: dict, arch) -> None:
    """``model.pt``, ``policy.json`` and ``summary.json`` into ``out``; on a failed write (a
    full disk) no half of a result is left, nor a folder this run made."""
    from .engine.checkpoint import save_model
    from .report import metric_keys

    made = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    try:
        save_model(
            out / "model.pt",
            result.model,
            cfg.task,
            policy.structure,
            result.history,
            policy.to_dict(),
            {k: result.pruned.get(k) for k in (*metric_keys(result.pruned), "flops", "params")},
            arch,
        )
        written.append(out / "model.pt")
        policy.to_json(out / "policy.json")
        written.append(out / "policy.json")
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    except BaseException as exc:  # a full disk: no half of a result is left, nor a folder this run made
        for path in [*written, out / "summary.json"]:
            path.unlink(missing_ok=True)
        if made:
            shutil.rmtree(out, ignore_errors=True)
        if isinstance(exc, OSError):
            raise AutopruneError(f"{str(out)!r} could not be written: {exc.strerror or exc}") from None
        raise


def evaluate_job(
    model_path: str,
    task: TaskConfig | dict[str, Any] | None,
    device: str | None,
    threads: int | None,
    runtime: str = "torch",
) -> dict[str, Any]:
    """``autoprune evaluate``: reload a saved model, report accuracy and cost, its latency
    timed in ``runtime``. ``task``: what the user named of the task (see
    :func:`autoprune.engine.checkpoint.load_model`)."""
    from . import engine
    from .engine.checkpoint import load_model
    from .engine.runtime import describe_runtime

    cfg = MeasureConfig(runtime=runtime, **({"threads": threads} if threads is not None else {}))
    dev = engine.resolve_device(device)
    engine.check_runtime(runtime, dev)
    model, task_, record = load_model(model_path, task)
    model.to(dev)
    metrics = engine.measure_model(model, task_, cfg, test=True, latency=False)
    # the speed-up against the dense architecture (its weights do not change its speed), side by side
    dense = task_.model_factory().to(dev).eval()
    timed = engine.compare_latency(dense, model, task_.input_shape, cfg)
    metrics["dense_latency_ms_by_batch"] = timed.pop("dense_latency_ms_by_batch")
    metrics.update(timed)
    metrics["latency_runtime"] = describe_runtime(runtime, dev, cfg.threads)
    metrics["task"] = task_.name
    metrics["model"] = task_.model_name
    metrics["structure"] = record.structure
    return metrics


def export_job(model_path: str, task: dict[str, Any], fmt: str, out: str | None, overwrite: bool = False) -> list[Path]:
    """``autoprune export``: the output location is checked before the model is rebuilt; it
    must not exist unless ``overwrite``. Returns every file written, the model file first
    (:func:`autoprune.engine.export.export_model`)."""
    from .engine.checkpoint import load_model
    from .engine.export import export_model
    from .paths import check_output_file

    target = check_output_file(
        Path(model_path).with_suffix("." + fmt) if out is None else out, "--out", fresh=not overwrite
    )
    if out is not None and fmt == "pt2" and not target.name.endswith(".pt2"):
        raise AutopruneError(
            f"--out {str(target)!r} must end in .pt2: torch.export's archives are read back (torch.export.load) by "
            "that name"
        )
    model, built, _ = load_model(model_path, task)
    return export_model(model, built.example_input(), target, fmt, name=built.model_name)


def ui_job(tracking_uri: str | None, host: str, port: int) -> int:
    """``autoprune ui``: the MLflow UI for the search store (:func:`autoprune.tracking.ui.serve`)."""
    from .tracking.ui import serve

    return serve(tracking_uri, host, port)
