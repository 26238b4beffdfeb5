"""A held-out 1-D task for the benchmarks: ten classes of synthetic sequences, a 1-D ResNet.

Nothing is downloaded: the data are generated at run time from fixed seeds. A sequence has
one channel and 64 samples; its class is a combination of three things, most classes share
two of them with another class, and no single one of them tells the classes apart:

- a periodic background: one of four waveform shapes (sine, square, sawtooth, a pulse train
  of duty cycle 1/4) at one of two frequencies (3 or 6 cycles per window, jittered by up to
  8%), with a random phase and a random amplitude (0.6 to 1.4);
- a local motif of 9 samples at a random position: a Gaussian bump, a short high-frequency
  burst or a doublet (a positive and a negative 2-sample pulse), with a random amplitude
  (1.2 to 2.0);
- Gaussian noise (standard deviation 0.35) and a small random offset (up to 0.2).

The inputs are standardised with the training split's mean and standard deviation. The
hardest pair is a 6-cycle sine with a bump or with a doublet: the dense model reaches about
98% test accuracy in 20 epochs (SGD, cosine from 0.1), not 100%.

Splits: 3000 training, 600 validation and 1000 test sequences, balanced over the classes,
each split generated from its own seed. The model (``resnet1d``) is a small residual CNN:
a stem conv, three stages of one basic block each (16, 32, 64 channels, the later stages
halve the length, 1x1 projection shortcuts where the shape changes), global average pooling
and a linear classifier.

Use it as a user task with ``bench/`` on the path::

    PYTHONPATH=bench autoprune prune --task seq1d:task --budget-params 0.5 ...

or from Python: ``import seq1d; task = seq1d.task(TaskConfig())``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset

from autoprune.config import TaskConfig
from autoprune.engine.tasks import Task
from autoprune.errors import AutopruneError

LENGTH = 64
SPLITS = {"train": (300, 0), "val": (60, 1), "test": (100, 2)}  # samples per class, seed
SHAPES = ("sine", "square", "sawtooth", "pulse")
MOTIFS = ("bump", "burst", "doublet")
# class -> (background shape, cycles per window, motif)
CLASSES = (
    ("sine", 3, "bump"),
    ("sine", 3, "burst"),
    ("sine", 6, "bump"),
    ("square", 3, "bump"),
    ("square", 6, "burst"),
    ("sawtooth", 3, "doublet"),
    ("sawtooth", 6, "bump"),
    ("pulse", 3, "burst"),
    ("pulse", 6, "doublet"),
    ("sine", 6, "doublet"),
)
MOTIF_LENGTH = 9
NOISE = 0.35
FREQ_JITTER = 0.08


def _background(shape: str, phase: np.ndarray) -> np.ndarray:
    """Waveforms of unit amplitude; ``phase`` in cycles, any shape."""
    frac = phase % 1.0
    if shape == "sine":
        return np.sin(2 * np.pi * phase)
    if shape == "square":
        return np.where(frac < 0.5, 1.0, -1.0)
    if shape == "sawtooth":
        return 2.0 * frac - 1.0
    return np.where(frac < 0.25, 1.5, -0.5)  # pulse train, duty cycle 1/4, zero mean


def _motif(kind: str) -> np.ndarray:
    u = np.arange(MOTIF_LENGTH) - (MOTIF_LENGTH - 1) / 2
    if kind == "bump":
        return np.exp(-0.5 * (u / 1.5) ** 2)
    if kind == "burst":
        return np.cos(np.pi * u * 0.9) * np.hanning(MOTIF_LENGTH + 2)[1:-1]
    doublet = np.zeros(MOTIF_LENGTH)
    doublet[1:3], doublet[6:8] = 1.0, -1.0
    return doublet


def generate(per_class: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``per_class`` sequences of every class, (N, 1, LENGTH) float32 and (N,) labels."""
    rng = np.random.default_rng([1234, seed])
    t = np.arange(LENGTH) / LENGTH
    xs, ys = [], []
    for label, (shape, cycles, motif) in enumerate(CLASSES):
        n = per_class
        freq = cycles * (1 + rng.uniform(-FREQ_JITTER, FREQ_JITTER, (n, 1)))
        phase = freq * t[None, :] + rng.uniform(0, 1, (n, 1))
        x = rng.uniform(0.6, 1.4, (n, 1)) * _background(shape, phase)
        pos = rng.integers(0, LENGTH - MOTIF_LENGTH + 1, n)
        amp = rng.uniform(1.2, 2.0, n)
        pattern = _motif(motif)
        for i in range(n):
            x[i, pos[i] : pos[i] + MOTIF_LENGTH] += amp[i] * pattern
        x += rng.normal(0, NOISE, x.shape) + rng.uniform(-0.2, 0.2, (n, 1))
        xs.append(x)
        ys.append(np.full(n, label))
    x = torch.tensor(np.concatenate(xs), dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(np.concatenate(ys), dtype=torch.long)
    order = torch.from_numpy(rng.permutation(len(y)))
    return x[order], y[order]


class BasicBlock1d(nn.Module):
    """Two k=3 convs with BN and a residual add; a 1x1 conv + BN shortcut where the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm1d(cout)
        self.conv2 = nn.Conv1d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm1d(cout)
        self.relu = nn.ReLU(inplace=False)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv1d(cin, cout, 1, stride, bias=False), nn.BatchNorm1d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNet1d(nn.Module):
    """Stem conv, stages of basic blocks (the first block of each later stage halves the
    length and changes the width), global average pooling and a linear classifier."""

    def __init__(
        self,
        widths: Sequence[int] = (16, 32, 64),
        blocks: Sequence[int] = (1, 1, 1),
        num_classes: int = 10,
        in_channels: int = 1,
    ) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv1d(in_channels, widths[0], 5, 1, 2, bias=False),
            nn.BatchNorm1d(widths[0]),
            nn.ReLU(inplace=False),
        )
        layers: list[nn.Module] = []
        cin = widths[0]
        for stage, (width, n) in enumerate(zip(widths, blocks)):
            for i in range(n):
                layers.append(BasicBlock1d(cin, width, 2 if (stage > 0 and i == 0) else 1))
                cin = width
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool1d(1)
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv1d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(self.stem(x))
        return self.fc(torch.flatten(self.pool(x), 1))


def resnet1d(num_classes: int = 10, in_channels: int = 1) -> nn.Module:
    return ResNet1d((16, 32, 64), (1, 1, 1), num_classes, in_channels)


def task(config: TaskConfig) -> Task:
    """The seq1d task (see the module docstring); ``--model`` may only be ``resnet1d``."""
    if config.model not in (None, "resnet1d"):
        raise AutopruneError(f"unknown model {config.model!r} for task seq1d; choose: resnet1d")
    splits = {name: generate(per_class, seed) for name, (per_class, seed) in SPLITS.items()}
    x_train = splits["train"][0]
    mean, std = x_train.mean(), x_train.std()  # one scalar each, from the training split

    def dataset(name: str) -> TensorDataset:
        x, y = splits[name]
        return TensorDataset((x - mean) / std, y)

    return Task(
        name="seq1d",
        model_name="resnet1d",
        model_factory=lambda: resnet1d(10, 1),
        train=dataset("train"),
        val=dataset("val"),
        test=dataset("test"),
        input_shape=(1, LENGTH),
        num_classes=10,
        train_epochs=20,
        train_lr=0.1,
        batch_size=config.batch_size,
    )
