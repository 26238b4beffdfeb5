"""Shared fixtures. The dense digits model is trained once per test session (in a private
cache that CLI subprocesses share through $AUTOPRUNE_CACHE)."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import pytest

_CACHE = tempfile.mkdtemp(prefix="autoprune-test-cache-")
os.environ["AUTOPRUNE_CACHE"] = _CACHE
os.environ.setdefault("PYTHONUNBUFFERED", "1")

from autoprune.config import EngineConfig, MeasureConfig, TaskConfig  # noqa: E402


@pytest.fixture(scope="session")
def engine_cfg() -> EngineConfig:
    return EngineConfig(
        task=TaskConfig(),
        cache_dir=_CACHE,
        progress=False,
        measure=MeasureConfig(batch_sizes=(1, 8), warmup=2, repeats=5),
    )


@pytest.fixture(scope="session")
def digits_task():
    from autoprune.engine.tasks import get_task

    return get_task(TaskConfig())


@pytest.fixture(scope="session")
def digits_dense(digits_task, engine_cfg):
    from autoprune import engine

    return engine.dense_model(digits_task, engine_cfg, log=lambda _: None)


@pytest.fixture(scope="session")
def digits_dense_metrics(digits_task, digits_dense, engine_cfg):
    from autoprune import engine

    return engine.measure_model(digits_dense, digits_task, engine_cfg.measure, test=True)


@pytest.fixture(scope="session")
def cli():
    """Run the installed `autoprune` console script; returns CompletedProcess."""
    import subprocess

    exe = Path(sys.executable).with_name("autoprune")

    def run(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 600):
        return subprocess.run(
            [str(exe), *args],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**os.environ, **(env or {})},
        )

    return run


def _write_image_folder(root: Path, classes: int = 3, per_class: int = 12, size=(32, 32), seed: int = 0) -> Path:
    """``classes`` sub-folders of ``per_class`` RGB PNGs: seeded noise plus a class colour."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for c in range(classes):
        colour = np.zeros(3)
        colour[c % 3] = 150 + 40 * (c // 3)
        folder = root / f"class_{c}"
        folder.mkdir(exist_ok=True)
        for i in range(per_class):
            noise = rng.integers(0, 100, size=(size[1], size[0], 3))
            pixels = np.clip(noise + colour, 0, 255).astype(np.uint8)
            Image.fromarray(pixels, "RGB").save(folder / f"img_{i:03d}.png")
    return root


@pytest.fixture(scope="session")
def write_image_folder():
    """A function writing a small synthetic image folder (class sub-folders of PNGs) under a
    given root: ``write_image_folder(root, classes=3, per_class=12, size=(w, h), seed=0)``."""
    return _write_image_folder
