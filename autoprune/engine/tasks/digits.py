"""The default task: scikit-learn's bundled handwritten digits (nothing is downloaded)."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import TensorDataset

from ...config import TaskConfig
from ..models import SMALL_MODELS
from .base import Task, model_name, stratified_split, task

# ---------------------------------------------------------------- digits (the default)

VAL_OF_REST = 0.3  # of the 80% left after the test split: 24% of all samples validate


@task("digits", ("digits_resnet",), "digits_resnet")
def digits_task(config: TaskConfig) -> Task:
    """scikit-learn's 1,797 bundled 8x8 digits; fixed stratified 56/24/20 train/val/test split
    (432 validation samples: at the dense model's 99.5% two trials 1 point apart are told
    apart, see ``autoprune.search.ranking``)."""
    from sklearn.datasets import load_digits

    model = model_name(config)
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = (x - 0.3) / 0.4  # roughly zero-mean, unit-variance pixels
    y = torch.tensor(data.target, dtype=torch.long)
    rest, test = stratified_split(data.target, 0.2, seed=0)
    train, val = stratified_split(data.target[rest], VAL_OF_REST, seed=1)
    train, val = rest[train], rest[val]

    def subset(idx: np.ndarray) -> TensorDataset:
        return TensorDataset(x[idx], y[idx])

    return Task(
        name="digits",
        model_name=model,
        model_factory=lambda: SMALL_MODELS.get(model)(10, 1),
        train=subset(train),
        val=subset(val),
        test=subset(test),
        input_shape=(1, 8, 8),
        num_classes=10,
        train_epochs=30,
        train_lr=0.1,
        batch_size=config.batch_size,
        options={"split": "56/24/20"},  # in the dense-model cache key: a model trained on another split is not reused
    )
