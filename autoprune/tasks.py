"""Deprecated: the tasks moved to :mod:`autoprune.engine.tasks`.

A task file written for the old layout (``from autoprune.tasks import Task``) keeps working:
this module re-exports what ``autoprune.tasks`` exported and warns once, on first import,
with a ``DeprecationWarning`` naming the new import. Write ``from autoprune import Task`` (or
``from autoprune.engine.tasks import Task``) instead. Nothing inside autoprune imports this
module (import-linter's layer contract holds it at the top).
"""

from __future__ import annotations

import warnings

from .engine import tasks as _tasks
from .engine.tasks import *  # noqa: F403 - the old module's names, re-exported
from .engine.tasks.cifar import CIFAR_FILES, CIFAR_FOLDER, CIFAR_PIXELS, CIFAR_TRAIN_FILES
from .engine.tasks.imagefolder import SHOWN_SKIPPED

__all__ = [
    *_tasks.__all__,
    "CIFAR_FILES",
    "CIFAR_FOLDER",
    "CIFAR_PIXELS",
    "CIFAR_TRAIN_FILES",
    "SHOWN_SKIPPED",
]

# A module body runs once per process, so this warns once however often it is imported.
# stacklevel 2 names the importing line (the import machinery's frames are skipped).
warnings.warn(
    "autoprune.tasks is deprecated and will be removed: import from autoprune.engine.tasks "
    "(from autoprune.engine.tasks import Task), or use autoprune.Task",
    DeprecationWarning,
    stacklevel=2,
)
