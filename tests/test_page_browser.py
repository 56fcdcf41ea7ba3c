"""The web page end to end in headless Chromium (Debian's chromium, driven by Playwright's Python
package; `make test` installs both): type a prompt, press Generate, watch the image emerge, get
the final image with its parameters, make a gallery image again; "How it was made" on a result
(the report's figures shown in the page, the whole report opened in a new tab); the add-ons panel
(LoRAs and embeddings listed, clicked into the prompt, generated with); and a page of another
origin that tries to drive the server. Screenshots go to build/screenshots/ (or $DIFFUSE_SCREENSHOTS)."""

from __future__ import annotations

import io
import json
import os
import shutil
import urllib.request
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from test_addons_pipeline import kohya_lora
from test_server import DEFAULT_MODEL, Running, settings

from diffuse.illustrate.report import KINDS, TITLES
from diffuse.metadata import read_parameters

playwright_api = pytest.importorskip("playwright.sync_api", reason="Playwright's Python package is not installed")
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
if not Path(CHROMIUM).exists():
    pytest.skip(
        "Debian's chromium is not installed (make test installs it: scripts/install-browser.sh)",
        allow_module_level=True,
    )

# Headless, and quiet on a machine without a network: no background connections to Google's hosts.
CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SCREENSHOTS = Path(
    os.environ.get("DIFFUSE_SCREENSHOTS", Path(__file__).resolve().parent.parent / "build" / "screenshots")
)


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
    page.wait_for_function(
        "(() => { const img = document.querySelector('#result img');"
        " return img && img.complete && img.naturalWidth === 64; })()",
        timeout=30_000,
    )
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

    # "Make again" on the gallery's image: the form takes its parameters and draws it again.
    assert page.get_attribute("#gallery figure:first-child a", "href") == href
    page.fill("#prompt", "something else entirely")
    page.fill("#seed", "-1")
    page.click("#gallery figure:first-child .remake")
    page.wait_for_function(
        f"(() => {{ const link = document.querySelector('#result figure a');"
        f" return link && link.getAttribute('href') !== '{href}'; }})()",
        timeout=120_000,
    )
    assert page.input_value("#prompt") == "a red circle above a blue square" and page.input_value("#seed") == "42"
    assert page.input_value("#width") == "64" and page.input_value("#scheduler") == "Automatic"
    again = page.get_attribute("#result figure a", "href")
    first, second = (
        Image.open(io.BytesIO(urllib.request.urlopen(server.base + url, timeout=10).read())) for url in (href, again)
    )
    assert read_parameters(second) == read_parameters(first)
    assert second.convert("RGB").tobytes() == first.convert("RGB").tobytes()
    # An image made with int8 is not made again on a server without it: the page says why instead.
    fields = next(entry["fields"] for entry in page.evaluate("getJSON('/diffuse/v1/gallery')") if entry["fields"])
    page.evaluate("fields => makeAgain(fields)", {**fields, "quantize": "int8"})
    assert page.inner_text("#status") == (
        "this image was made with --quantize int8; this server runs without --quantize, so it would not come out the same"
    )
    assert page.get_attribute("#result figure a", "href") == again
    # The page's own posts are JSON: Interrupt, when idle, is answered.
    assert page.evaluate("postJSON('/sdapi/v1/interrupt', {})") == {"interrupted": False, "job": None}
    assert errors == []


def test_how_it_was_made(browser, server):
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    errors, requested = [], []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.on("request", lambda request: requested.append(request.url))
    page.goto(server.base + "/")
    page.wait_for_function("document.getElementById('sampler_name').options.length > 0")
    page.fill("#prompt", "a red circle above a blue square")
    page.fill("#steps", "3")
    page.fill("#cfg_scale", "3")
    page.fill("#seed", "7")
    page.click("#generate")
    page.wait_for_selector("#result figure .how-made", timeout=120_000)
    assert page.locator("#how-made[open]").count() == 0
    page.click("#result figure .how-made")
    page.wait_for_selector("#how-made[open]")
    page.wait_for_function(
        "Number(document.getElementById('how-made-figures').dataset.count || 0) > 0", timeout=180_000
    )
    page.wait_for_function(
        "[...document.querySelectorAll('#how-made-figures img')].every((img) => img.complete && img.naturalWidth > 0)",
        timeout=30_000,
    )
    # The figures of the report the server wrote, in its order, with its headings and captions.
    link = page.get_attribute("#how-made-link", "href")
    assert page.get_attribute("#how-made-link", "target") == "_blank"
    assert page.get_attribute("#how-made-link", "rel") == "noopener"
    assert link.startswith("/diffuse/v1/illustrate/") and link.endswith("/files/index.html")
    report = json.loads(
        urllib.request.urlopen(server.base + link.removesuffix("index.html") + "report.json", timeout=10).read()
    )
    assert report["prompt"] == "a red circle above a blue square" and report["seed"] == 7
    assert report["settings"]["steps"] == 3 and report["settings"]["sampler"] == "Euler a"
    kinds = page.eval_on_selector_all("#how-made-figures figure", "items => items.map((item) => item.dataset.kind)")
    assert kinds == [entry["kind"] for entry in report["figures"]] == list(KINDS)
    assert page.locator("#how-made-figures img").count() == len(KINDS)
    assert page.locator("#how-made-figures h3").all_inner_texts() == [TITLES[kind] for kind in KINDS]
    captions = page.locator("#how-made-figures figcaption").all_inner_texts()
    assert captions == [entry["caption"] for entry in report["figures"]] and all(captions)
    images = page.eval_on_selector_all("#how-made-figures img", "items => items.map((item) => item.src)")
    assert images == [server.base + link.removesuffix("index.html") + entry["file"] for entry in report["figures"]]
    assert page.inner_text("#how-made-status").startswith(f"{len(KINDS)} of {len(KINDS)} figures drawn")
    page.screenshot(path=str(SCREENSHOTS / "page-how-made.png"))
    assert (SCREENSHOTS / "page-how-made.png").stat().st_size > 0

    # The whole report in a new tab: the offline index.html, its images served beside it.
    with page.context.expect_page() as opened:
        page.click("#how-made-link")
    tab = opened.value
    tab.on("request", lambda request: requested.append(request.url))
    tab.wait_for_load_state()
    assert tab.url == server.base + link and tab.title().startswith("How it was made")
    tab.wait_for_function("[...document.images].every((img) => img.complete && img.naturalWidth > 0)")
    assert tab.locator("section.figure img").count() == len(KINDS)
    tab.close()
    # Nothing was asked of anyone but the page's own server.
    assert requested and all(url.startswith(server.base + "/") or url.startswith("data:") for url in requested)

    page.click("#how-made-close")
    assert page.locator("#how-made[open]").count() == 0
    assert errors == []


def test_a_page_of_another_origin_cannot_drive_the_server(browser, server):
    queue = server.app.app.state.server.queue
    before = queue.submitted
    target = server.base  # http://127.0.0.1:PORT; the page below is at http://localhost:PORT, another origin
    page = browser.new_page()
    page.goto(server.base.replace("127.0.0.1", "localhost") + "/")
    outcomes = page.evaluate(
        """async (target) => {
      const body = JSON.stringify({prompt: "x", steps: 2});
      const tries = {
        plain: () => fetch(target + "/sdapi/v1/txt2img", {method: "POST", mode: "no-cors", body,
                                                          headers: {"Content-Type": "text/plain"}}),
        json: () => fetch(target + "/diffuse/v1/jobs", {method: "POST", body,
                                                        headers: {"Content-Type": "application/json"}}),
        progress: () => fetch(target + "/sdapi/v1/progress"),
      };
      const results = {};
      for (const [name, attempt] of Object.entries(tries)) {
        try { const response = await attempt(); results[name] = response.type + " " + response.status; }
        catch (error) { results[name] = "refused"; }
      }
      const form = Object.assign(document.createElement("form"), {method: "POST", target: "sink",
                                                                 action: target + "/sdapi/v1/interrupt"});
      form.enctype = "application/x-www-form-urlencoded";
      const frame = Object.assign(document.createElement("iframe"), {name: "sink"});
      document.body.append(frame, form);
      const loaded = new Promise((resolve) => frame.addEventListener("load", resolve));
      form.submit();
      await loaded;
      return results;
    }""",
        target,
    )
    # The no-cors post is opaque to the page (type "opaque", status 0), the others fail outright;
    # what matters is that the server ran nothing.
    assert outcomes == {"plain": "opaque 0", "json": "refused", "progress": "refused"}
    assert queue.submitted == before


@pytest.fixture(scope="module")
def addons_server(tmp_path_factory, reference_folders, reference_pipes):
    root = tmp_path_factory.mktemp("page_addons")
    loras, embeddings = root / "loras", root / "embeddings"
    loras.mkdir()
    embeddings.mkdir()
    save_file(kohya_lora(reference_pipes["sd1"]), loras / "detail.safetensors", {"ss_output_name": "fine"})
    # A file name that is markup: the page must show it as text, never build elements from it.
    save_file(kohya_lora(reference_pipes["sd1"], seed=1), loras / "<img src=x onerror=window.pwned=1>.safetensors")
    width = reference_pipes["sd1"].text_encoder.config.hidden_size
    save_file({"emb_params": torch.randn(2, width) * 3}, embeddings / "shiny.safetensors")
    save_file({"emb_params": torch.randn(1, width + 1)}, embeddings / "narrow.safetensors")
    running = Running(
        settings(
            root,
            model=reference_folders["sd1"],
            lora_dirs=(loras,),
            embedding_dirs=(embeddings,),
        )
    )
    yield running, loras
    running.stop()


def test_the_addons_panel_says_when_there_are_none(browser, server):
    page = browser.new_page()
    page.goto(server.base + "/")
    page.wait_for_selector("#lora-list .empty")
    assert "--lora-dir" in page.inner_text("#lora-list")
    assert "--embeddings-dir" in page.inner_text("#embedding-list")
    assert page.locator("#addons .addon-list button").count() == 0


def open_page(browser, server):
    """The page in a new tab, and the list its script errors are collected in."""
    page = browser.new_page()
    errors = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(server.base + "/")
    return page, errors


def pressed(page, selector: str) -> str:
    return page.get_attribute(selector, "aria-pressed")


def test_lora_weight_and_click_to_remove(browser, addons_server):
    server, _ = addons_server
    page, errors = open_page(browser, server)
    page.wait_for_selector("#lora-list button")
    detail = "#lora-list button:has-text('detail')"
    assert page.input_value("#lora-weight") == "1"
    assert page.get_attribute("#lora-weight", "step") == "0.05"

    # The weight box sets the tag's weight, written without trailing zeros.
    page.fill("#prompt", "a cat")
    page.fill("#lora-weight", "0.70")
    assert "<lora:detail:0.7>" in page.get_attribute(detail, "title")
    page.click(detail)
    assert page.input_value("#prompt") == "a cat <lora:detail:0.7>" and pressed(page, detail) == "true"
    page.click(detail)  # in the prompt already: the click takes it out
    assert page.input_value("#prompt") == "a cat" and pressed(page, detail) == "false"
    page.fill("#lora-weight", "-0.5")
    page.click(detail)
    assert page.input_value("#prompt") == "a cat <lora:detail:-0.5>"
    page.click(detail)
    page.fill("#lora-weight", "")
    page.click(detail)
    assert page.input_value("#prompt") == "a cat" and "weight must be a number" in page.inner_text("#status")
    page.fill("#lora-weight", "1")

    # Every form of its tag goes, by file stem or by alias, and only its own; the spaces close up.
    page.fill(
        "#prompt",
        "a <lora:detail> cat, <lyco:detail:0.5:0.8> dog <lora:fine:te=1:unet=0.5>, <lora:other:1> <lora:details:1>",
    )
    assert pressed(page, detail) == "true"
    assert pressed(page, "#lora-list button:has-text('img')") == "false"
    page.click(detail)
    assert page.input_value("#prompt") == "a cat, dog, <lora:other:1> <lora:details:1>"
    assert pressed(page, detail) == "false"

    # The mark follows typing.
    page.fill("#prompt", "")
    page.type("#prompt", "a cat <lora:detail:0.3")
    assert pressed(page, detail) == "false"
    page.keyboard.type(">")
    assert pressed(page, detail) == "true"
    page.keyboard.press("Backspace")
    assert pressed(page, detail) == "false"
    page.keyboard.type("> ")

    # The negative prompt, once focused, is the box that the marks and the clicks are about.
    page.focus("#negative_prompt")
    assert page.inner_text("#addon-target") == "negative prompt" and pressed(page, detail) == "false"
    page.click(detail)
    assert page.input_value("#negative_prompt") == "<lora:detail:1>"
    assert page.input_value("#prompt") == "a cat <lora:detail:0.3> "
    page.focus("#prompt")
    assert page.inner_text("#addon-target") == "prompt" and pressed(page, detail) == "true"

    # From the keyboard: a LoRA button takes Enter like any button.
    page.focus(detail)
    page.keyboard.press("Enter")
    assert page.input_value("#prompt") == "a cat " and pressed(page, detail) == "false"
    assert errors == []


def test_embedding_toggles_as_a_whole_word(browser, addons_server):
    server, _ = addons_server
    page, errors = open_page(browser, server)
    page.wait_for_selector("#embedding-list button")
    shiny = "#embedding-list button"
    # Inside a longer word, or as a LoRA tag's name, it is not the embedding; beside a digit it is
    # (the tokenizer splits "shiny2" into "shiny" and "2").
    page.fill("#prompt", "shinyness, <lora:shiny:1>")
    assert pressed(page, shiny) == "false"
    page.fill("#prompt", "shiny2")
    assert pressed(page, shiny) == "true"
    page.fill("#prompt", "a Shiny cat, shinyness, (shiny:1.2)")
    assert pressed(page, shiny) == "true"
    page.click(shiny)  # every time it is written, with the emphasis around it
    assert page.input_value("#prompt") == "a cat, shinyness," and pressed(page, shiny) == "false"
    page.click(shiny)  # back where the first one was
    assert page.input_value("#prompt") == "a shiny cat, shinyness," and pressed(page, shiny) == "true"
    page.fill("#prompt", "[shiny] and ((shiny)), my-shiny")
    page.click(shiny)
    assert page.input_value("#prompt") == "and, my-"
    page.focus("#negative_prompt")
    assert pressed(page, shiny) == "false"
    page.click(shiny)
    page.click(shiny)
    assert page.input_value("#negative_prompt") == "" and page.input_value("#prompt") == "and, my-"
    assert errors == []


def test_addons_listed_inserted_and_generated_with(browser, addons_server):
    server, loras = addons_server
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    errors = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(server.base + "/")
    page.wait_for_selector("#embedding-list button")
    buttons = page.locator("#lora-list button")
    assert sorted(buttons.all_inner_texts()) == sorted(["detail (fine)", "<img src=x onerror=window.pwned=1>"])
    assert page.locator("#addons img").count() == 0 and page.evaluate("window.pwned") is None
    assert page.inner_text("#embedding-list button") == "shiny · 2 vectors"
    skipped = page.locator("#embedding-list .skipped")
    assert skipped.inner_text() == "narrow (skipped)" and "wide" in skipped.get_attribute("title")

    # At the cursor of the prompt box last focused, spaced from the words around it.
    page.fill("#prompt", "a cat")
    page.click("#lora-list button:has-text('detail')")
    assert page.input_value("#prompt") == "a cat <lora:detail:1>"
    page.evaluate("document.getElementById('prompt').setSelectionRange(1, 1)")
    page.click("#embedding-list button")
    assert page.input_value("#prompt") == "a shiny cat <lora:detail:1>"
    page.focus("#negative_prompt")
    page.click("#embedding-list button")
    assert page.input_value("#negative_prompt") == "shiny" and page.input_value("#prompt").count("shiny") == 1

    page.fill("#steps", "2")
    page.fill("#seed", "5")
    page.click("#generate")
    page.wait_for_selector("#result figure img", timeout=120_000)
    caption = page.inner_text("#result figcaption")
    assert caption.startswith("a shiny cat <lora:detail:1>\nNegative prompt: shiny\n")
    assert "Lora hashes: " in caption and "detail: " in caption and "TI hashes: " in caption
    assert page.inner_text("#status") == "done"
    page.screenshot(path=str(SCREENSHOTS / "page-addons.png"), full_page=True)

    # Refresh looks in the folders again (a JSON POST, as the server demands of state changes).
    (loras / "detail.safetensors").rename(loras / "renamed.safetensors")
    page.click("#refresh-addons")
    page.wait_for_selector("#lora-list button:has-text('renamed (fine)')")
    assert page.locator("#lora-list button:has-text('detail')").count() == 0
    assert page.inner_text("#status") == "add-ons looked for again"
    assert errors == []
