"""Worked example tasks beyond classification, each generated or bundled (nothing is
downloaded), each showing one part of the task interface (:class:`~.base.Task`):

* ``shapes``: semantic segmentation of procedurally drawn squares, discs and triangles;
  torchvision's LR-ASPP (or DeepLabV3) MobileNetV3, or a small encoder-decoder for quick
  runs, a dict output (``out``), mean IoU;
* ``diabetes``: regression on scikit-learn's bundled diabetes data; an MLP, its own loss
  (mean squared error), RMSE (lower is better);
* ``tokens``: a token classifier; ``nn.Embedding`` input (:class:`~autoprune.engine.inputs.Tokens`),
  a 1-D convolutional text model, accuracy.

Channel pruning keeps every output head's width: the segmentation classes, the regression
target, the token classes.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset

from ...config import TaskConfig
from ..inputs import Tokens
from .base import Task, model_name, task
from .metrics import RMSE, MeanIoU

# ---------------------------------------------------------------- shapes (segmentation)

SHAPE_CLASSES = ("background", "square", "disc", "triangle")
SHAPES_SPLITS = (384, 96, 96)  # train / val / test images
SHAPES_SIZE = 64  # default image side (--image-size)


def draw_shapes(n: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` images (3 x size x size, noisy background) with one to three shapes each, every
    shape a random colour (so only its outline tells its class), and their class masks."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    images = rng.normal(0.0, 0.3, (n, 3, size, size)).astype(np.float32)
    masks = np.zeros((n, size, size), dtype=np.int64)
    for i in range(n):
        for _ in range(rng.integers(1, 4)):
            cls = int(rng.integers(1, len(SHAPE_CLASSES)))
            r = rng.uniform(0.1, 0.22) * size
            cy, cx = rng.uniform(r, size - r, 2)
            if cls == 1:
                inside = (np.abs(yy - cy) <= r * 0.85) & (np.abs(xx - cx) <= r * 0.85)
            elif cls == 2:
                inside = (yy - cy) ** 2 + (xx - cx) ** 2 <= r**2
            else:  # an upward triangle: below its apex, within its widening sides
                top = cy - r
                inside = (yy >= top) & (yy <= cy + r) & (np.abs(xx - cx) <= (yy - top) * 0.6)
            images[i][:, inside] = rng.uniform(-1.5, 1.5, (3, 1))
            masks[i][inside] = cls
    return torch.from_numpy(images), torch.from_numpy(masks)


class SmallSegNet(nn.Module):
    """A small encoder-decoder for quick runs: two stride-2 stages, an upsampling path with
    a skip connection (concatenated), a 1x1 classifier; returns ``{"out": logits}`` as
    torchvision's segmentation models do."""

    def __init__(self, classes: int, width: int = 16) -> None:
        super().__init__()

        def block(a: int, b: int, stride: int = 1) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(a, b, 3, stride, 1, bias=False), nn.BatchNorm2d(b), nn.ReLU())

        self.stem = block(3, width)
        self.down1 = block(width, 2 * width, 2)
        self.down2 = block(2 * width, 4 * width, 2)
        self.up1 = block(4 * width + 2 * width, 2 * width)
        self.up2 = block(2 * width + width, width)
        self.classifier = nn.Conv2d(width, classes, 1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        s0 = self.stem(x)
        s1 = self.down1(s0)
        y = nn.functional.interpolate(self.down2(s1), size=s1.shape[-2:], mode="nearest")
        y = nn.functional.interpolate(self.up1(torch.cat([y, s1], 1)), size=s0.shape[-2:], mode="nearest")
        return {"out": self.classifier(self.up2(torch.cat([y, s0], 1)))}


SEGMENTATION_MODELS = ("lraspp_mobilenet_v3_large", "deeplabv3_mobilenet_v3_large", "small_segnet")


@task("shapes", SEGMENTATION_MODELS, "lraspp_mobilenet_v3_large")
def shapes_task(config: TaskConfig) -> Task:
    """Semantic segmentation of generated shapes (4 classes with the background), mean IoU."""
    import torchvision

    model = model_name(config)
    size = config.image_size or SHAPES_SIZE
    splits = [TensorDataset(*draw_shapes(n, size, seed)) for n, seed in zip(SHAPES_SPLITS, (0, 1, 2))]

    def build() -> nn.Module:
        if model == "small_segnet":
            return SmallSegNet(len(SHAPE_CLASSES))
        return torchvision.models.get_model(model, weights=None, weights_backbone=None, num_classes=len(SHAPE_CLASSES))

    return Task(
        name="shapes",
        model_name=model,
        model_factory=build,
        train=splits[0],
        val=splits[1],
        test=splits[2],
        input_shape=(3, size, size),
        num_classes=len(SHAPE_CLASSES),
        train_epochs=15,
        train_lr=0.05,
        batch_size=config.batch_size,
        options={"size": size, "images": list(SHAPES_SPLITS)},
        metric=MeanIoU(len(SHAPE_CLASSES)),
    )


# ---------------------------------------------------------------- diabetes (regression)


class MLP(nn.Module):
    """Fully connected layers with ReLU between them."""

    def __init__(self, widths: tuple[int, ...]) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for a, b in zip(widths[:-1], widths[1:]):
            layers += [nn.Linear(a, b), nn.ReLU()]
        self.net = nn.Sequential(*layers[:-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def squared_error(outputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error of a one-output regression model."""
    return nn.functional.mse_loss(outputs.squeeze(-1), target)


@task("diabetes", ("mlp",), "mlp")
def diabetes_task(config: TaskConfig) -> Task:
    """scikit-learn's bundled diabetes data (442 patients, 10 features): disease progression
    after a year, standardised; a 10-128-128-1 MLP; RMSE in standard deviations."""
    from sklearn.datasets import load_diabetes

    model_name(config)
    data = load_diabetes()
    x = torch.tensor(data.data, dtype=torch.float32)
    x = (x - x.mean(0)) / x.std(0)
    y = torch.tensor(data.target, dtype=torch.float32)
    y = (y - y.mean()) / y.std()
    order = np.random.default_rng(0).permutation(len(y))
    cut = (int(0.6 * len(y)), int(0.8 * len(y)))
    parts = np.split(order, cut)
    train, val, test = (TensorDataset(x[p], y[p]) for p in parts)
    return Task(
        name="diabetes",
        model_name="mlp",
        model_factory=lambda: MLP((10, 128, 128, 1)),
        train=train,
        val=val,
        test=test,
        input_shape=(10,),
        train_epochs=60,
        train_lr=0.02,
        batch_size=config.batch_size,
        options={"split": "60/20/20"},
        metric=RMSE(),
        loss=squared_error,
    )


# ---------------------------------------------------------------- tokens (a token classifier)

VOCAB, SEQ_LEN, TOKEN_CLASSES = 96, 48, 4
KEYWORDS = 4  # keyword tokens per class: tokens 0 .. TOKEN_CLASSES * KEYWORDS - 1
TOKEN_SPLITS = (1200, 400, 400)
LABEL_NOISE = 0.1


def keyword_sequences(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` sequences of filler tokens with two keywords of their class at random places;
    one label in ten is then drawn at random (noise no model can learn)."""
    rng = np.random.default_rng(seed)
    filler = TOKEN_CLASSES * KEYWORDS
    x = rng.integers(filler, VOCAB, (n, SEQ_LEN))
    y = rng.integers(0, TOKEN_CLASSES, n)
    for i in range(n):
        x[i, rng.choice(SEQ_LEN, 2, replace=False)] = y[i] * KEYWORDS + rng.integers(0, KEYWORDS, 2)
    noisy = rng.random(n) < LABEL_NOISE
    y[noisy] = rng.integers(0, TOKEN_CLASSES, int(noisy.sum()))
    return torch.from_numpy(x), torch.from_numpy(y)


class TextCNN(nn.Module):
    """Token embedding, two 1-D convolutions with BN and ReLU, global max pooling, a linear head."""

    def __init__(self, vocab: int, classes: int, dim: int = 32, width: int = 64) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.conv1 = nn.Conv1d(dim, width, 5, padding=2, bias=False)
        self.bn1 = nn.BatchNorm1d(width)
        self.conv2 = nn.Conv1d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm1d(width)
        self.head = nn.Linear(width, classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens).transpose(1, 2)
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.head(x.amax(-1))


@task("tokens", ("textcnn",), "textcnn")
def tokens_task(config: TaskConfig) -> Task:
    """Generated keyword sequences (vocabulary 96, length 48, 4 classes), a token classifier."""
    model_name(config)
    splits = [TensorDataset(*keyword_sequences(n, seed)) for n, seed in zip(TOKEN_SPLITS, (0, 1, 2))]
    return Task(
        name="tokens",
        model_name="textcnn",
        model_factory=lambda: TextCNN(VOCAB, TOKEN_CLASSES),
        train=splits[0],
        val=splits[1],
        test=splits[2],
        input_shape=Tokens((SEQ_LEN,), vocab=VOCAB),
        num_classes=TOKEN_CLASSES,
        train_epochs=20,
        train_lr=0.02,
        batch_size=config.batch_size,
        options={"vocab": VOCAB, "length": SEQ_LEN, "keywords": 2, "noise": LABEL_NOISE},
    )
