"""A task's metric: what the search ranks trials by and the reports name.

A :class:`Metric` is accumulated over a split: :meth:`Metric.reset`, then
:meth:`Metric.update` with each batch's prediction (the model output the task names, see
``Task.output``) and target, then :meth:`Metric.compute`. It has a ``name`` (reported as
``val_<name>`` and ``test_<name>``), a direction (``higher_is_better``) and whether it reads as
a percentage. Built-ins: :class:`Accuracy` (the default), :class:`MeanIoU` (semantic
segmentation), :class:`RMSE` and :class:`MAE` (regression). A task's own metric subclasses
:class:`Metric`.
"""

from __future__ import annotations

import torch


class Metric:
    """Base class: set ``name``, ``higher_is_better`` (and ``percent``), implement the three calls."""

    name: str = "metric"
    higher_is_better: bool = True
    percent: bool = False  # shown as a percentage (a fraction in 0..1)

    @property
    def mode(self) -> str:
        return "max" if self.higher_is_better else "min"

    def reset(self) -> None:
        """Start a new split."""
        raise NotImplementedError

    def update(self, prediction: torch.Tensor, target) -> None:
        """Add one batch: the model's prediction and the batch's target."""
        raise NotImplementedError

    def compute(self) -> float:
        """The metric over every batch since :meth:`reset`."""
        raise NotImplementedError


class Accuracy(Metric):
    """Top-1 accuracy (a fraction in 0..1): the prediction's argmax over dimension 1 against
    integer class targets (any trailing dimensions count per element)."""

    name, higher_is_better, percent = "acc", True, True

    def reset(self) -> None:
        self.correct, self.total = 0, 0

    def update(self, prediction: torch.Tensor, target) -> None:
        self.correct += int((prediction.argmax(1) == target).sum())
        self.total += target.numel()

    def compute(self) -> float:
        return self.correct / max(self.total, 1)


class MeanIoU(Metric):
    """Mean intersection over union of ``num_classes`` classes, from one confusion matrix
    over the split (a class absent from both prediction and target is left out);
    ``ignore_index`` pixels do not count."""

    name, higher_is_better, percent = "miou", True, True

    def __init__(self, num_classes: int, ignore_index: int | None = 255) -> None:
        self.num_classes, self.ignore_index = int(num_classes), ignore_index
        self.reset()

    def reset(self) -> None:
        self.confusion = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64)

    def update(self, prediction: torch.Tensor, target) -> None:
        pred, target = prediction.argmax(1).flatten().cpu(), target.flatten().cpu().long()
        keep = (target >= 0) & (target < self.num_classes)
        if self.ignore_index is not None:
            keep &= target != self.ignore_index
        k = self.num_classes
        self.confusion += torch.bincount(target[keep] * k + pred[keep], minlength=k * k).reshape(k, k)

    def compute(self) -> float:
        c = self.confusion.double()
        union = c.sum(0) + c.sum(1) - c.diag()
        present = union > 0
        return float((c.diag()[present] / union[present]).mean()) if present.any() else 0.0


class _Regression(Metric):
    higher_is_better, percent = False, False

    def reset(self) -> None:
        self.total, self.count = 0.0, 0

    def _error(self, diff: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def update(self, prediction: torch.Tensor, target) -> None:
        diff = prediction.double() - target.double().reshape(prediction.shape)
        self.total += float(self._error(diff).sum())
        self.count += diff.numel()


class RMSE(_Regression):
    """Root mean squared error over every predicted value (lower is better)."""

    name = "rmse"

    def _error(self, diff: torch.Tensor) -> torch.Tensor:
        return diff.pow(2)

    def compute(self) -> float:
        return (self.total / max(self.count, 1)) ** 0.5


class MAE(_Regression):
    """Mean absolute error over every predicted value (lower is better)."""

    name = "mae"

    def _error(self, diff: torch.Tensor) -> torch.Tensor:
        return diff.abs()

    def compute(self) -> float:
        return self.total / max(self.count, 1)
