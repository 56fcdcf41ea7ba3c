"""The web page end to end in headless Chromium (Debian's chromium, driven by Playwright's Python
package; `make test` installs both): type a prompt, press Generate, watch the image emerge, get
the final image with its parameters. Screenshots go to build/screenshots/ (or $DIFFUSE_SCREENSHOTS)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from test_server import DEFAULT_MODEL, Running, settings

playwright_api = pytest.importorskip("playwright.sync_api", reason="Playwright's Python package is not installed")
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
if not Path(CHROMIUM).exists():
    pytest.skip("Debian's chromium is not installed (make test installs it: scripts/install-browser.sh)",
                allow_module_level=True)

# Headless, and quiet on a machine without a network: no background connections to Google's hosts.
CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SCREENSHOTS = Path(os.environ.get("DIFFUSE_SCREENSHOTS", Path(__file__).resolve().parent.parent / "build" / "screenshots"))


@pytest.fixture(scope="module")
def browser():
    with playwright_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    running = Running(settings(tmp_path_factory.mktemp("page"), model=DEFAULT_MODEL))
    yield running
    running.stop()


def test_generate_from_the_page(browser, server):
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    errors = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(server.base + "/")
    page.wait_for_function("document.getElementById('sampler_name').options.length > 0")
    page.fill("#prompt", "a red circle above a blue square")
    page.fill("#steps", "120")  # long enough at 64x64 for the previews to be seen arriving
    page.fill("#cfg_scale", "3")
    page.fill("#seed", "42")
    page.click("#generate")
    page.wait_for_function("Number(document.getElementById('preview').dataset.updates || 0) >= 2", timeout=60_000)
    page.screenshot(path=str(SCREENSHOTS / "page-emerging.png"))
    page.wait_for_selector("#result figure img", timeout=120_000)
    page.wait_for_function("(() => { const img = document.querySelector('#result img');"
                           " return img && img.complete && img.naturalWidth === 64; })()", timeout=30_000)
    caption = page.inner_text("#result figcaption")
    assert caption.startswith("a red circle above a blue square")
    assert "Steps: 120" in caption and "Seed: 42" in caption and "CFG scale: 3" in caption
    assert page.inner_text("#status") == "done"
    assert int(page.get_attribute("#preview", "data-updates")) >= 2
    href = page.get_attribute("#result figure a", "href")
    assert href.startswith("/outputs/") and page.get_attribute("#result figure a", "download")
    page.wait_for_selector("#gallery figure img")
    page.screenshot(path=str(SCREENSHOTS / "page-done.png"), full_page=True)
    assert errors == []
    assert (SCREENSHOTS / "page-emerging.png").stat().st_size > 0
