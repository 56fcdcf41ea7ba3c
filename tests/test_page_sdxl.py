"""The web page on a tiny SDXL base in headless Chromium (as tests/test_page_browser.py drives it):
the form shows the model's own size and the refiner controls an SDXL model takes, a generation
hands over to the refiner, "Make again" finds the refiner by its hash, and an SD1 model hides
the refiner controls."""

from __future__ import annotations

import io
import urllib.request

import pytest
from PIL import Image
from test_page_browser import browser  # noqa: F401  (the headless Chromium fixture; skips without it)
from test_server import Running, settings
from test_server_sdxl import BASE_SIZE, sdxl_models_folder

from diffuse.metadata import parse_infotext, read_parameters


@pytest.fixture(scope="module")
def server(tmp_path_factory, clip_vocab_dir):
    models = sdxl_models_folder(tmp_path_factory, clip_vocab_dir)
    running = Running(settings(tmp_path_factory.mktemp("page"), model=models / "tiny_base", models_dir=models))
    yield running
    running.stop()


def image_at(server, url: str) -> Image.Image:
    return Image.open(io.BytesIO(urllib.request.urlopen(server.base + url, timeout=10).read()))


def test_the_page_draws_with_an_sdxl_model_and_its_refiner(browser, server):  # noqa: F811
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    errors = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(server.base + "/")
    page.wait_for_function("document.getElementById('width').placeholder !== ''")
    assert page.input_value("#model").startswith("tiny_base [")
    assert page.get_attribute("#width", "placeholder") == str(BASE_SIZE) and page.input_value("#width") == ""
    assert page.is_visible("#refiner_checkpoint") and page.is_visible("#refiner_switch_at")
    refiner = next(
        o
        for o in page.eval_on_selector_all("#refiner_checkpoint option", "os => os.map(o => o.value)")
        if o.startswith("tiny_refiner [")
    )
    page.fill("#prompt", "a castle on a hill")
    for field, value in (("#steps", "4"), ("#cfg_scale", "5"), ("#seed", "8"), ("#refiner_switch_at", "0.6")):
        page.fill(field, value)
    page.select_option("#refiner_checkpoint", refiner)
    page.click("#generate")
    page.wait_for_function(
        "(() => { const img = document.querySelector('#result img');"
        f" return img && img.complete && img.naturalWidth === {BASE_SIZE}; }})()",
        timeout=60_000,
    )
    caption = page.inner_text("#result figcaption")
    assert f"Refiner: {refiner}, Refiner switch at: 0.6" in caption and "Model: tiny_base" in caption
    assert page.locator("#result .how-made").count() == 0  # a report would draw the base alone
    href = page.get_attribute("#result figure a", "href")

    # "Make again" selects the refiner again, found by its hash, and draws the same image.
    page.wait_for_selector("#gallery figure:first-child .remake")
    page.select_option("#refiner_checkpoint", "")
    page.fill("#seed", "-1")
    page.click("#gallery figure:first-child .remake")
    page.wait_for_function(
        f"(() => {{ const link = document.querySelector('#result figure a');"
        f" return link && link.getAttribute('href') !== '{href}'; }})()",
        timeout=60_000,
    )
    assert page.input_value("#refiner_checkpoint") == refiner and page.input_value("#refiner_switch_at") == "0.6"
    first, again = image_at(server, href), image_at(server, page.get_attribute("#result figure a", "href"))
    assert read_parameters(again) == read_parameters(first) and again.tobytes() == first.tobytes()
    assert parse_infotext(read_parameters(again))["Refiner"] == refiner

    # An SD1 model takes no refiner, and draws at its own size.
    sd1 = next(
        o for o in page.eval_on_selector_all("#model option", "os => os.map(o => o.value)") if o.startswith("sd1 [")
    )
    page.select_option("#model", sd1)
    page.wait_for_function("document.getElementById('width').placeholder === '64'", timeout=60_000)
    assert not page.is_visible("#refiner_checkpoint") and not page.is_visible("#refiner_switch_at")
    assert errors == []
