"""A policy search's settings, and the AMC agent's."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any

from ..schema import (
    MAX_EPOCHS,
    boolean,
    checked,
    choice,
    integer,
    key_values,
    mapping,
    nested,
    number,
    text,
    unit_interval,
    validate,
)
from .policy import SEARCH_STRUCTURES, Budget
from .run import EngineConfig

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

    reward: str = checked(
        choice(
            REWARDS,
            flag="--reward",
            help="acc (accuracy under the hard budget), acc_flops (-error*log(FLOPs)) or acc_latency "
            "(acc*(latency/target)^w) (default %(default)s)",
        ),
        "acc",
    )  # acc_latency: MnasNet's
    reward_weight: float = checked(
        number(-10.0, 10.0, flag="--reward-weight", help="acc_latency's w above the target (default %(default)g)"),
        -0.07,
    )  # MnasNet's soft constraint: -0.07; hard: -1
    reward_weight_below: float | None = checked(
        number(
            -10.0,
            10.0,
            optional=True,
            flag="--reward-weight-below",
            help="acc_latency's w at or below the target (default: w)",
        ),
        None,
    )  # MnasNet's hard constraint: 0
    reward_target: float | None = checked(
        unit_interval(
            optional=True,
            flag="--reward-target",
            help="acc_latency's target, a fraction of the dense latency (default: the budget's fraction)",
        ),
        None,
    )  # of the dense predicted latency
    criterion: str = checked(
        text(flag="--agent-criterion", help="which channels go within a group (default %(default)s)"), "magnitude"
    )
    warmup_episodes: int | None = checked(
        integer(
            0,
            most=100_000,
            optional=True,
            flag="--warmup-episodes",
            help="episodes of random actions first (default: a quarter)",
        ),
        None,
    )  # None: resolved()
    recalibrate_batches: int = checked(
        integer(
            1,
            most=10_000,
            flag="--recalibrate-batches",
            help="training batches that recompute BN statistics before an episode's accuracy (default %(default)s)",
        ),
        8,
    )
    options: dict[str, Any] = checked(
        mapping(
            flag="--agent-option",
            repeat=True,
            parse=key_values,
            metavar="KEY=VALUE",
            help="a DDPG setting (AMC's by default): hidden, actor_lr, critic_lr, tau, batch, discount, sigma, "
            "sigma_decay, baseline_alpha, buffer, updates_per_step",
        ),
        factory=dict,
    )  # DDPGConfig fields by name

    def __post_init__(self) -> None:
        validate(self, "agent")

    def resolved(self, episodes: int) -> AgentConfig:
        """This config with its unset defaults filled in for a search of ``episodes``."""
        warmup = self.warmup_episodes if self.warmup_episodes is not None else max(1, episodes // 4)
        return dataclasses.replace(self, warmup_episodes=warmup)


DEFAULT_TRIALS = 20  # --trials when neither the user nor the searcher sets it
DEFAULT_EPOCHS = 3  # --epochs likewise

SEARCH_HELP = {  # the flags' help, beside their field
    "name": "the search's name: results folder and MLflow experiment (default search-<date>-<time>)",
    "searcher": "tpe (default), nsga2 (Pareto front of accuracy, FLOPs, latency), random, grid or amc (a DDPG agent)",
    "space": "default (default), criteria, pai, methods or package.module:function",
    "trials": f"trials (amc: episodes) to run (default {DEFAULT_TRIALS}; amc 25 per prunable group, at least 40; grid: its size)",
    "epochs": f"training epochs per trial (default {DEFAULT_EPOCHS}; amc 0)",
    "structure": "channel (default: channels removed, a really faster model), unstructured (weight masks: they "
    "need sparse kernels or hardware to run faster) or any (both), in spaces that sample the structure",
    "metric": "what the searchers optimise: the task's metric on the validation split (default: val_acc, "
    "val_miou, val_rmse, ... as the task reports it) or val_loss (when the metric saturates); ties go to the "
    "lower predicted latency",
    "scheduler": "none (default: every trial runs its epochs) or asha (stops weak trials after half their "
    "epochs; one metric only)",
    "resume": "continue the interrupted search --name with its saved settings (only --out, --address and "
    "--no-progress may differ)",
}


@dataclass
class SearchConfig:
    """One policy search: what to search, how many trials, where they run and are recorded."""

    budget: Budget = checked(nested(Budget), factory=Budget)
    name: str | None = checked(
        text(optional=True, flag="--name", extra=_search_name, help=SEARCH_HELP["name"]), None
    )  # results folder and MLflow experiment
    searcher: str = checked(
        text(flag="--searcher", help=SEARCH_HELP["searcher"]), "tpe"
    )  # tpe, nsga2, random, grid, amc (autoprune.search.searchers.SEARCHERS)
    space: str = checked(text(flag="--space", help=SEARCH_HELP["space"]), "default")  # registered or pkg.mod:fn
    trials: int | None = checked(
        integer(1, most=100_000, optional=True, flag="--trials", aliases=("--episodes",), help=SEARCH_HELP["trials"]),
        None,
    )  # None: resolved()
    epochs: int | None = checked(
        integer(0, most=MAX_EPOCHS, optional=True, flag="--epochs", help=SEARCH_HELP["epochs"]), None
    )  # training epochs per trial (fine-tuning; from scratch for method init); AMC's episodes are not fine-tuned;
    # 0 runs no scheduler; None: resolved()
    structure: str | None = checked(
        choice(SEARCH_STRUCTURES, optional=True, flag="--structure", help=SEARCH_HELP["structure"]), None
    )  # what spaces that sample the structure may choose
    metric: str | None = checked(
        text(optional=True, flag="--metric", help=SEARCH_HELP["metric"]), None
    )  # None: the task's metric (its own direction); val_loss (down); ties: lower predicted latency
    final_epochs: int = checked(
        integer(
            0,
            most=MAX_EPOCHS,
            flag="--final-epochs",
            help="epochs when the best policy is re-run for the saved model (default %(default)s)",
        ),
        10,
    )  # the best policy is re-run from the dense model
    final_top_k: int = checked(
        integer(
            1,
            most=100,
            flag="--final-top-k",
            help="the best trials re-run for --final-epochs before the winner is chosen (default %(default)s)",
        ),
        3,
    )  # short trials rank policies loosely; the winner is chosen on final-length runs (search.verdict)
    final_seeds: int | None = checked(
        integer(
            1,
            most=10,
            optional=True,
            flag="--final-seeds",
            help="seeds each of those re-runs averages over (default: as many, up to 3, as cost no more "
            "epochs than the trials did)",
        ),
        None,
    )  # one seed's re-run carries its own training noise; None: search.verdict.rerun_seeds
    matched_baseline: bool = checked(
        boolean(
            flag="--matched-baseline",
            help="fine-tune uniform pruning for the search's total epochs and report the winner against it "
            "(default on)",
        ),
        True,
    )  # what the search gained over more fine-tuning of the simplest policy
    concurrency: int | None = checked(
        integer(
            1,
            most=100_000,
            optional=True,
            flag="--concurrency",
            help="trials at once (default: what the resources allow)",
        ),
        None,
    )
    cpus_per_trial: float = checked(
        number(
            0,
            65_536,
            low_open=True,
            flag="--cpus-per-trial",
            help="CPUs (and torch threads) per trial (default %(default)g)",
        ),
        1.0,
    )
    gpus_per_trial: float = checked(
        number(
            0,
            most=1_024,
            flag="--gpus-per-trial",
            extra=_whole_above_one,
            help="GPUs per trial, fractions allowed (default %(default)g)",
        ),
        0.0,
    )  # fractions: trials share a GPU
    max_failures: int = checked(
        integer(0, most=1_000, flag="--max-failures", help="reruns of a failed trial, e.g. a lost node (%(default)s)"),
        2,
    )  # then it is recorded FAILED
    node_wait: float = checked(
        number(0, most=86_400, flag="--node-wait", help="seconds to wait for a lost cluster's nodes (%(default)g)"),
        300.0,
    )  # with no node able to run a trial, before the search stops with an error, keeping what was recorded
    scheduler: str | None = checked(
        choice(SCHEDULERS, optional=True, flag="--scheduler", help=SEARCH_HELP["scheduler"]), None
    )  # None: resolved()
    storage: str = checked(
        text(flag="--storage", help="Ray Tune results folder (default %(default)s)"), DEFAULT_STORAGE
    )  # <storage>/<name>
    resume: bool = checked(boolean(flag="--resume", help=SEARCH_HELP["resume"]), False)
    address: str | None = checked(
        text(
            optional=True,
            flag="--address",
            help="a running Ray cluster, host:port (default $RAY_ADDRESS, else a local instance)",
        ),
        None,
    )
    tracking_uri: str | None = checked(
        text(optional=True, flag="--tracking-uri", help="MLflow store (default sqlite:///<cwd>/mlflow.db)"), None
    )
    out: str | None = checked(
        text(optional=True, flag="--out", help="summary.json and the best model (default <storage>/<name>/best)"),
        None,
    )
    engine: EngineConfig = checked(nested(EngineConfig), factory=EngineConfig)
    agent: AgentConfig = checked(nested(AgentConfig), factory=AgentConfig)  # --searcher amc only
    progress: bool = checked(
        boolean(flag="--progress", help="progress bars (off anyway when stderr is no tty)"), True
    )  # the live progress line

    def __post_init__(self) -> None:
        validate(self, "search")

    def resolved(self, trials: int | None = None, epochs: int | None = None, scheduler: str = "none") -> SearchConfig:
        """This config with its unset defaults filled in, after the searcher's own (its
        ``SearcherSpec``'s trials, epochs and scheduler): trials and epochs fall back to
        DEFAULT_TRIALS and DEFAULT_EPOCHS; trials of 0 epochs run no scheduler."""
        epochs = next(e for e in (self.epochs, epochs, DEFAULT_EPOCHS) if e is not None)
        return dataclasses.replace(
            self,
            trials=self.trials or trials or DEFAULT_TRIALS,
            epochs=epochs,
            scheduler="none" if epochs == 0 else self.scheduler or scheduler,
        )
