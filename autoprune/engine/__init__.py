"""The shared prune-and-fine-tune engine: plain functions on a model, its data and a policy.
No Ray, no MLflow (an import-linter contract in ``pyproject.toml`` holds it to that).

copy dense model -> (BN warm-up) -> score -> solve the budget -> prune -> measure ->
fine-tune -> evaluate (validation for decisions, test only for the final report).

Modules, from the bottom up: ``tasks`` and ``models`` (data and networks), ``attention``
(prunable attention heads), ``probe`` (what a forward pass does that the graph cannot
follow), ``graph`` (channel groups), ``costs`` (the cost model), ``layers`` (the search's
layer table), ``criteria``, ``solver`` (budget ->
what each group or layer loses), ``prune``, ``measure``, ``latency`` (the hardware's latency
table), ``checkpoint`` (save, load), ``export`` (pt2 and ONNX, any batch size), ``hooks`` (what a
method adds to training), ``train``, ``stages`` (one pruning step), ``methods`` (when pruning
happens: one module per method), ``run`` (one whole run) and ``threads`` (the torch threads the
search's driver trains with). The names below are the entry points the jobs, the search and the
tests use.
"""

from .hooks import ChannelMask, Hooks, TrainHook
from .latency import LatencyTable
from .latency_build import latency_table
from .methods import METHODS, Method, MethodContext, check_policy, make_method
from .run import RunResult, compare_latency, measure_model, run, task_latency_table
from .runtime import check_runtime
from .stages import (
    Pruned,
    channel_problem,
    check_budget,
    leave_kept,
    needs_latency_table,
    prune_to_budget,
    score,
    scoring_batches,
    solve_unstructured,
    warmup_on,
)
from .train import TrainingDiverged, cache_dir, dense_model, evaluate, resolve_device, seed_everything, train

__all__ = [
    "check_runtime",
    "METHODS",
    "ChannelMask",
    "Hooks",
    "LatencyTable",
    "Method",
    "MethodContext",
    "Pruned",
    "RunResult",
    "TrainingDiverged",
    "cache_dir",
    "channel_problem",
    "check_budget",
    "check_policy",
    "compare_latency",
    "dense_model",
    "evaluate",
    "latency_table",
    "leave_kept",
    "needs_latency_table",
    "make_method",
    "measure_model",
    "prune_to_budget",
    "resolve_device",
    "run",
    "score",
    "scoring_batches",
    "task_latency_table",
    "seed_everything",
    "solve_unstructured",
    "train",
    "TrainHook",
    "warmup_on",
]
