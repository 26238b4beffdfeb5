"""Configuration dataclasses: the one home for defaults.

A :class:`Policy` is plain JSON data: searchers produce it, the engine consumes it, MLflow
stores it and ``autoprune prune --policy file.json`` replays it.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import AutopruneError, check_fraction

STRUCTURES = ("channel", "unstructured")
SCOPES = ("global", "local", "per_layer")
BUDGET_KINDS = ("flops", "params")
REDUCTIONS = ("sum", "mean", "max")


@dataclass(frozen=True)
class Budget:
    """The fraction of the dense model's cost to keep (``flops 0.5``: at most half the FLOPs)."""

    kind: str = "flops"  # "flops" (fvcore; effective FLOPs for masks) or "params" (nonzero)
    fraction: float = 0.5  # in (0, 1]; the solver lands within `tolerance` below it
    tolerance: float = 0.01  # accepted undershoot, as a fraction of the dense cost

    def __post_init__(self) -> None:
        if self.kind not in BUDGET_KINDS:
            raise AutopruneError(f"unknown budget kind {self.kind!r}; choose one of: {', '.join(BUDGET_KINDS)}")
        object.__setattr__(self, "fraction", check_fraction(f"--budget-{self.kind}", self.fraction))


@dataclass
class FinetuneConfig:
    """How the pruned network recovers: SGD with momentum and a cosine learning-rate schedule."""

    epochs: int = 5  # fine-tuning epochs after pruning
    lr: float = 0.01  # peak learning rate
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"  # "cosine" or "constant"

    def __post_init__(self) -> None:
        if self.epochs < 0:
            raise AutopruneError(f"fine-tune epochs must be >= 0, got {self.epochs}")
        if not self.lr > 0:
            raise AutopruneError(f"fine-tune learning rate must be > 0, got {self.lr}")
        if self.schedule not in ("cosine", "constant"):
            raise AutopruneError(f"unknown schedule {self.schedule!r}; choose one of: cosine, constant")


@dataclass
class Policy:
    """What to prune and how. Plain data, JSON round-trippable."""

    structure: str = "channel"  # "channel" (physical removal) or "unstructured" (weight masks)
    criterion: str = "magnitude"  # a name from the criterion registry (`autoprune list criteria`)
    criterion_options: dict[str, Any] = field(default_factory=dict)  # e.g. {"p": 2} for magnitude
    reduction: str = "sum"  # how per-weight scores become a channel score: sum, mean or max
    scope: str = "local"  # "global", "local" or "per_layer"
    ratios: dict[str, float] | None = None  # per_layer: group name -> pruned fraction (scaled to the budget)
    method: str = "oneshot"  # a name from the method registry (`autoprune list methods`)
    iterations: int | None = None  # iterative: prune/fine-tune rounds (default 3); gradual:
    # pruning steps along the cubic schedule (default 10)
    bn_warmup: bool | None = None  # refresh BN running statistics on the scoring data before
    # scoring; None: on for data-dependent criteria, off for data-free ones
    max_ratio: float = 0.9  # no group (channel) or layer (unstructured) loses more than this
    # fraction; a channel group always keeps one channel, a layer may be emptied only at 1.0
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)

    def __post_init__(self) -> None:
        if isinstance(self.finetune, dict):
            self.finetune = _build(FinetuneConfig, self.finetune, "policy.finetune")
        if self.structure not in STRUCTURES:
            raise AutopruneError(f"unknown structure {self.structure!r}; choose one of: {', '.join(STRUCTURES)}")
        if self.scope not in SCOPES:
            raise AutopruneError(f"unknown scope {self.scope!r}; choose one of: {', '.join(SCOPES)}")
        if self.reduction not in REDUCTIONS:
            raise AutopruneError(f"unknown reduction {self.reduction!r}; choose one of: {', '.join(REDUCTIONS)}")
        if self.iterations is not None and (isinstance(self.iterations, bool) or not isinstance(self.iterations, int)
                                            or self.iterations < 1):  # fmt: skip
            raise AutopruneError(f"iterations must be an integer >= 1, got {self.iterations!r}")
        if not 0.0 < self.max_ratio <= 1.0:
            raise AutopruneError(f"max_ratio must be in (0, 1], got {self.max_ratio}")
        if self.scope == "per_layer":
            if not self.ratios:
                raise AutopruneError("scope 'per_layer' needs 'ratios': a pruned fraction per group name")
            for name, r in self.ratios.items():
                if not isinstance(r, (int, float)) or not 0.0 <= r < 1.0:
                    raise AutopruneError(f"ratio for group {name!r} must be a number in [0, 1), got {r!r}")
        # Names are checked against the registries here so a bad policy fails before any work.
        from .criteria import CRITERIA
        from .methods import METHODS

        criterion = CRITERIA.get(self.criterion)
        if not isinstance(self.criterion_options, dict):
            raise AutopruneError(f"criterion_options must be a mapping, got {self.criterion_options!r}")
        criterion(**self.criterion_options)  # checks the option names and values
        METHODS.get(self.method)
        if self.structure not in criterion.structures:
            raise AutopruneError(
                f"criterion {self.criterion!r} supports structure(s) {', '.join(criterion.structures)}, "
                f"not {self.structure!r}"
            )

    def warmup(self) -> bool:
        """Whether BN warm-up runs: as set, or by default for data-dependent criteria."""
        if self.bn_warmup is not None:
            return bool(self.bn_warmup)
        from .criteria import CRITERIA

        return CRITERIA.get(self.criterion).needs_data

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Policy:
        return _build(cls, data, "policy")

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


def _build(cls: type, data: dict[str, Any], what: str) -> Any:
    allowed = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise AutopruneError(f"{what} has unknown key(s) {', '.join(unknown)}; allowed: {', '.join(allowed)}")
    try:
        return cls(**data)
    except TypeError as exc:
        raise AutopruneError(f"bad {what}: {exc}") from None


@dataclass
class MeasureConfig:
    """How latency is measured: median of timed forward passes after warm-up."""

    batch_sizes: tuple[int, ...] = (1, 32)  # latency is reported for each batch size
    warmup: int = 5  # untimed forward passes first
    repeats: int = 20  # timed forward passes; the median is reported
    threads: int = 1  # torch intra-op threads during CPU timing (fixed, so runs compare)


@dataclass
class TaskConfig:
    """Which task, model and data; resolved by :func:`autoprune.tasks.get_task`."""

    name: str = "digits"  # built-in task name or package.module:function
    model: str | None = None  # model name within the task (task default when None)
    data_dir: str | None = None  # local data directory (cifar10, imagefolder)
    image_size: int | None = None  # imagefolder: input resolution (default 224)
    batch_size: int = 64


@dataclass
class EngineConfig:
    """Everything one prune-and-fine-tune run needs besides the policy and budget."""

    task: TaskConfig = field(default_factory=TaskConfig)
    checkpoint: str | None = None  # dense weights to start from; else train once and cache
    train_epochs: int | None = None  # dense training epochs (task default when None)
    seed: int = 0
    device: str | None = None  # "cpu", "cuda", "cuda:1"; default: cuda when available
    cache_dir: str | None = None  # dense-model cache (default $AUTOPRUNE_CACHE or ~/.cache/autoprune)
    scoring_per_class: int = 10  # data-dependent criteria score on this many training samples per class
    measure: MeasureConfig = field(default_factory=MeasureConfig)
    progress: bool = True  # progress bars on training epochs

    def __post_init__(self) -> None:
        if isinstance(self.scoring_per_class, bool) or not isinstance(self.scoring_per_class, int) \
                or self.scoring_per_class < 1:  # fmt: skip
            raise AutopruneError(f"scoring_per_class must be an integer >= 1, got {self.scoring_per_class!r}")


SCHEDULERS = ("asha", "none")
DEFAULT_STORAGE = "~/autoprune_results"


@dataclass
class SearchConfig:
    """One policy search: what to search, how many trials, where they run and are recorded."""

    budget: Budget = field(default_factory=Budget)
    name: str | None = None  # results folder and MLflow experiment (default: search-<date>-<time>)
    searcher: str = "tpe"  # tpe, nsga2, random, grid (see autoprune.search.SEARCHERS)
    space: str = "default"  # a registered space (autoprune.search_spaces) or package.module:function
    trials: int | None = None  # trials to run (default 20; grid: the grid's size)
    epochs: int = 3  # training epochs per trial (fine-tuning; from scratch for method init)
    structure: str | None = None  # pin the structure in spaces that sample it (default: both)
    final_epochs: int = 10  # the best policy is re-run from the dense model with this many epochs
    concurrency: int | None = None  # trials at once (default: as many as the resources allow)
    cpus_per_trial: float = 1.0  # also the trial's torch threads
    gpus_per_trial: float = 0.0  # fractional allowed (trials then share a GPU)
    scheduler: str | None = None  # asha or none (default: asha, none for nsga2 and grid)
    storage: str = DEFAULT_STORAGE  # Ray Tune results: <storage>/<name>
    resume: bool = False  # continue the interrupted search <storage>/<name>
    address: str | None = None  # a running Ray cluster (default $RAY_ADDRESS, else a local instance)
    tracking_uri: str | None = None  # MLflow store (default sqlite:///<cwd>/mlflow.db)
    out: str | None = None  # where summary.json and the best model go (default <storage>/<name>/best)
    engine: EngineConfig = field(default_factory=EngineConfig)
    progress: bool = True  # the live progress line

    def __post_init__(self) -> None:
        def whole(name: str, value: Any, low: int) -> None:
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise AutopruneError(f"{name} must be an integer >= {low}, got {value!r}")

        if self.trials is not None:
            whole("--trials", self.trials, 1)
        whole("--epochs", self.epochs, 1)
        whole("--final-epochs", self.final_epochs, 0)
        if self.concurrency is not None:
            whole("--concurrency", self.concurrency, 1)
        if not self.cpus_per_trial > 0:
            raise AutopruneError(f"--cpus-per-trial must be > 0, got {self.cpus_per_trial}")
        if not self.gpus_per_trial >= 0:
            raise AutopruneError(f"--gpus-per-trial must be >= 0, got {self.gpus_per_trial}")
        if self.gpus_per_trial > 1 and self.gpus_per_trial != int(self.gpus_per_trial):
            raise AutopruneError(f"--gpus-per-trial above 1 must be a whole number, got {self.gpus_per_trial}")
        if self.structure is not None and self.structure not in STRUCTURES:
            raise AutopruneError(f"unknown structure {self.structure!r}; choose one of: {', '.join(STRUCTURES)}")
        if self.scheduler is not None and self.scheduler not in SCHEDULERS:
            raise AutopruneError(f"unknown scheduler {self.scheduler!r}; choose one of: {', '.join(SCHEDULERS)}")
        if self.name is not None and not _NAME.fullmatch(self.name):
            raise AutopruneError(
                f"--name {self.name!r} must be 1-100 letters, digits, '.', '_' or '-', not starting with '.' "
                "(it names a folder)"
            )


_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,99}")
