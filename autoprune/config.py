"""Configuration dataclasses: the one home for defaults.

A :class:`Policy` is plain JSON data: searchers produce it, the engine consumes it, MLflow
stores it and ``autoprune prune --policy file.json`` replays it.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import AutopruneError
from .schema import (
    boolean,
    checked,
    choice,
    from_dict,
    integer,
    mapping,
    nested,
    number,
    sequence,
    text,
    unit_interval,
    validate,
)

STRUCTURES = ("channel", "unstructured")
SCOPES = ("global", "local", "per_layer")
BUDGET_KINDS = ("flops", "params", "latency")
SEARCH_STRUCTURES = (*STRUCTURES, "any")  # what `search --structure` accepts
METRICS = ("val_acc", "val_loss")  # what a search optimises (--metric)
REDUCTIONS = ("sum", "mean", "max")
WARMUP_MODES = ("scoring", "train")
KEEP_TYPES = ("conv", "conv1d", "conv2d", "conv3d", "linear")


@dataclass(frozen=True)
class Budget:
    """The fraction of the dense model's cost to keep (``flops 0.5``: at most half the FLOPs)."""

    kind: str = checked(choice(BUDGET_KINDS), "flops")  # "flops" (fvcore; effective FLOPs for masks), "params"
    # or "latency" (predicted by the hardware's latency table at MeasureConfig.latency_batch; channels only)
    fraction: float = checked(
        unit_interval(flag="--budget-flops/--budget-params/--budget-latency"), 0.5
    )  # in (0, 1]; the solver lands within `tolerance` below it
    tolerance: float = checked(number(0.0, 1.0, high_open=True), 0.01)  # accepted undershoot, a fraction of dense

    def __post_init__(self) -> None:
        if self.kind in BUDGET_KINDS:  # name the flag the user typed
            object.__setattr__(
                self,
                "fraction",
                unit_interval(flag=f"--budget-{self.kind}").check(self.fraction, f"--budget-{self.kind}"),
            )
        validate(self, "budget")


@dataclass
class FinetuneConfig:
    """How the pruned network recovers: SGD with momentum and a cosine learning-rate schedule."""

    epochs: int = checked(integer(0, flag="--finetune-epochs"), 5)  # fine-tuning epochs after pruning
    lr: float = checked(number(0.0, low_open=True, flag="--lr"), 0.01)  # peak learning rate
    momentum: float = checked(number(0.0, 1.0, high_open=True), 0.9)
    weight_decay: float = checked(number(0.0), 5e-4)
    schedule: str = checked(choice(("cosine", "constant")), "cosine")
    bn_recalibrate: int = checked(integer(0), 0)  # after pruning, before fine-tuning: recompute BN statistics
    # on this many training batches (EagleEye, Li et al. 2020; the AMC agent's episodes use it); 0: off

    def __post_init__(self) -> None:
        validate(self, "policy.finetune", flags_first=False)


@dataclass
class Policy:
    """What to prune and how. Plain data, JSON round-trippable."""

    structure: str = checked(choice(STRUCTURES, flag="--structure"), "channel")  # "channel" (physical
    # removal) or "unstructured" (weight masks)
    criterion: str = checked(text(flag="--criterion"), "magnitude")  # a name from the criterion registry
    criterion_options: dict[str, Any] = checked(mapping(flag="--criterion-option"), factory=dict)  # e.g. {"p": 2}
    reduction: str = checked(choice(REDUCTIONS, flag="--reduction"), "sum")  # per-weight scores -> channel score
    scope: str = checked(choice(SCOPES, flag="--scope"), "local")  # "global", "local" or "per_layer"
    ratios: dict[str, float] | None = checked(
        mapping(number(0.0, 1.0, high_open=True), optional=True), None
    )  # per_layer: group (or layer) name -> pruned fraction (scaled to the budget, unless `exact`)
    exact: bool = checked(boolean(), False)  # per_layer channel ratios are pruned as given (channels rounded
    # down), not scaled to the budget; the budget is then only checked (the AMC agent's allocations)
    method: str = checked(text(flag="--method"), "oneshot")  # a name from the method registry
    iterations: int | None = checked(integer(1, optional=True, flag="--iterations"), None)  # iterative:
    # prune/fine-tune rounds (default 3); gradual: pruning steps along the cubic schedule (default 10)
    bn_warmup: bool | None = checked(boolean(optional=True, flag="--bn-warmup"), None)  # refresh BN running
    # statistics on the scoring data before scoring; None: on for data-dependent criteria, off for data-free ones
    max_ratio: float = checked(unit_interval(flag="--max-ratio"), 0.9)  # no group (channel) or layer (unstructured)
    # loses more than this fraction; a channel group always keeps one channel, a layer may be emptied only at 1.0
    bn_warmup_mode: str = checked(choice(WARMUP_MODES, flag="--bn-warmup-mode"), "scoring")  # "scoring": reset
    # the statistics and average them over the scoring subset; "train": one pass over the training split in train
    # mode with BN's own momentum (the second-order pruning-at-initialisation study's warm-up)
    bn_warmup_batches: int | None = checked(integer(1, optional=True, flag="--bn-warmup-batches"), None)  # "train"
    # mode: at most this many training batches (default: the whole split)
    keep: list[str] = checked(sequence(text(), allow_empty=True, flag="--keep"), factory=list)  # module-name globs
    # never pruned (e.g. "fc*"): their weights stay dense and, for channels, no group touching them is pruned
    keep_types: list[str] = checked(
        sequence(choice(KEEP_TYPES), allow_empty=True, flag="--keep-types"), factory=list
    )  # layer types never pruned: conv, conv1d, conv2d, conv3d, linear
    keep_classifier: bool = checked(boolean(flag="--keep-classifier"), False)  # the output layer stays dense
    embedding: bool = checked(boolean(), False)  # a vision transformer's embedding width is one more group
    # (channel pruning never prunes its outputs anyway)
    finetune: FinetuneConfig = checked(nested(FinetuneConfig), factory=FinetuneConfig)

    def __post_init__(self) -> None:
        validate(self, "policy", flags_first=False)
        if self.scope == "per_layer" and not self.ratios:
            raise AutopruneError("scope 'per_layer' needs 'ratios': a pruned fraction per group name")
        if self.exact and (self.scope != "per_layer" or self.structure != "channel"):
            raise AutopruneError("policy 'exact' needs scope 'per_layer' and structure 'channel'")
        if self.exact and self.method in ("iterative", "gradual"):
            raise AutopruneError(
                f"policy 'exact' prunes its ratios once; method {self.method!r} prunes in steps: "
                "use oneshot, rewind or init"
            )
        # The registry names (criterion, method) are checked by engine.check_policy, which
        # every path that runs a policy calls: building plain data imports no torch.

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Policy:
        return from_dict(cls, data, "policy")

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_json(cls, path: str | Path) -> Policy:
        path = Path(path)
        if not path.is_file():
            raise AutopruneError(f"policy file {str(path)!r} does not exist or is not a file")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise AutopruneError(f"policy file {str(path)!r} is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise AutopruneError(f"policy file {str(path)!r} must hold a JSON object")
        return cls.from_dict(data)


def _batch_sizes(value) -> str | None:
    return None if len(set(value)) == len(value) else "must not repeat a batch size"


@dataclass
class MeasureConfig:
    """How latency is measured: median of timed forward passes after warm-up."""

    batch_sizes: tuple[int, ...] = checked(sequence(integer(1), extra=_batch_sizes), (1, 32))  # latency per batch size
    warmup: int = checked(integer(0), 5)  # untimed forward passes first
    repeats: int = checked(integer(1, flag="--latency-passes"), 20)  # timed forward passes; the median is reported
    seconds: float = checked(number(0.1, flag="--latency-seconds"), 60.0)  # a timing stops after the round that
    # passes this (at least 3 rounds), so big models on CPU are not minutes of timing
    threads: int = checked(integer(1, flag="--threads"), 1)  # torch intra-op threads during CPU timing (fixed,
    # so runs compare)
    latency_batch: int = checked(integer(1, flag="--latency-batch"), 1)  # the batch size --budget-latency, the
    # latency table and the reported speed-up refer to

    def __post_init__(self) -> None:
        validate(self, "measure")
        self.batch_sizes = tuple(self.batch_sizes)


MIN_IMAGE_SIZE = 16  # the smallest input resolution the torchvision classifiers run on here


@dataclass
class TaskConfig:
    """Which task, model and data; resolved by :func:`autoprune.engine.tasks.get_task`."""

    name: str = checked(text(flag="--task"), "digits")  # built-in task name or package.module:function
    model: str | None = checked(text(optional=True, flag="--model"), None)  # model within the task (its default)
    data_dir: str | None = checked(text(optional=True, flag="--data-dir"), None)  # local data (cifar10, imagefolder)
    image_size: int | None = checked(integer(MIN_IMAGE_SIZE, optional=True, flag="--image-size"), None)  # imagefolder:
    # input resolution (default 224)
    batch_size: int = checked(integer(1, flag="--batch-size"), 64)

    def __post_init__(self) -> None:
        validate(self, "task")


@dataclass
class EngineConfig:
    """Everything one prune-and-fine-tune run needs besides the policy and budget."""

    task: TaskConfig = checked(nested(TaskConfig), factory=TaskConfig)
    checkpoint: str | None = checked(text(optional=True, flag="--checkpoint"), None)  # dense weights to start
    # from; else train once and cache
    train_epochs: int | None = checked(integer(0, optional=True, flag="--train-epochs"), None)  # dense training
    # epochs (task default when None; 0 on purpose: an untrained model)
    seed: int = checked(integer(0, flag="--seed"), 0)
    device: str | None = checked(text(optional=True, flag="--device"), None)  # "cpu", "cuda", "cuda:1"; default:
    # cuda when available
    cache_dir: str | None = checked(text(optional=True, flag="--cache-dir"), None)  # dense-model cache (default
    # $AUTOPRUNE_CACHE or ~/.cache/autoprune)
    scoring_per_class: int = checked(integer(1, flag="--scoring-per-class"), 10)  # data-dependent criteria score
    # on this many training samples per class
    measure: MeasureConfig = checked(nested(MeasureConfig), factory=MeasureConfig)
    progress: bool = checked(boolean(), True)  # progress bars on training epochs

    def __post_init__(self) -> None:
        validate(self, "engine")


SCHEDULERS = ("asha", "none")
DEFAULT_STORAGE = "~/autoprune_results"


_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,99}")


def _search_name(value: str) -> str | None:
    return (
        None
        if _NAME.fullmatch(value)
        else "must be 1-100 letters, digits, '.', '_' or '-', not starting with '.' (it names a folder)"
    )


def _whole_above_one(value: float) -> str | None:
    return "above 1 must be a whole number" if value > 1 and value != int(value) else None


REWARDS = ("acc", "acc_flops", "acc_latency")


@dataclass
class AgentConfig:
    """The AMC agent (``--searcher amc``): its episodes' reward and criterion, and its DDPG
    settings (``autoprune.agents.ddpg.DDPGConfig``, AMC's values by default)."""

    reward: str = checked(choice(REWARDS, flag="--reward"), "acc")  # acc: accuracy under the hard budget;
    # acc_flops: AMC's -error * log(FLOPs); acc_latency: acc * (latency / target) ** weight (MnasNet)
    reward_weight: float = checked(number(flag="--reward-weight"), -0.07)  # acc_latency's exponent w above
    # the target (MnasNet's soft constraint: -0.07; hard: -1)
    reward_weight_below: float | None = checked(number(optional=True, flag="--reward-weight-below"), None)  # w at
    # or below the target (default: --reward-weight; MnasNet's hard constraint: 0)
    reward_target: float | None = checked(
        unit_interval(optional=True, flag="--reward-target"), None
    )  # acc_latency's target, a fraction of the dense predicted latency (default: the budget's fraction)
    criterion: str = checked(text(flag="--agent-criterion"), "magnitude")  # which channels go within a group
    warmup_episodes: int | None = checked(integer(0, optional=True, flag="--warmup-episodes"), None)  # random
    # episodes first (default: a quarter of the episodes)
    recalibrate_batches: int = checked(integer(1, flag="--recalibrate-batches"), 8)  # training batches that
    # recompute BN statistics before an episode's accuracy is taken
    options: dict[str, Any] = checked(mapping(flag="--agent-option"), factory=dict)  # DDPGConfig fields by name

    def __post_init__(self) -> None:
        validate(self, "agent")


@dataclass
class SearchConfig:
    """One policy search: what to search, how many trials, where they run and are recorded."""

    budget: Budget = checked(nested(Budget), factory=Budget)
    name: str | None = checked(text(optional=True, flag="--name", extra=_search_name), None)  # results folder and
    # MLflow experiment (default: search-<date>-<time>)
    searcher: str = checked(
        text(flag="--searcher"), "tpe"
    )  # tpe, nsga2, random, grid (autoprune.search.searchers.SEARCHERS)
    space: str = checked(text(flag="--space"), "default")  # a registered space or package.module:function
    trials: int | None = checked(integer(1, optional=True, flag="--trials"), None)  # trials to run (default 20;
    # grid: the grid's size)
    epochs: int | None = checked(integer(0, optional=True, flag="--epochs"), None)  # training epochs per trial
    # (fine-tuning; from scratch for method init); default 3, amc 0 (AMC's protocol: episodes are not fine-tuned);
    # 0 runs no scheduler
    structure: str | None = checked(choice(SEARCH_STRUCTURES, optional=True, flag="--structure"), None)  # what
    # spaces that sample the structure may choose: channel (the default: a really faster model), unstructured or
    # any (both); weight masks need sparse kernels or hardware to run faster
    metric: str = checked(choice(METRICS, flag="--metric"), "val_acc")  # what the searchers optimise: validation
    # accuracy (up) or validation loss (down, for tasks where accuracy saturates); ties: lower predicted latency
    final_epochs: int = checked(integer(0, flag="--final-epochs"), 10)  # the best policy is re-run from the dense
    # model with this many epochs
    concurrency: int | None = checked(integer(1, optional=True, flag="--concurrency"), None)  # trials at once
    # (default: as many as the resources allow)
    cpus_per_trial: float = checked(number(0, low_open=True, flag="--cpus-per-trial"), 1.0)  # also the trial's
    # torch threads
    gpus_per_trial: float = checked(number(0, flag="--gpus-per-trial", extra=_whole_above_one), 0.0)  # fractions
    # allowed (trials then share a GPU)
    max_failures: int = checked(integer(0, flag="--max-failures"), 2)  # a failed trial (its node died, say) is
    # run again from the start, on any node, up to this many times; then it is recorded FAILED
    node_wait: float = checked(number(0, flag="--node-wait"), 300.0)  # seconds the search waits with no node
    # able to run a trial (every worker lost) before it stops with an error, keeping what was recorded
    scheduler: str | None = checked(choice(SCHEDULERS, optional=True, flag="--scheduler"), None)  # asha or none
    # (default: asha, none for nsga2 and grid)
    storage: str = checked(text(flag="--storage"), DEFAULT_STORAGE)  # Ray Tune results: <storage>/<name>
    resume: bool = checked(boolean(flag="--resume"), False)  # continue the interrupted search <storage>/<name>
    address: str | None = checked(text(optional=True, flag="--address"), None)  # a running Ray cluster (default
    # $RAY_ADDRESS, else a local instance)
    tracking_uri: str | None = checked(text(optional=True, flag="--tracking-uri"), None)  # MLflow store (default
    # sqlite:///<cwd>/mlflow.db)
    out: str | None = checked(text(optional=True, flag="--out"), None)  # summary.json and the best model (default
    # <storage>/<name>/best)
    engine: EngineConfig = checked(nested(EngineConfig), factory=EngineConfig)
    agent: AgentConfig = checked(nested(AgentConfig), factory=AgentConfig)  # --searcher amc only
    progress: bool = checked(boolean(), True)  # the live progress line

    def __post_init__(self) -> None:
        validate(self, "search")
