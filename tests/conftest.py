"""Shared fixtures. The dense digits model is trained once per test session (in a private
cache that CLI subprocesses share through $AUTOPRUNE_CACHE)."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

_CACHE = tempfile.mkdtemp(prefix="autoprune-test-cache-")
os.environ["AUTOPRUNE_CACHE"] = _CACHE
os.environ.setdefault("PYTHONUNBUFFERED", "1")

from autoprune.config import Budget, EngineConfig, MeasureConfig, SearchConfig, TaskConfig  # noqa: E402


def pytest_sessionfinish(session, exitstatus) -> None:
    """The session's private cache (dense models, latency tables) goes with the session."""
    import shutil

    shutil.rmtree(_CACHE, ignore_errors=True)


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


@pytest.fixture
def cli_here(capfd, monkeypatch):
    """Run ``autoprune ARGS`` in this process through ``cli.main``, as the console script
    would (exit code, what reached fd 1 and 2), without a new interpreter: for commands where
    isolation does not matter. ``env`` and ``cwd`` last for the test; torch's thread count is
    restored."""
    from types import SimpleNamespace

    import torch

    from autoprune import cli as entry

    def run(*args: str, cwd: Path | None = None, env: dict | None = None):
        for key, value in (env or {}).items():
            monkeypatch.setenv(key, value)
        if cwd is not None:
            monkeypatch.chdir(cwd)
        threads = torch.get_num_threads()
        capfd.readouterr()
        try:
            code = entry.main(list(args))
        except SystemExit as exc:  # argparse's own errors and --help
            code = exc.code
        finally:
            torch.set_num_threads(threads)
        out, err = capfd.readouterr()
        return SimpleNamespace(returncode=code, stdout=out, stderr=err)

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


@dataclass
class Viewed:
    tmp: Path
    uri: str
    result: object  # autoprune.SearchResult
    printed: str  # what the search printed


@pytest.fixture(scope="session")
def viewed(tmp_path_factory, engine_cfg, digits_dense) -> Viewed:
    """The suite's one end-to-end default search (tpe, ASHA): 6 trials x 2 epochs on digits, so ASHA
    may stop some. tests/search and tests/tracking read it; none of them changes it."""
    import autoprune

    tmp = tmp_path_factory.mktemp("view")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    config = SearchConfig(
        name="view",
        budget=Budget("flops", 0.5),
        trials=6,
        epochs=2,
        final_epochs=1,
        scheduler="asha",  # on, so the stopped trials' path is exercised too
        storage=str(tmp / "results"),
        tracking_uri=uri,
        # the default's 20 timed rounds and more, not the suite's quick 5: the test of its best
        # model's speed-up (a margin of about 15% at batch 1 on digits) must not be noise
        engine=dataclasses.replace(engine_cfg, measure=MeasureConfig(batch_sizes=(1, 8), warmup=5, repeats=25)),
        progress=False,
    )
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        result = autoprune.run_search(config)
    return Viewed(tmp, uri, result, out.getvalue())


@dataclass
class UI:
    base: str  # http://127.0.0.1:<port>
    port: int
    printed: str  # what `autoprune ui` printed until it said it was ready


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def ui(viewed, tmp_path_factory):
    """`autoprune ui` on 127.0.0.1 and a free port against the search's store; stopped (by
    its pid, then its process group) at the end of the session."""
    port = _free_port()
    log = tmp_path_factory.mktemp("ui") / "ui.log"
    exe = Path(sys.executable).with_name("autoprune")
    with open(log, "wb") as sink:
        proc = subprocess.Popen(
            [str(exe), "ui", "--port", str(port), "--tracking-uri", viewed.uri],
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while "(Ctrl-C stops it)" not in log.read_text():  # its last line, once the server answers
            assert proc.poll() is None, log.read_text()
            assert time.time() < deadline, "the MLflow UI did not answer within 120 s"
            time.sleep(0.5)
        yield UI(base, port, log.read_text())
    finally:
        proc.terminate()  # SIGTERM to `autoprune ui` alone stops the MLflow server it started
        stopped = True
        try:
            proc.wait(timeout=30)
            deadline = time.time() + 20
            while _answers(port) and time.time() < deadline:
                time.sleep(0.5)
            stopped = not _answers(port)
        except subprocess.TimeoutExpired:
            stopped = False
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # whatever of its own group is left
        proc.wait(timeout=30)
    assert stopped, "the MLflow server outlived `autoprune ui` (SIGTERM)"


def _answers(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


@pytest.fixture(scope="session")
def rest(ui):
    """``rest(endpoint, body=None, **query)``: one call of the UI server's REST API, POST with a
    JSON ``body``, else GET with ``query``; the decoded JSON answer."""
    import urllib.parse

    def call(endpoint: str, body: dict | None = None, /, **query) -> dict:
        url = ui.base + endpoint + ("?" + urllib.parse.urlencode(query) if query else "")
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=20) as reply:
            return json.loads(reply.read() or b"{}")

    return call


@dataclass
class Bucket:
    endpoint: str  # http://127.0.0.1:<port>
    env: dict[str, str]  # the credentials a client of the server needs

    def uri(self, bucket: str, path: str = "") -> str:
        """``s3://bucket/path`` on this server, in the form Ray Tune and pyarrow both read."""
        return f"s3://{bucket}/{path}?endpoint_override={self.endpoint}&allow_bucket_creation=true"


@pytest.fixture(scope="session")
def s3():
    """A real S3-protocol server on 127.0.0.1 (moto's standalone server: object storage over
    HTTP, spoken to by pyarrow's S3 client as a cloud bucket would be). Its credentials are in
    this process's environment while it runs, so Ray workers started from here inherit them."""
    from moto.server import ThreadedMotoServer

    env = {"AWS_ACCESS_KEY_ID": "autoprune", "AWS_SECRET_ACCESS_KEY": "autoprune", "AWS_DEFAULT_REGION": "us-east-1"}
    before = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield Bucket(f"http://{host}:{port}", env)
    finally:
        server.stop()
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
