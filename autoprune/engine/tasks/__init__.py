"""Tasks: a model factory, train / validation / test data and an input shape.

Built-ins: ``digits`` (the embedded default, scikit-learn's bundled handwritten digits),
``cifar10`` (a local CIFAR-10 python-format directory, never downloaded) and ``imagefolder``
(a local folder of class sub-folders, any torchvision classifier). A user task is
``package.module:function`` returning a :class:`Task`.
"""

from . import cifar, digits, examples, imagefolder  # noqa: F401 - register the built-in tasks
from .base import TASKS, Task, TaskSpec, check_task_config, get_task, labels_of, model_name, stratified_split, task
from .cifar import CIFAR10Data, cifar10_task
from .digits import digits_task
from .examples import diabetes_task, shapes_task, tokens_task
from .imagefolder import imagefolder_task
from .metrics import MAE, RMSE, Accuracy, MeanIoU, Metric

__all__ = [
    "MAE",
    "RMSE",
    "TASKS",
    "Accuracy",
    "MeanIoU",
    "Metric",
    "CIFAR10Data",
    "Task",
    "TaskSpec",
    "check_task_config",
    "cifar10_task",
    "diabetes_task",
    "digits_task",
    "get_task",
    "imagefolder_task",
    "labels_of",
    "model_name",
    "shapes_task",
    "stratified_split",
    "task",
    "tokens_task",
]
