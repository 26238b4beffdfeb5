"""Make the README's two pictures from a real search: the MLflow runs table, screenshot by
headless Chromium from ``autoprune ui``, and the search run's accuracy-against-cost chart.

    pip install playwright     # drives an installed Chromium; downloads no browser
    python docs/screenshots.py [--chromium /usr/bin/chromium] [-- extra search flags]

Runs a short search of the default task in a temporary folder (its own MLflow store, cache
and storage), then writes ``docs/src/assets/runs-table.png`` and
``docs/src/assets/accuracy-vs-cost.png``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ASSETS = Path(__file__).resolve().parent / "src" / "assets"
NAME = "digits-half-flops"
SEARCH = ["--budget-flops", "0.5", "--trials", "10", "--epochs", "2", "--final-epochs", "3", "--no-matched-baseline"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_search(work: Path, extra: list[str]) -> None:
    env = {**os.environ, "AUTOPRUNE_CACHE": str(work / "cache")}
    cmd = ["autoprune", "search", *SEARCH, "--name", NAME, "--storage", str(work / "results"), *extra]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=work, env=env, check=True)


def chart(work: Path) -> Path:
    found = sorted((work / "mlartifacts").rglob("accuracy_vs_cost.png"))
    if not found:
        sys.exit("the search logged no accuracy_vs_cost.png")
    return found[0]


def experiment_id(uri: str) -> str:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri).get_experiment_by_name(NAME).experiment_id


def wait_for(url: str, seconds: float = 90) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    sys.exit(f"the MLflow UI did not answer at {url} within {seconds:.0f} s")


def screenshot(chromium: str, url: str, out: Path) -> None:
    """The runs table as the search's link opens it: its trials, the best first, with their
    columns (the side panel closed)."""
    from playwright.sync_api import sync_playwright

    flags = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=flags)
        page = browser.new_page(viewport={"width": 1500, "height": 820})
        page.goto(url)
        page.get_by_text("autoprune.best", exact=True).first.wait_for(timeout=60_000)
        close = page.get_by_role("button", name="Close")
        if close.count():
            close.first.click()
        page.wait_for_timeout(1500)
        page.screenshot(path=str(out))
        browser.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chromium", default=shutil.which("chromium") or "chromium")
    parser.add_argument("--work", type=Path, help="keep the search here (reused when it holds one already)")
    args, extra = parser.parse_known_args()
    extra = [a for a in extra if a != "--"]
    ASSETS.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        if not (work / "mlflow.db").exists():
            run_search(work, extra)
        shutil.copyfile(chart(work), ASSETS / "accuracy-vs-cost.png")
        uri = f"sqlite:///{work / 'mlflow.db'}"
        port = free_port()
        ui = subprocess.Popen(
            ["autoprune", "ui", "--port", str(port), "--tracking-uri", uri], cwd=work, start_new_session=True
        )
        try:
            base = f"http://127.0.0.1:{port}"
            wait_for(base)
            url = (
                f"{base}/#/experiments/{experiment_id(uri)}/runs?viewStateShareKey=trials&workflowType=machine_learning"
            )
            screenshot(args.chromium, url, ASSETS / "runs-table.png")
        finally:
            os.killpg(ui.pid, signal.SIGTERM)
            ui.wait(timeout=30)
    print(f"wrote {ASSETS / 'runs-table.png'} and {ASSETS / 'accuracy-vs-cost.png'}")


if __name__ == "__main__":
    main()
