"""The ``autoprune`` command line: search | prune | evaluate | export | ui | list.

Flags are parsed into the config dataclasses and checked before any data is read or model
trained; user errors print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .config import SCOPES, STRUCTURES
from .errors import AutopruneError, Terminated, on_sigterm, terminated
from .flags import (
    budget_from_args,
    build_parser,
    engine_config,
    policy_from_args,
    search_config,
    task_config,
    task_flags,
)


def cmd_prune(args: argparse.Namespace) -> int:
    from .jobs import prune_job

    out = Path(args.out) if args.out else args.out  # Path("") would be the working directory
    prune_job(engine_config(args), policy_from_args(args), budget_from_args(args), out, args.overwrite)
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    from .search.plan import check_named_code, saved_config
    from .search.runner import run_search

    base = saved_config(args.name, args.storage) if args.resume and args.name else None
    if base is not None:  # code the saved settings name is imported only if this command line names it
        check_named_code(search_config(args, None), base, args.name)
    run_search(search_config(args, base))
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    from .jobs import ui_job

    return ui_job(args.tracking_uri, args.host, args.port)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .jobs import evaluate_job
    from .report import single

    metrics = evaluate_job(args.model_path, task_flags(args), args.device, args.threads, args.latency_runtime)
    print(json.dumps(metrics, indent=2) if args.json else single(metrics))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .jobs import export_job

    files = export_job(args.model_path, task_flags(args), args.format, args.out, args.overwrite)
    print(f"exported {args.format} to {files[0]}")
    for extra in files[1:]:  # an ONNX model's weights over 2 GiB: a file that must stay beside it
        print(f"  with its weights in {extra} (keep it beside {files[0].name})")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from .engine.criteria import CRITERIA
    from .engine.methods import METHODS
    from .engine.tasks import TASKS

    if args.what == "criteria":
        for name in CRITERIA.names():
            cls = CRITERIA.get(name)
            data = "data" if cls.needs_data else "data-free"
            opts = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in cls.defaults.items())
            print(
                f"{name:11s} {'/'.join(cls.structures):21s} {data:10s} {opts or '-':26s} "
                f"{(cls.__doc__ or '').strip().splitlines()[0]}"
            )
    elif args.what == "structures":
        print("\n".join(STRUCTURES))
    elif args.what == "scopes":
        print("\n".join(SCOPES))
    elif args.what == "methods":
        for name in METHODS.names():
            method = METHODS.get(name)
            opts = ", ".join(f"{k}={method.defaults.get(k)}" for k in method.options)
            print(f"{name:13s} {method.family:22s} {'/'.join(method.structures):21s} {opts or '-'}")
            print(f"{'':13s} {method.summary}")
    elif args.what == "searchers":
        from .search.searchers import SEARCHERS

        for name in SEARCHERS.names():
            spec = SEARCHERS.get(name)
            print(
                f"{name:8s} {'multi-objective' if spec.multi_objective else 'val_acc':15s} "
                f"default scheduler {spec.scheduler:5s} {spec.summary}"
            )
    elif args.what == "spaces":
        from autoprune.search_spaces import SPACES

        for name in SPACES.names():
            print(f"{name:8s} {' '.join((SPACES.get(name).__doc__ or '').split())}")
        print("package.module:function  your own: space(trial, table) -> dict of policy fields")
    elif args.what == "tasks":
        for name in TASKS.names():
            spec = TASKS.get(name)
            if spec.models is None:
                models = f"any torchvision classification model (default {spec.default_model})"
            else:
                models = ", ".join(spec.models)
            print(f"{name:12s} models: {models}{'  (needs --data-dir)' if spec.data_dir else ''}")
        print("package.module:function  a user task returning autoprune.engine.tasks.Task")
    else:
        from .engine.attention import HEADS
        from .engine.graph import PrunableGraph
        from .engine.tasks import check_task_config, get_task

        cfg = task_config(args)
        check_task_config(cfg)
        task = get_task(cfg)
        graph = PrunableGraph(task.model_factory(), task.example_input())
        for g in graph.groups:
            folded = f"channels in each of {g.channels_total // g.size} conv groups"
            unit = HEADS if g.kind == HEADS else "channels" if g.period is None else folded
            print(f"{g.name:40s} {g.size:6d} {unit}")
    return 0


COMMANDS = {
    "search": cmd_search,
    "ui": cmd_ui,
    "prune": cmd_prune,
    "evaluate": cmd_evaluate,
    "export": cmd_export,
    "list": cmd_list,
}


def check_temp_dir() -> None:
    """``TMPDIR``, when set, is a folder that can be written: Ray and MLflow write there and
    otherwise fail mid-way with an OSError (Python's own tempfile would quietly use /tmp)."""
    import os
    import tempfile

    folder = os.environ.get("TMPDIR")
    if not folder:
        return
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise AutopruneError(
            f"TMPDIR {folder!r} cannot be written ({exc.strerror or exc}); set TMPDIR to a writable folder, or unset it"
        ) from None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.umask(os.umask(0o077) | 0o077)  # results, mlflow.db (MLflow 3 keeps secrets there): this user's alone
    on_sigterm()
    try:
        if args.command in ("prune", "search", "evaluate", "export", "ui"):
            check_temp_dir()
        return COMMANDS[args.command](args)
    except AutopruneError as exc:
        print(f"autoprune: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM (Terminated)
        stopped = isinstance(exc, Terminated) or terminated()
        print(f"autoprune: {'terminated' if stopped else 'interrupted'}", file=sys.stderr)
        return 143 if stopped else 130
    except BrokenPipeError:  # output piped into `head` and the like
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
