"""Before scoring: the scoring data (a fixed, seeded subset of the training split) and BN
warm-up, which refreshes BatchNorm statistics with every parameter frozen."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ...config import Policy
from .. import criteria as crit
from ..tasks import Task, labels_of
from ..tasks.metrics import Accuracy


def warmup_on(policy: Policy) -> bool:
    """Whether BN warm-up runs for ``policy``: as set, or by default for data-dependent criteria."""
    if policy.bn_warmup is not None:
        return bool(policy.bn_warmup)
    return crit.CRITERIA.get(policy.criterion).needs_data


def scoring_batches(task: Task, per_class: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A fixed, seeded subset of the training split as ``(inputs, target)`` batches:
    ``per_class`` samples of every class for a classification task, else ``per_class``
    times ten samples drawn at random."""
    from torch.utils.data import default_collate

    rng = np.random.default_rng(seed)
    labels = labels_of(task.train, task.target_key) if isinstance(task.metric, Accuracy) else None
    if labels is not None and labels.ndim == 1 and labels.dtype.kind in "iu":
        picked = []
        for c in np.unique(labels):
            idx = np.flatnonzero(labels == c)
            picked.extend(rng.choice(idx, size=min(per_class, len(idx)), replace=False).tolist())
    else:
        n = len(task.train)
        picked = rng.choice(n, size=min(n, 10 * per_class), replace=False).tolist()
    picked.sort()
    samples = [task.train[i] for i in picked]
    b = task.batch_size
    return [tuple(task.split(default_collate(samples[i : i + b]))) for i in range(0, len(samples), b)]


def bn_warmup(model: nn.Module, batches, device: torch.device) -> None:
    """Refresh BN running statistics on ``batches`` (train mode, no gradients): only the
    statistics change, computed as an exact average over the batches."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    was_training = model.training
    model.train()
    with torch.no_grad():
        for x, _ in batches:
            model(x.to(device))
    for m, mom in zip(norms, saved):
        m.momentum = mom
    model.train(was_training)


def bn_warmup_train(model: nn.Module, task: Task, max_batches: int | None, seed: int, device: torch.device) -> None:
    """The second-order pruning-at-initialisation study's warm-up: one pass over the training
    split (shuffled, seeded; at most ``max_batches`` batches) in train mode with each BN
    layer's own momentum, no gradients. Only the running statistics change."""
    was_training = model.training
    model.train()
    with torch.no_grad():
        for i, (x, _) in enumerate(task.loader("train", shuffle=True, seed=seed, device=device)):
            if max_batches is not None and i >= max_batches:
                break
            model(x.to(device))
    model.train(was_training)
