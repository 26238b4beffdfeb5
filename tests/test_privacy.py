"""Quiet and private by default: a search and `autoprune ui` reach nothing beyond this
machine, and what they write is the user's alone. A listener posing as the HTTP(S) proxy (loopback excluded, as NO_PROXY says) sees
every request a library would send out through the environment's proxy settings: MLflow's
telemetry, Ray's usage report, the cloud metadata probes Ray's usage module makes."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


class ProxyWatch:
    """A TCP listener that notes the first bytes of every connection made to it."""

    def __init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.seen: list[bytes] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            conn.settimeout(2)
            try:
                self.seen.append(conn.recv(300))
            except OSError:
                self.seen.append(b"(connected, sent nothing)")
            conn.close()

    def env(self) -> dict[str, str]:
        url = f"http://127.0.0.1:{self.port}"
        names = ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy")
        return {**{n: url for n in names}, "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}


def test_a_search_and_the_ui_connect_to_nothing_outside_and_keep_their_files_private(
    tmp_path, digits_dense, engine_cfg
):
    watch = ProxyWatch()
    env = {**os.environ, **watch.env()}
    exe = str(Path(sys.executable).with_name("autoprune"))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = [exe, "search", "--name", "quiet", "--storage", str(tmp_path / "st"), "--tracking-uri", uri]
    args += ["--trials", "2", "--epochs", "1", "--final-epochs", "0", "--concurrency", "1", "--no-progress"]
    args += ["--cache-dir", engine_cfg.cache_dir]
    ray_tmp = Path(tempfile.mkdtemp(prefix="rp", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    env["RAY_TMPDIR"] = str(ray_tmp)
    search = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert search.returncode == 0, search.stderr[-3000:]
    # what it wrote is this user's alone; Ray's session lived in a private folder and went with it
    written = [tmp_path / "mlflow.db", *(tmp_path / "st").rglob("*")]
    loose = {str(p): oct(p.stat().st_mode & 0o777) for p in written if p.stat().st_mode & 0o077}
    assert not loose, loose
    private = ray_tmp / f"ap-ray-{os.getuid()}"
    assert private.stat().st_mode & 0o777 == 0o700
    assert not list(private.rglob("session_2*")), sorted(private.rglob("*"))[:10]
    shutil.rmtree(ray_tmp, ignore_errors=True)

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ui = subprocess.Popen(
        [exe, "ui", "--port", str(port), "--tracking-uri", uri],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.time() + 120
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # straight to loopback
        while True:
            try:
                with opener.open(f"http://127.0.0.1:{port}/ajax-api/2.0/mlflow/experiments/search?max_results=5") as r:
                    assert r.status == 200
                    break
            except OSError:
                assert ui.poll() is None and time.time() < deadline, "the UI did not answer"
                time.sleep(0.5)
        time.sleep(5)  # what a server does in its first seconds (a telemetry ping, an update check)
    finally:
        os.killpg(ui.pid, signal.SIGTERM)
        ui.wait(timeout=60)
        watch.server.close()
    assert watch.seen == [], watch.seen
