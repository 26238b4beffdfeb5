"""The command line's flags (argparse) and how they become the config dataclasses. The
dataclasses check every value (``autoprune.schema``); nothing here reads data or trains."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any

from .agent_flags import add_agent_flags, agent_config, key_values
from .config import (
    KEEP_TYPES,
    METRICS,
    SCOPES,
    SEARCH_STRUCTURES,
    STRUCTURES,
    WARMUP_MODES,
    Budget,
    EngineConfig,
    Policy,
    SearchConfig,
    TaskConfig,
)


def _add_task_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("task")
    g.add_argument("--task", default=None, help="digits (default), cifar10, imagefolder or package.module:function")
    g.add_argument("--model", default=None, help="model name within the task (see `autoprune list tasks`)")
    g.add_argument(
        "--data-dir", default=None, help="local data directory (cifar10, imagefolder); nothing is downloaded"
    )
    g.add_argument("--image-size", type=int, default=None, help="imagefolder input resolution (default 224)")
    g.add_argument("--batch-size", type=int, default=None, help="data loader batch size (default 64)")


def _add_engine_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("dense model and run")
    g.add_argument("--checkpoint", default=None, help="dense weights (a state_dict file) to start from")
    g.add_argument(
        "--train-epochs", type=int, default=None, help="dense training epochs when no checkpoint (task default)"
    )
    g.add_argument("--seed", type=int, default=None, help="seed of training, scoring and searchers (default 0)")
    g.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    g.add_argument(
        "--cache-dir", default=None, help="dense-model cache (default $AUTOPRUNE_CACHE or ~/.cache/autoprune)"
    )
    g.add_argument("--threads", type=int, default=None, help="torch threads for latency timing on CPU (default 1)")
    g.add_argument(
        "--scoring-per-class",
        type=int,
        default=None,
        help="training samples per class that data-dependent criteria score on (default 10)",
    )
    g.add_argument("--no-progress", action="store_true", help="no progress bars (off anyway when stderr is no tty)")
    g.add_argument("--latency-passes", type=int, default=None, help="timed passes per latency timing (default 20)")
    g.add_argument("--latency-seconds", type=float, default=None, help="time cap per latency timing (default 60)")


def _add_policy_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("policy (flags override --policy)")
    g.add_argument("--policy", default=None, help="a policy JSON file (as written to DIR/policy.json)")
    g.add_argument("--structure", choices=STRUCTURES, default=None, help="channel (default) or unstructured")
    g.add_argument("--criterion", default=None, help="see `autoprune list criteria` (default magnitude)")
    g.add_argument("--scope", choices=SCOPES, default=None, help="local (default), global or per_layer")
    g.add_argument(
        "--criterion-option",
        action="append",
        default=None,
        metavar="KEY=VALUE",
        help="a criterion option, repeatable (e.g. p=2 for L2 magnitude, probes=20 for hutchinson; "
        "see `autoprune list criteria`)",
    )
    g.add_argument("--method", default=None, help="see `autoprune list methods` (default oneshot)")
    g.add_argument(
        "--iterations",
        type=int,
        default=None,
        help="iterative: prune/fine-tune rounds (default 3); gradual: pruning steps (default 10)",
    )
    g.add_argument("--reduction", choices=("sum", "mean", "max"), default=None, help="channel score reduction")
    g.add_argument("--max-ratio", type=float, default=None, help="most of any group/layer to prune (default 0.9)")
    g.add_argument(
        "--bn-warmup",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="refresh BN statistics on the scoring data before scoring (default: on for data-dependent criteria)",
    )
    g.add_argument(
        "--bn-warmup-mode",
        choices=WARMUP_MODES,
        default=None,
        help="scoring (default): statistics averaged over the scoring subset; train: one pass over the "
        "training split with BN's momentum, as the second-order pruning-at-initialisation study",
    )
    g.add_argument(
        "--bn-warmup-batches",
        type=int,
        default=None,
        help="train warm-up: at most this many training batches (default: the whole split)",
    )
    g.add_argument(
        "--keep",
        action="append",
        default=None,
        metavar="GLOB",
        help="never prune layers whose name matches (repeatable, e.g. 'fc*'; see `autoprune list groups`)",
    )
    g.add_argument(
        "--keep-types",
        default=None,
        metavar="TYPES",
        help=f"never prune layers of these types, comma-separated: {', '.join(KEEP_TYPES)}",
    )
    g.add_argument(
        "--keep-classifier",
        action="store_true",
        default=None,
        help="never prune the output layer (for channels: nor the group that feeds it)",
    )
    g.add_argument("--finetune-epochs", type=int, default=None, help="fine-tuning epochs (default 5)")
    g.add_argument("--lr", type=float, default=None, help="fine-tuning learning rate (default 0.01)")
    _add_budget_flags(p)


def _add_budget_flags(p: argparse.ArgumentParser) -> None:
    b = p.add_argument_group("budget (fraction of the dense cost to keep)")
    x = b.add_mutually_exclusive_group()
    x.add_argument(
        "--budget-flops", type=float, default=None, help="keep at most this fraction of the FLOPs (default 0.5)"
    )
    x.add_argument("--budget-params", type=float, default=None, help="keep at most this fraction of the parameters")
    x.add_argument(
        "--budget-latency",
        type=float,
        default=None,
        help="keep at most this fraction of the dense latency on this hardware at --latency-batch, as the "
        "latency table predicts it (channel pruning only)",
    )
    b.add_argument(
        "--latency-batch",
        type=int,
        default=None,
        help="batch size of the latency budget, the latency table and the reported speed-up (default 1)",
    )


def _add_search_flags(p: argparse.ArgumentParser) -> None:
    d = SearchConfig()  # the defaults are the config's: unset flags stay None (a resumed search keeps its own)
    g = p.add_argument_group("search")
    g.add_argument(
        "--name",
        default=None,
        help="the search's name: results folder and MLflow experiment (default search-<date>-<time>)",
    )
    g.add_argument(
        "--searcher",
        default=None,
        help="tpe (default), nsga2 (Pareto front of accuracy, FLOPs, latency), random, grid or amc (a DDPG agent)",
    )
    g.add_argument("--space", default=None, help="default, criteria, pai or package.module:function")
    g.add_argument(
        "--trials",
        "--episodes",
        type=int,
        default=None,
        help="trials (amc: episodes) to run (default 20; amc 40; grid: its size)",
    )
    g.add_argument(
        "--structure",
        choices=SEARCH_STRUCTURES,
        default=None,
        help="channel (default: channels removed, a really faster model), unstructured (weight masks: they "
        "need sparse kernels or hardware to run faster) or any (both), in spaces that sample the structure",
    )
    g.add_argument(
        "--metric",
        choices=METRICS,
        default=None,
        help="what the searchers optimise: val_acc (default) or val_loss (when accuracy saturates); "
        "ties go to the lower predicted latency",
    )
    g.add_argument("--epochs", type=int, default=None, help="training epochs per trial (default 3; amc 0)")
    g.add_argument(
        "--final-epochs",
        type=int,
        default=None,
        help=f"epochs when the best policy is re-run for the saved model (default {d.final_epochs})",
    )
    g.add_argument(
        "--scheduler",
        choices=("asha", "none"),
        default=None,
        help="asha stops weak trials early (default; none for nsga2 and grid)",
    )
    add_agent_flags(p)
    r = p.add_argument_group("resources and storage")
    r.add_argument("--concurrency", type=int, default=None, help="trials at once (default: what the resources allow)")
    r.add_argument("--max-failures", type=int, default=None, help="reruns of a failed trial, e.g. a lost node (2)")
    r.add_argument("--node-wait", type=float, default=None, help="seconds to wait for a lost cluster's nodes (300)")
    r.add_argument(
        "--cpus-per-trial",
        type=float,
        default=None,
        help=f"CPUs (and torch threads) per trial (default {d.cpus_per_trial:g})",
    )
    r.add_argument(
        "--gpus-per-trial",
        type=float,
        default=None,
        help=f"GPUs per trial, fractions allowed (default {d.gpus_per_trial:g})",
    )
    r.add_argument(
        "--address", default=None, help="a running Ray cluster, host:port (default $RAY_ADDRESS, else a local instance)"
    )
    r.add_argument("--storage", default=d.storage, help=f"Ray Tune results folder (default {d.storage})")
    r.add_argument(
        "--resume",
        action="store_true",
        help="continue the interrupted search --name with its saved "
        "settings (only --out, --address and --no-progress may differ)",
    )
    r.add_argument("--tracking-uri", default=None, help="MLflow store (default sqlite:///<cwd>/mlflow.db)")
    r.add_argument("--out", default=None, help="summary.json and the best model (default <storage>/<name>/best)")


class _Parser(argparse.ArgumentParser):
    """argparse, with errors as one line like the rest of the CLI (not the whole usage)."""

    def error(self, message: str):
        self.exit(2, f"autoprune: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="autoprune",
        description="Search for and apply neural-network pruning policies under an exact budget.",
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"autoprune {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("prune", help="prune a model by one policy to a budget, fine-tune, measure")
    _add_task_flags(p)
    _add_engine_flags(p)
    _add_policy_flags(p)
    p.add_argument("--out", default="autoprune-out", help="output directory (default autoprune-out)")

    s = sub.add_parser("search", help="search pruning policies on Ray Tune; every trial logged to MLflow")
    _add_task_flags(s)
    _add_engine_flags(s)
    _add_budget_flags(s)
    _add_search_flags(s)

    u = sub.add_parser("ui", help="the MLflow UI for the search runs, on 127.0.0.1")
    u.add_argument("--port", type=int, default=5000, help="port (default 5000)")
    u.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    u.add_argument("--tracking-uri", default=None, help="the MLflow store (default sqlite:///<cwd>/mlflow.db)")

    e = sub.add_parser("evaluate", help="reload a saved pruned model and measure it")
    e.add_argument("model_path", help="DIR/model.pt written by prune or search")
    _add_task_flags(e)
    e.add_argument("--device", default=None)
    e.add_argument("--threads", type=int, default=None)
    e.add_argument("--json", action="store_true", help="print the metrics as JSON")

    x = sub.add_parser("export", help="export a saved pruned model for deployment")
    x.add_argument("model_path")
    x.add_argument("--format", choices=("pt2", "onnx"), default="pt2", help="pt2 (torch.export) or onnx")
    x.add_argument("--out", default=None, help="output file (default: beside the model)")
    _add_task_flags(x)

    ls = sub.add_parser("list", help="name what exists")
    ls.add_argument(
        "what", choices=("criteria", "structures", "scopes", "methods", "tasks", "groups", "searchers", "spaces")
    )
    _add_task_flags(ls)
    return parser


def _drop_none(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if v is not None}


def task_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The task fields the user named on the command line."""
    return _drop_none(
        {
            "name": args.task,
            "model": args.model,
            "data_dir": args.data_dir,
            "image_size": args.image_size,
            "batch_size": args.batch_size,
        }
    )


def task_config(args: argparse.Namespace, base: TaskConfig | None = None) -> TaskConfig:
    return dataclasses.replace(base or TaskConfig(), **task_flags(args))


def policy_from_args(args: argparse.Namespace) -> Policy:
    data = Policy.from_json(args.policy).to_dict() if args.policy else Policy().to_dict()
    if args.criterion is not None and args.criterion != data["criterion"]:
        data["criterion_options"] = {}  # the file's options belong to its own criterion
    data.update(
        _drop_none(
            {
                "structure": args.structure,
                "criterion": args.criterion,
                "scope": args.scope,
                "method": args.method,
                "reduction": args.reduction,
                "max_ratio": args.max_ratio,
                "bn_warmup": args.bn_warmup,
                "iterations": args.iterations,
                "bn_warmup_mode": args.bn_warmup_mode,
                "bn_warmup_batches": args.bn_warmup_batches,
                "keep": args.keep,
                "keep_classifier": args.keep_classifier,
                "keep_types": args.keep_types.split(",") if args.keep_types is not None else None,
            }
        )
    )
    data["criterion_options"] = {
        **data["criterion_options"],
        **key_values(args.criterion_option or [], "--criterion-option"),
    }
    data["finetune"] = {**data["finetune"], **_drop_none({"epochs": args.finetune_epochs, "lr": args.lr})}
    return Policy.from_dict(data)


def budget_from_args(args: argparse.Namespace, base: Budget | None = None) -> Budget:
    if args.budget_params is not None:
        return Budget("params", args.budget_params)
    if args.budget_flops is not None:
        return Budget("flops", args.budget_flops)
    if args.budget_latency is not None:
        return Budget("latency", args.budget_latency)
    return base or Budget()


def engine_config(args: argparse.Namespace, base: EngineConfig | None = None) -> EngineConfig:
    """The engine's settings: ``base`` (the defaults, or a resumed search's) with the flags given."""
    base = base or EngineConfig()
    measure = {"threads": args.threads, "latency_batch": args.latency_batch, "repeats": args.latency_passes}
    measure["seconds"] = args.latency_seconds
    return dataclasses.replace(
        base,
        task=task_config(args, base.task),
        measure=dataclasses.replace(base.measure, **_drop_none(measure)),
        progress=not args.no_progress and sys.stderr.isatty(),
        **_drop_none(
            {
                "checkpoint": args.checkpoint,
                "train_epochs": args.train_epochs,
                "seed": args.seed,
                "device": args.device,
                "cache_dir": args.cache_dir,
                "scoring_per_class": args.scoring_per_class,
            }
        ),
    )


def search_config(args: argparse.Namespace, base: SearchConfig | None = None) -> SearchConfig:
    """``base`` (the defaults, or the saved settings of the search to resume) with the flags given."""
    base = base or SearchConfig()
    return dataclasses.replace(
        base,
        budget=budget_from_args(args, base.budget),
        engine=engine_config(args, base.engine),
        agent=agent_config(args, base.agent),
        resume=args.resume,
        progress=not args.no_progress,
        **_drop_none(
            {
                "name": args.name,
                "searcher": args.searcher,
                "space": args.space,
                "trials": args.trials,
                "structure": args.structure,
                "metric": args.metric,
                "epochs": args.epochs,
                "final_epochs": args.final_epochs,
                "concurrency": args.concurrency,
                "max_failures": args.max_failures,
                "node_wait": args.node_wait,
                "cpus_per_trial": args.cpus_per_trial,
                "gpus_per_trial": args.gpus_per_trial,
                "scheduler": args.scheduler,
                "storage": args.storage,
                "address": args.address,
                "tracking_uri": args.tracking_uri,
                "out": args.out,
            }
        ),
    )
