"""One small real default search, and `autoprune ui` serving its store, shared by the tests of
what the MLflow UI shows (test_mlflow_view.py, test_ui_screenshot.py)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from autoprune.config import Budget, SearchConfig


@dataclass
class Viewed:
    tmp: Path
    uri: str
    result: object  # autoprune.SearchResult
    printed: str  # what the search printed


@dataclass
class UI:
    base: str  # http://127.0.0.1:<port>
    port: int
    printed: str  # what `autoprune ui` printed before the server answered


@pytest.fixture(scope="session")
def viewed(tmp_path_factory, engine_cfg, digits_dense) -> Viewed:
    """A default search (tpe, ASHA) of 4 trials x 2 epochs on digits: ASHA may stop some."""
    import autoprune

    tmp = tmp_path_factory.mktemp("view")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    config = SearchConfig(
        name="view",
        budget=Budget("flops", 0.5),
        trials=4,
        epochs=2,
        final_epochs=1,
        storage=str(tmp / "results"),
        tracking_uri=uri,
        engine=engine_cfg,
        progress=False,
    )
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        result = autoprune.run_search(config)
    return Viewed(tmp, uri, result, out.getvalue())


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
        while True:
            try:
                with urllib.request.urlopen(base + "/health", timeout=2) as reply:
                    if reply.status == 200:
                        break
            except OSError:
                pass
            assert proc.poll() is None, log.read_text()
            assert time.time() < deadline, "the MLflow UI did not answer within 120 s"
            time.sleep(0.5)
        yield UI(base, port, log.read_text())
    finally:
        proc.terminate()  # `autoprune ui` stops the MLflow server it started
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # whatever of its own group is left
        proc.wait(timeout=30)


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
