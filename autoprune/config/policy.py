"""What to prune and to what budget: :class:`Policy` (plain JSON data: searchers produce it, the
engine consumes it, MLflow stores it and ``autoprune prune --policy file.json`` replays it) and
:class:`Budget`."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import AutopruneError
from ..schema import (
    MAX_DOCUMENT_BYTES,
    MAX_EPOCHS,
    boolean,
    checked,
    choice,
    comma_list,
    from_dict,
    integer,
    key_values,
    mapping,
    nested,
    number,
    read_json,
    sequence,
    text,
    unit_interval,
    validate,
)

STRUCTURES = ("channel", "unstructured")
SCOPES = ("global", "local", "per_layer")
BUDGET_KINDS = ("flops", "params", "latency")
SEARCH_STRUCTURES = (*STRUCTURES, "any")  # what `search --structure` accepts
METRICS = ("val_acc", "val_loss")  # what a search of a classification task optimises (--metric)
REDUCTIONS = ("sum", "mean", "max")
WARMUP_MODES = ("scoring", "train")
ROUND_TO = (1, 4, 8, 16, "auto")  # kept channel widths: multiples of this; auto: the latency table's choice
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

    epochs: int = checked(
        integer(0, most=MAX_EPOCHS, flag="--finetune-epochs", help="fine-tuning epochs (default %(default)s)"), 5
    )
    lr: float = checked(
        number(0.0, low_open=True, most=1e6, flag="--lr", help="fine-tuning learning rate (default %(default)s)"), 0.01
    )  # peak learning rate
    momentum: float = checked(number(0.0, 1.0, high_open=True), 0.9)
    weight_decay: float = checked(number(0.0, 1.0), 5e-4)
    schedule: str = checked(choice(("cosine", "constant")), "cosine")
    bn_recalibrate: int = checked(
        integer(0, most=100_000), 0
    )  # after pruning, before fine-tuning: recompute BN statistics
    # on this many training batches (EagleEye, Li et al. 2020; the AMC agent's episodes use it); 0: off

    def __post_init__(self) -> None:
        validate(self, "policy.finetune", flags_first=False)


@dataclass
class Policy:
    """What to prune and how. Plain data, JSON round-trippable."""

    structure: str = checked(
        choice(STRUCTURES, flag="--structure", help="channel or unstructured (default %(default)s)"), "channel"
    )  # "channel" (physical removal) or "unstructured" (weight masks)
    criterion: str = checked(
        text(flag="--criterion", help="see `autoprune list criteria` (default %(default)s)"), "magnitude"
    )  # a name from the criterion registry
    criterion_options: dict[str, Any] = checked(
        mapping(
            flag="--criterion-option",
            repeat=True,
            parse=key_values,
            metavar="KEY=VALUE",
            help="a criterion option, repeatable (e.g. p=2 for L2 magnitude, probes=20 for hutchinson; "
            "see `autoprune list criteria`)",
        ),
        factory=dict,
    )  # e.g. {"p": 2}
    reduction: str = checked(
        choice(REDUCTIONS, flag="--reduction", help="channel score reduction (default %(default)s)"), "sum"
    )  # per-weight scores -> channel score
    scope: str = checked(
        choice(SCOPES, flag="--scope", help="local, global or per_layer (default %(default)s)"), "local"
    )
    ratios: dict[str, float] | None = checked(
        mapping(number(0.0, 1.0, high_open=True), optional=True), None
    )  # per_layer: group (or layer) name -> pruned fraction (scaled to the budget, unless `exact`)
    exact: bool = checked(boolean(), False)  # per_layer channel ratios are pruned as given (channels rounded
    # down), not scaled to the budget; the budget is then only checked (the AMC agent's allocations)
    method: str = checked(
        text(flag="--method", help="see `autoprune list methods` (default %(default)s)"), "oneshot"
    )  # a name from the method registry
    method_options: dict[str, Any] = checked(
        mapping(
            flag="--method-option",
            repeat=True,
            parse=key_values,
            metavar="KEY=VALUE",
            help="a method option, repeatable (e.g. iterations=5 for iterative or gradual; see "
            "`autoprune list methods`)",
        ),
        factory=dict,
    )  # checked against the method's own options (its defaults fill the rest) by engine.check_policy
    bn_warmup: bool | None = checked(
        boolean(
            optional=True,
            flag="--bn-warmup",
            help="refresh BN statistics on the scoring data before scoring (default: on for data-dependent criteria)",
        ),
        None,
    )  # refresh BN running statistics; None: on for data-dependent criteria, off for data-free ones
    max_ratio: float = checked(
        unit_interval(flag="--max-ratio", help="most of any group/layer to prune (default %(default)s)"), 0.9
    )  # no group (channel) or layer (unstructured) loses more than this fraction; a channel group always keeps
    # one channel, a layer may be emptied only at 1.0
    round_to: int | str = checked(
        choice(
            ROUND_TO,
            flag="--round-to",
            help="keep every pruned group's width a multiple of this (default %(default)s: any width); auto: the "
            "multiple the latency table finds fastest on this hardware",
        ),
        1,
    )  # channel structure only; a group whose dense width is no multiple may also stay whole
    bn_warmup_mode: str = checked(
        choice(
            WARMUP_MODES,
            flag="--bn-warmup-mode",
            help="scoring (default: %(default)s): statistics averaged over the scoring subset; train: one pass "
            "over the training split with BN's momentum, as the second-order pruning-at-initialisation study",
        ),
        "scoring",
    )  # "scoring": reset the statistics and average them over the scoring subset; "train": train mode
    bn_warmup_batches: int | None = checked(
        integer(
            1,
            most=1_000_000,
            optional=True,
            flag="--bn-warmup-batches",
            help="train warm-up: at most this many training batches (default: the whole split)",
        ),
        None,
    )
    keep: list[str] = checked(
        sequence(
            text(),
            allow_empty=True,
            flag="--keep",
            repeat=True,
            metavar="GLOB",
            help="never prune layers whose name matches (repeatable, e.g. 'fc*'; see `autoprune list groups`)",
        ),
        factory=list,
    )  # module-name globs: their weights stay dense and, for channels, no group touching them is pruned
    keep_types: list[str] = checked(
        sequence(
            choice(KEEP_TYPES),
            allow_empty=True,
            flag="--keep-types",
            parse=comma_list,
            metavar="TYPES",
            help=f"never prune layers of these types, comma-separated: {', '.join(KEEP_TYPES)}",
        ),
        factory=list,
    )
    keep_classifier: bool = checked(
        boolean(
            flag="--keep-classifier", help="never prune the output layer (for channels: nor the group that feeds it)"
        ),
        False,
    )
    embedding: bool = checked(boolean(), False)  # a vision transformer's embedding width is one more group
    # (channel pruning never prunes its outputs anyway)
    finetune: FinetuneConfig = checked(nested(FinetuneConfig), factory=FinetuneConfig)

    def __post_init__(self) -> None:
        validate(self, "policy", flags_first=False)
        if self.scope == "per_layer" and not self.ratios:
            raise AutopruneError("scope 'per_layer' needs 'ratios': a pruned fraction per group name")
        if self.exact and (self.scope != "per_layer" or self.structure != "channel"):
            raise AutopruneError("policy 'exact' needs scope 'per_layer' and structure 'channel'")
        if self.round_to != 1 and self.structure != "channel":
            raise AutopruneError(
                f"policy round_to {self.round_to!r} needs structure 'channel': weight masks keep every width"
            )
        if self.exact and self.method in ("iterative", "gradual", "lottery"):
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
        """From plain data; a record written before ``method_options`` existed (a top-level
        ``iterations``) reads as that method option."""
        if isinstance(data, dict) and "iterations" in data:
            data = dict(data)
            legacy = data.pop("iterations")
            if legacy is not None:
                data["method_options"] = {"iterations": legacy, **(data.get("method_options") or {})}
        return from_dict(cls, data, "policy")

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_json(cls, path: str | Path) -> Policy:
        path = Path(path)
        if not path.is_file():
            raise AutopruneError(f"policy file {str(path)!r} does not exist or is not a file")
        with path.open("rb") as f:
            data = read_json(f.read(MAX_DOCUMENT_BYTES + 1), f"policy file {str(path)!r}")
        if not isinstance(data, dict):
            raise AutopruneError(f"policy file {str(path)!r} must hold a JSON object")
        return cls.from_dict(data)
