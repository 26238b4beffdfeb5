"""Whole jobs behind the CLI: check everything cheap first, then do the expensive work."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from .config import Budget, EngineConfig, MeasureConfig, Policy, TaskConfig
from .errors import AutopruneError, first_line


def preflight(task, policy: Policy, budget: Budget) -> None:
    """Checks on an untrained model, before training or data-heavy work: the model runs on
    the task's input, the dependency graph handles every layer, per-layer names exist, and
    the budget is reachable (it depends on the structure and ``max_ratio`` alone)."""
    import torch

    from . import engine
    from .engine.graph import PrunableGraph
    from .engine.measure import measure
    from .engine.solver import solve_channels

    example = task.example_input()
    try:  # building it too: a model whose windows or embeddings need another size says so there
        model = task.model_factory().eval()
        with torch.no_grad():
            model(example)
    except Exception as exc:  # noqa: BLE001 - the model's own error, reported plainly
        raise AutopruneError(
            f"model {task.model_name!r} cannot run on the task's input of shape {tuple(example.shape)} "
            f"({first_line(exc, 120)}); it may need another --image-size"
        ) from None
    engine.check_budget(policy, budget)
    scores = engine.score(model, Policy(criterion="magnitude", structure=policy.structure), None, 0)
    if policy.structure != "channel":  # the solver also checks per_layer names against the maskable layers
        engine.solve_unstructured(model, task, policy, budget, scores, measure(model, task.input_shape, None, False))
        return
    graph = PrunableGraph(model, example, embedding=policy.embedding)
    graph = engine.leave_kept(graph, model, policy, example)
    graph.dry_run()
    names, sizes, channel, costs = engine.channel_problem(model, example, policy, scores, graph)
    if budget.kind == "latency":
        return  # reachable or not is known once the latency table is built (on the trained model's device)
    solve_channels(names, sizes, channel, policy, budget, costs.cost, (costs.total_flops, costs.total_params))


def prune_job(cfg: EngineConfig, policy: Policy, budget: Budget, out: Path) -> dict[str, Any]:
    """``autoprune prune``: dense model -> engine -> DIR/summary.json, model.pt, policy.json."""
    from . import engine
    from .engine.checkpoint import architecture_key, reload_flags, save_model
    from .engine.tasks import check_task_config, get_task
    from .paths import check_output_dir
    from .report import comparison, latency_note

    engine.check_policy(policy)
    check_task_config(cfg.task)
    engine.resolve_device(cfg.device)
    check_output_dir(out, "--out")
    if not cfg.checkpoint:
        check_output_dir(engine.cache_dir(cfg), "--cache-dir" if cfg.cache_dir else "the dense-model cache")
    task = get_task(cfg.task)
    preflight(task, policy, budget)
    t0 = time.perf_counter()
    dense = engine.dense_model(task, cfg)
    dense_metrics = engine.measure_model(dense, task, cfg.measure, test=True, latency=False)  # timed by run
    latency = None
    if budget.kind == "latency":
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
    out.mkdir(parents=True, exist_ok=True)
    save_model(
        out / "model.pt",
        result.model,
        cfg.task,
        policy.structure,
        result.history,
        policy.to_dict(),
        {k: result.pruned.get(k) for k in ("val_acc", "test_acc", "flops", "params")},
        architecture_key(dense),
    )
    policy.to_json(out / "policy.json")
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
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


def evaluate_job(
    model_path: str, task: TaskConfig | dict[str, Any] | None, device: str | None, threads: int | None
) -> dict[str, Any]:
    """``autoprune evaluate``: reload a saved model, report accuracy and cost. ``task``: what
    the user named of the task (see :func:`autoprune.engine.checkpoint.load_model`)."""
    from . import engine
    from .engine.checkpoint import load_model

    cfg = MeasureConfig(**({"threads": threads} if threads is not None else {}))
    dev = engine.resolve_device(device)
    model, task_, record = load_model(model_path, task)
    model.to(dev)
    metrics = engine.measure_model(model, task_, cfg, test=True, latency=False)
    # the speed-up against the dense architecture (its weights do not change its speed), side by side
    dense = task_.model_factory().to(dev).eval()
    timed = engine.compare_latency(dense, model, task_.input_shape, cfg)
    metrics["dense_latency_ms_by_batch"] = timed.pop("dense_latency_ms_by_batch")
    metrics.update(timed)
    metrics["task"] = task_.name
    metrics["model"] = task_.model_name
    metrics["structure"] = record.structure
    return metrics


def export_job(model_path: str, task: dict[str, Any], fmt: str, out: str | None) -> Path:
    """``autoprune export``: the output location is checked before the model is rebuilt."""
    from .engine.checkpoint import export_model, load_model
    from .paths import check_output_file

    target = check_output_file(out or Path(model_path).with_suffix("." + fmt), "--out")
    model, built, _ = load_model(model_path, task)
    return export_model(model, built.example_input(), target, fmt)


def ui_job(tracking_uri: str | None, host: str, port: int) -> int:
    """``autoprune ui``: the MLflow UI for the search store, bound to 127.0.0.1 by default."""
    import os
    import signal
    import socket
    import subprocess
    import sys

    from .tracking.store import check_tracking_uri, resolve_tracking_uri, runs_link, search_experiments

    uri = resolve_tracking_uri(tracking_uri)
    check_tracking_uri(uri)
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///") :]).is_file():
        raise AutopruneError(f"no MLflow store at {uri}; run `autoprune search` here first, or pass --tracking-uri")
    if not 0 < port < 65536:
        raise AutopruneError(f"--port must be in 1..65535, got {port}")
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError as exc:
            raise AutopruneError(f"cannot listen on {host}:{port} ({exc.strerror}); choose another --port") from None
    try:  # the searches in the store, each a link to its runs table (the UI opens elsewhere)
        searches = search_experiments(uri)
    except Exception as exc:  # noqa: BLE001 - the server shows the store whatever this makes of it
        searches = []
        print(f"warning: could not list the searches in {uri} ({type(exc).__name__}: {exc})", file=sys.stderr)
    if searches:
        print("searches in this store, newest first (each link opens its trials):")
        for experiment_id, name in searches:
            print(f"  {name}: {runs_link(experiment_id, host, port)}")
    print(f"MLflow UI for {uri}: http://{host}:{port}  (Ctrl-C stops it)", flush=True)
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        uri,
        "--host",
        host,
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    # MLflow's background job runners (GenAI evaluation jobs) are not needed to browse runs
    # and cost seven processes; the server gets its own process group, stopped as a whole.
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)

    def stop(*_):
        raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        return proc.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
