"""The searcher contract: what a searcher hands a trial, what a trial reports, when a report
is final, and what the search keeps of each trial. Plain data, no torch, no Ray: the search
(``autoprune.search``), the MLflow callback (``autoprune.tracking``) and the AMC agent
(``autoprune.agents``) all read it from here, so none keeps its own copy.

A searcher (a ``ray.tune.search.Searcher``) answers ``suggest(trial_id)`` with a Ray Tune
config dict whose keys are :class:`TrialConfig`'s fields. The trial turns it into a
``Policy`` and runs the engine, reporting through ``ray.tune.report``:

* every fine-tuning epoch but the last: ``epoch``, ``val_acc``, ``val_loss``, ``loss``
  (training), ``node_id``;
* once the model has its final structure (before fine-tuning, except for gradual pruning),
  every later report also carries the pruned model's cost (:data:`COST_KEYS`, a searcher's
  :data:`SEARCHER_KEYS`, and
  ``ratios``: the realised pruned fraction per group or layer). Its latency there is the
  hardware latency table's prediction (``latency_predicted_ms``, ``latency_ratio`` of the dense
  model's predicted latency): trials share the machine, so a timing would measure what runs
  beside them, not the model;
* the last report (with the last epoch) adds :data:`FINAL_KEYS` and ``final: True``.

A trial that ends without a final report was stopped by the scheduler; the searcher's
``on_trial_complete`` then gets its last, partial report (see :func:`is_final`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from .errors import AutopruneError

# per epoch (the task's metric: val_acc for classification, its own val_<name> otherwise, see
# task_metric_keys; these tuples name accuracy's)
EPOCH_KEYS = ("epoch", "val_acc", "val_loss", "loss", "node_id")
# the pruned model's cost: known once pruning is done, reported from then on (latency predicted)
COST_KEYS = ("flops", "params", "flops_ratio", "params_ratio", "latency_predicted_ms", "latency_ratio")
# what a searcher's trial hook may add to the reports once pruned (SearcherHooks.report_keys): the
# AMC agent's accuracy after BN recalibration without fine-tuning (validation split) and its reward
SEARCHER_KEYS = ("recal_acc", "reward")
# only in the final report: the predicted speed-up, and the trial's own timing of its model
# (taken while other trials run beside it: for information, never for decisions)
FINAL_KEYS = ("predicted_speedup", "latency_measured_ms", "engine_s", "report_s")
FINAL = "final"  # the final report's marker
# what a trial reports of its pruned model
PRUNED_METRICS = ("val_acc", "val_loss", *COST_KEYS, *SEARCHER_KEYS, "predicted_speedup", "latency_measured_ms")
# what a trial's record keeps of its last report (search.journal)
REPORTED = (*EPOCH_KEYS, *COST_KEYS, *SEARCHER_KEYS, *FINAL_KEYS, "ratios", FINAL)


def is_final(report: dict[str, Any] | None) -> bool:
    """Whether a trial's report is its final one: the trial ran to the end (not stopped early)."""
    return bool(report) and report.get(FINAL) is True


# A task's metric (engine.tasks.Metric) is reported as ``val_<name>`` and ``test_<name>``;
# the default, accuracy, as val_acc and test_acc. Which way each name is better, and whether it
# reads as a percentage: the built-ins here, a task's own declared when the task is built
# (declare_metric), so every process that builds or reads the task knows it.
METRIC_NAMES: dict[str, tuple[str, bool]] = {
    "acc": ("max", True),
    "miou": ("max", True),
    "rmse": ("min", False),
    "mae": ("min", False),
    "loss": ("min", False),
}
SCORE = "acc"  # the default task metric's name
# what a search may optimise besides a task metric (an agent's search: its reward), and which way
METRIC_MODES = {"val_loss": "min", "reward": "max"}


def declare_metric(name: str, mode: str, percent: bool = False) -> None:
    """Make a task metric's direction known: ``mode`` is "max" (higher is better) or "min"."""
    if mode not in ("max", "min"):
        raise AutopruneError(f"metric {name!r}: mode must be 'max' or 'min', got {mode!r}")
    known = METRIC_NAMES.get(name)
    if known is not None and known[0] != mode:
        raise AutopruneError(
            f"metric name {name!r} is taken by a metric where {known[0]} is better; give this one another name"
        )
    METRIC_NAMES[name] = (mode, bool(percent))


def task_metric_keys(report: dict[str, Any], splits: tuple[str, ...] = ("val",)) -> list[str]:
    """The task metrics ``report`` holds on ``splits`` (``val_acc``, ``test_rmse`` ...; not the
    loss), in the order of ``splits``, then by name."""
    found = []
    for key in report:
        split, _, name = key.partition("_")
        if split in splits and name != "loss" and name in METRIC_NAMES:
            found.append((splits.index(split), key))
    return [key for _, key in sorted(found)]


def _metric_name(key: str) -> str:
    return key.split("_", 1)[1] if key.startswith(("val_", "test_", "search_val_")) else key


def metric_mode(key: str) -> str:
    """ "max" or "min": which way ``key`` (``val_acc``, ``test_rmse``, ``reward`` ...) is better."""
    if key in METRIC_MODES:
        return METRIC_MODES[key]
    known = METRIC_NAMES.get(_metric_name(key))
    if known is None:
        raise AutopruneError(f"unknown metric {key!r}; known: {', '.join(sorted(METRIC_NAMES))}")
    return known[0]


def better(key: str, a: float, b: float) -> bool:
    """Whether ``a`` is strictly better than ``b`` by ``key``'s direction."""
    return a > b if metric_mode(key) == "max" else a < b


def is_percent(key: str) -> bool:
    """Whether ``key``'s metric reads as a percentage (a fraction in 0..1: accuracy, mean IoU)."""
    known = METRIC_NAMES.get(_metric_name(key))
    return known is not None and known[1]


def show_metric(key: str, value: float | None) -> str:
    """``value`` of ``key`` for people: ``98.52%`` for a percentage metric, else 4 significant digits."""
    if value is None:
        return "-"
    return f"{100 * value:.2f}%" if is_percent(key) else f"{value:.4g}"


def objectives(kind: str, metric: str = "val_acc") -> tuple[tuple[str, str], ...]:
    """The multi-objective searchers' goals: the metric, the budget's cost fraction and the
    predicted latency (for a latency budget: the FLOPs fraction instead)."""
    third = "flops_ratio" if kind == "latency" else "latency_predicted_ms"
    return ((metric, metric_mode(metric)), (f"{kind}_ratio", "min"), (third, "min"))


@dataclass(frozen=True)
class TrialConfig:
    """What a searcher hands a trial: Ray Tune's per-trial config, keyed by these fields.

    ``policy``: the :class:`~autoprune.config.Policy` fields the searcher chose, as a dict
    (the search sets the fine-tuning epochs itself). ``budget_fraction``: a budget below the
    search's own, in the search's budget kind (the multi-objective searchers vary it so the
    cost objective varies); None keeps the search's. ``space_error``: the search space failed
    to propose a policy; the trial fails with this message instead of running. ``searcher``:
    what the searcher needs to be told of this trial again on ``--resume`` (plain JSON data:
    Optuna's parameters and their distributions, the agent's episode); the trial ignores it, the
    search keeps it in the trial's record (:mod:`autoprune.search.journal`).
    """

    policy: dict[str, Any] = field(default_factory=dict)
    budget_fraction: float | None = None
    space_error: str | None = None
    searcher: dict[str, Any] | None = None

    def to_config(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> TrialConfig:
        unknown = sorted(set(config) - set(TRIAL_CONFIG_KEYS))
        if unknown:
            raise AutopruneError(
                f"a searcher handed the trial unknown key(s) {', '.join(unknown)}; "
                "a trial config has policy, budget_fraction, space_error and searcher"
            )
        policy = config.get("policy", {})
        if not isinstance(policy, dict):
            raise AutopruneError(f"a trial config's policy must be a dict, got {type(policy).__name__}")
        fraction = config.get("budget_fraction")
        if fraction is not None and not (isinstance(fraction, (int, float)) and 0 < fraction <= 1):
            raise AutopruneError(f"a trial config's budget_fraction must be in (0, 1], got {fraction!r}")
        error = config.get("space_error")
        memo = config.get("searcher")
        if memo is not None and not isinstance(memo, dict):
            raise AutopruneError(f"a trial config's searcher data must be a dict, got {type(memo).__name__}")
        return cls(
            dict(policy),
            None if fraction is None else float(fraction),
            None if error is None else str(error),
            None if memo is None else dict(memo),
        )


TRIAL_CONFIG_KEYS = ("policy", "budget_fraction", "space_error", "searcher")


@dataclass
class TrialRecord:
    """What the search keeps of one trial once Tune is done with it."""

    number: int  # the order the trials started in
    trial_id: str  # Ray Tune's
    status: str  # "completed", "stopped" (by the scheduler), "failed", or Tune's own for the rest
    policy: dict[str, Any]
    budget_fraction: float | None
    metrics: dict[str, float]  # from the last report: PRUNED_METRICS, engine_s, epoch
    ratios: dict[str, float]  # realised pruned fraction per group or layer (once pruned)
    node_id: str | None = None
    error: str | None = None
    run_id: str | None = None  # its MLflow child run
    baseline: str | None = None  # the baseline it ran (search.baselines: uniform, global), None if sampled

    @property
    def label(self) -> str:
        """What the trial is, for people: ``#7 snip/global`` (its MLflow run's name)."""
        return trial_label(self.policy, self.number + 1, self.baseline, self.metrics)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def policy_text(policy: dict[str, Any], missing: str | None = None) -> str:
    """``channel/snip/global``, and the method after it when it is not the default
    (``channel/snip/global/sfp``); a field the policy lacks is left out, or shown as ``missing``."""
    keys = ["structure", "criterion", "scope"] + (["method"] if policy.get("method", "oneshot") != "oneshot" else [])
    return "/".join(str(policy.get(k) or missing) for k in keys if policy.get(k) or missing)


def trial_label(
    policy: dict[str, Any], number: int, baseline: str | None = None, metrics: dict[str, Any] | None = None
) -> str:
    """``#7 snip/global`` for the ``number``-th trial (counted from 1), the number first so
    that a cut name keeps it: the criterion and scope, the method after them when not the
    default (``#7 snip/global/sfp``), ``masks`` for unstructured pruning (``#7 magnitude/local
    masks``), the width multiple when rounded (``#7 snip/global x16``, ``x auto``); a baseline
    trial's says so (``#1 uniform baseline``). An agent's episode, once
    it has its reward, is named by that and the FLOPs it kept: ``#7 r=0.83 f=0.44``."""
    m = metrics or {}
    if m.get("reward") is not None and m.get("flops_ratio") is not None:
        return f"#{number} r={m['reward']:.2f} f={m['flops_ratio']:.2f}"
    keys = ["criterion", "scope"] + (["method"] if policy.get("method", "oneshot") != "oneshot" else [])
    what = "/".join(str(policy[k]) for k in keys if policy.get(k))
    if policy.get("structure") == "unstructured":
        what = f"{what} masks".strip()
    if policy.get("round_to", 1) != 1:
        what = f"{what} x{policy['round_to']}" if policy["round_to"] != "auto" else f"{what} x auto"
    if baseline:
        return f"#{number} {baseline} baseline" + (f" ({what})" if what else "")
    return f"#{number} {what or 'trial'}"
