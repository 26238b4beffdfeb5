"""A real headless-browser screenshot of a search's runs table, opened by the deep link that
`autoprune ui` prints. Needs a browser: Playwright with its Chromium, or a chromium /
google-chrome binary; skipped (with the reason) where there is none."""

from __future__ import annotations

import html
import re
import shutil
import struct
import subprocess
import tempfile

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


def _page_text(url: str) -> str:
    """The words of the page at ``url`` once the single-page app has drawn it."""
    if BROWSER == "playwright":
        from playwright.sync_api import sync_playwright

        with sync_playwright() as p:
            browser = p.chromium.launch(headless=True)
            page = browser.new_page(viewport={"width": 1600, "height": 1000})
            page.goto(url, wait_until="networkidle", timeout=60_000)
            page.wait_for_selector("text=#1", timeout=60_000)
            text = page.inner_text("body")
            browser.close()
        return re.sub(r"\s+", " ", text)
    with tempfile.TemporaryDirectory() as profile:  # a fresh browser: nothing remembered of other pages
        dom = subprocess.run(
            [BROWSER, "--headless=new", "--no-sandbox", "--disable-gpu", f"--user-data-dir={profile}"]
            + ["--window-size=1600,1000", "--virtual-time-budget=20000", "--dump-dom", url],
            check=True,
            capture_output=True,
            text=True,
            timeout=120,
        ).stdout
    return html.unescape(re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", dom)))


def _model_training_view(text: str) -> bool:
    """Whether a page is in MLflow's model-training view: its sidebar has the model registry,
    not the GenAI view's training and evaluation runs (where a link without its
    ``workflowType`` opens, in a browser that has not chosen)."""
    return "Model registry" in text and "Training runs" not in text and "Evaluation runs" not in text


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
    link = (
        ui.base
        + f"/#/experiments/{viewed.result.experiment_id}/runs?viewStateShareKey=trials&workflowType=machine_learning"
    )
    assert link in ui.printed
    png = tmp_path / "runs.png"
    _screenshot(link, png)
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    assert width >= 800 and height >= 500 and len(data) > 20_000  # a drawn page, not a blank one


def test_the_runs_table_opens_with_its_columns_the_winner_marked(viewed, ui):
    """What a new user sees without configuring anything: the trials (named #N first), the
    winner's tag, the score and cost columns, the search's outcome above them."""
    eid = viewed.result.experiment_id
    text = _page_text(ui.base + f"/#/experiments/{eid}/runs?viewStateShareKey=trials&workflowType=machine_learning")
    header = text[text.index("Run Name") :]
    for column in ("autoprune.best", "val_acc", "flops_ratio", "predicted_speedup", "policy.criterion", "policy.scope"):
        assert column in header, column
    names = re.findall(r"#([1-6]) [a-z_]+", header)
    assert sorted(set(names)) == ["1", "2", "3", "4", "5", "6"], header[:2000]
    assert " true " in header and "Best: " in text  # the winner's tag, the experiment's description
    assert _model_training_view(text)


def test_a_link_from_the_description_stays_in_the_model_training_view(viewed, ui):
    eid, run_id = viewed.result.experiment_id, viewed.result.summary["mlflow"]["run_id"]
    text = _page_text(ui.base + f"/#/experiments/{eid}/runs/{run_id}?workflowType=machine_learning")
    assert _model_training_view(text) and "Model metrics" in text, text[:1500]
