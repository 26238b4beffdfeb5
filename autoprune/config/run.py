"""One prune-and-fine-tune run's settings besides the policy: the task, the dense model, measuring."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..schema import (
    MAX_BATCH,
    MAX_EPOCHS,
    MAX_SEED,
    MAX_THREADS,
    boolean,
    checked,
    choice,
    integer,
    nested,
    number,
    sequence,
    text,
    validate,
)

LATENCY_RUNTIMES = ("torch", "onnxruntime")  # where latency is timed (engine.runtime)


def _batch_sizes(value) -> str | None:
    return None if len(set(value)) == len(value) else "must not repeat a batch size"


@dataclass
class MeasureConfig:
    """How latency is measured: median of timed forward passes after warm-up."""

    batch_sizes: tuple[int, ...] = checked(
        sequence(integer(1, most=MAX_BATCH), extra=_batch_sizes), (1, 32)
    )  # latency per batch size
    warmup: int = checked(integer(0, most=10_000), 5)  # untimed forward passes first
    repeats: int = checked(
        integer(1, most=100_000, flag="--latency-passes", help="timed passes per latency timing (default %(default)s)"),
        20,
    )  # timed forward passes; the median is reported
    seconds: float = checked(
        number(0.1, most=86_400, flag="--latency-seconds", help="time cap per latency timing (default %(default)g)"),
        60.0,
    )  # a timing stops after the round that passes this (at least 3 rounds), so big models on CPU are not minutes
    threads: int = checked(
        integer(
            1, most=MAX_THREADS, flag="--threads", help="torch threads for latency timing on CPU (default %(default)s)"
        ),
        1,
    )  # torch intra-op threads during CPU timing (fixed, so runs compare)
    runtime: str = checked(
        choice(
            LATENCY_RUNTIMES,
            flag="--latency-runtime",
            help="where latency is timed: torch, or onnxruntime on the exported ONNX model (the latency table, a "
            "latency budget's checks and the speed-up; default %(default)s)",
        ),
        "torch",
    )
    latency_batch: int = checked(
        integer(
            1,
            most=MAX_BATCH,
            flag="--latency-batch",
            help="batch size of the latency budget, the latency table and the reported speed-up (default %(default)s)",
        ),
        1,
    )

    def __post_init__(self) -> None:
        validate(self, "measure")
        self.batch_sizes = tuple(self.batch_sizes)


MIN_IMAGE_SIZE = 16  # the smallest input resolution the torchvision classifiers run on here
MAX_IMAGE_SIZE = 4_096
IMAGE_SIZE = 224  # imagefolder's input resolution when --image-size is not given


@dataclass
class TaskConfig:
    """Which task, model and data; resolved by :func:`autoprune.engine.tasks.get_task`."""

    name: str = checked(
        text(
            flag="--task",
            help="digits, cifar10, imagefolder, shapes, diabetes, tokens or package.module:function (default %(default)s)",
        ),
        "digits",
    )
    model: str | None = checked(
        text(optional=True, flag="--model", help="model name within the task (see `autoprune list tasks`)"), None
    )  # None: the task's default model
    data_dir: str | None = checked(
        text(
            optional=True, flag="--data-dir", help="local data directory (cifar10, imagefolder); nothing is downloaded"
        ),
        None,
    )
    image_size: int | None = checked(
        integer(
            MIN_IMAGE_SIZE,
            most=MAX_IMAGE_SIZE,
            optional=True,
            flag="--image-size",
            help=f"imagefolder (default {IMAGE_SIZE}) and shapes (default 64) input resolution",
        ),
        None,
    )  # None: resolved()
    batch_size: int = checked(
        integer(1, most=MAX_BATCH, flag="--batch-size", help="data loader batch size (default %(default)s)"), 64
    )

    def __post_init__(self) -> None:
        validate(self, "task")

    def resolved(self) -> TaskConfig:
        """This config with its unset defaults filled in (the image size)."""
        return dataclasses.replace(self, image_size=IMAGE_SIZE if self.image_size is None else self.image_size)


@dataclass
class EngineConfig:
    """Everything one prune-and-fine-tune run needs besides the policy and budget."""

    task: TaskConfig = checked(nested(TaskConfig), factory=TaskConfig)
    checkpoint: str | None = checked(
        text(optional=True, flag="--checkpoint", help="dense weights (a state_dict file) to start from"), None
    )  # else train once and cache
    train_epochs: int | None = checked(
        integer(
            0,
            most=MAX_EPOCHS,
            optional=True,
            flag="--train-epochs",
            help="dense training epochs when no checkpoint (task default)",
        ),
        None,
    )  # 0 on purpose: an untrained model
    seed: int = checked(
        integer(0, most=MAX_SEED, flag="--seed", help="seed of training, scoring and searchers (default %(default)s)"),
        0,
    )
    device: str | None = checked(
        text(optional=True, flag="--device", help="cpu, cuda or cuda:N (default: cuda when available)"), None
    )
    cache_dir: str | None = checked(
        text(
            optional=True, flag="--cache-dir", help="dense-model cache (default $AUTOPRUNE_CACHE or ~/.cache/autoprune)"
        ),
        None,
    )
    scoring_per_class: int = checked(
        integer(
            1,
            most=100_000,
            flag="--scoring-per-class",
            help="training samples per class that data-dependent criteria score on (default %(default)s)",
        ),
        10,
    )
    measure: MeasureConfig = checked(nested(MeasureConfig), factory=MeasureConfig)
    progress: bool = checked(
        boolean(flag="--progress", help="progress bars (off anyway when stderr is no tty)"), True
    )  # progress bars on training epochs

    def __post_init__(self) -> None:
        validate(self, "engine")
