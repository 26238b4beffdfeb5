"""A real headless-browser screenshot of a search's runs table, opened by the deep link that
`autoprune ui` prints. Needs a browser: Playwright with its Chromium, or a chromium /
google-chrome binary; skipped (with the reason) where there is none."""

from __future__ import annotations

import shutil
import struct
import subprocess

import pytest

pytestmark = pytest.mark.slow

BINARIES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")


def _playwright() -> bool:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        return False
    try:
        with sync_playwright() as p:
            p.chromium.launch(headless=True).close()
        return True
    except Exception:  # noqa: BLE001 - installed without its browser
        return False


def _binary() -> str | None:
    return next((path for path in map(shutil.which, BINARIES) if path), None)


BROWSER = "playwright" if _playwright() else _binary()
if BROWSER is None:
    pytest.skip(
        "no headless browser here (neither Playwright with Chromium nor a chromium/google-chrome binary)",
        allow_module_level=True,
    )


def _screenshot(url: str, png) -> None:
    if BROWSER == "playwright":
        from playwright.sync_api import sync_playwright

        with sync_playwright() as p:
            browser = p.chromium.launch(headless=True)
            page = browser.new_page(viewport={"width": 1600, "height": 1000})
            page.goto(url, wait_until="networkidle", timeout=60_000)
            page.wait_for_selector("text=#1", timeout=60_000)  # a trial's run name: the table is drawn
            page.screenshot(path=str(png), full_page=True)
            browser.close()
        return
    subprocess.run(
        [
            BROWSER,
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--window-size=1600,1000",
            "--virtual-time-budget=20000",  # let the single-page app fetch and draw the runs
            f"--screenshot={png}",
            url,
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )


def test_the_deep_link_shows_the_runs_table(viewed, ui, tmp_path):
    link = ui.base + f"/#/experiments/{viewed.result.experiment_id}/runs?workflowType=machine_learning"
    assert link in ui.printed
    png = tmp_path / "runs.png"
    _screenshot(link, png)
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    assert width >= 800 and height >= 500 and len(data) > 20_000  # a drawn page, not a blank one
