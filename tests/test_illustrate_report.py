"""The illustrated report (diffuse.illustrate.report and `diffuse illustrate`): report.json's shape,
every figure kind drawn on the shipped model with a file and a caption, index.html naming only
its own files and no network address, the page in headless Chromium with every request that is
not a local file blocked, a figure maker's failure kept to its own figure, the folder written
whole and never over a folder that is not a report, and the command line."""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from dataclasses import replace
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from markupsafe import escape
from matplotlib import pyplot
from PIL import Image

from diffuse import cli, load_pipeline
from diffuse.illustrate.figure import Figure, save
from diffuse.illustrate.record import record
from diffuse.illustrate.report import GENERATOR, IMAGE, KINDS, TITLES, Report, illustrate, write_report

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "models" / "default"
PROMPT = "a red circle above a blue square"
SCREENSHOTS = Path(os.environ.get("DIFFUSE_SCREENSHOTS", ROOT / "build" / "screenshots"))


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline(MODEL)


@pytest.fixture(scope="module")
def rec(pipe):
    return record(pipe, PROMPT, seed=5, steps=3, cfg_scale=4.0)


def plot_maker(kind: str):
    """A small figure maker of `kind` that plots the run's step times, as the real makers plot their numbers."""

    def maker(pipe, rec, out: Path) -> Figure:
        fig, ax = pyplot.subplots(figsize=(2, 1.5))
        seconds = [step.seconds for step in rec.step_records]
        ax.plot(seconds)
        name = save(fig, out, f"{kind}.png")
        return Figure(kind, name, f"{kind}: {len(seconds)} steps of {rec.steps}", {"steps": len(seconds)})

    return maker


def failing_maker(pipe, rec, out: Path) -> Figure:
    pyplot.subplots()  # left open, as a maker that fails halfway leaves its plot
    raise RuntimeError("the maker broke here")


SMALL_MAKERS = {kind: plot_maker(kind) for kind in KINDS}


# ---- the report's files ----------------------------------------------------------------------------


def test_report_json_has_the_issues_shape(pipe, rec, tmp_path):
    report = write_report(pipe, rec, tmp_path / "report", makers=SMALL_MAKERS)
    folder = report.folder
    data = json.loads((folder / "report.json").read_text(encoding="utf-8"))
    assert data == report.report
    assert {"prompt", "seed", "model", "image", "figures", "attention"} <= set(data)
    assert (data["prompt"], data["seed"], data["model"]) == (PROMPT, 5, "default")
    assert data["generator"] == GENERATOR
    assert data["settings"]["steps"] == 3 and data["settings"]["cfg_scale"] == 4.0
    assert data["image"] == IMAGE
    assert np.array_equal(np.asarray(Image.open(folder / IMAGE)), np.asarray(rec.image))
    assert [entry["kind"] for entry in data["figures"]] == list(KINDS)
    for entry in data["figures"]:
        assert (folder / entry["file"]).is_file()
        assert entry["caption"] == f"{entry['kind']}: 3 steps of 3" and entry["steps"] == 3
    assert [figure.kind for figure in report.figures] == list(KINDS) and report.errors == []
    attention = data["attention"]
    assert attention["tokens"] == rec.attention.tokens
    maps = np.asarray(attention["maps"])
    assert maps.shape == tuple(rec.attention.maps.shape) and maps.ndim == 3
    assert np.allclose(maps, rec.attention.maps.numpy(), atol=1e-6)
    assert set(data["timings"]["figures"]) == set(KINDS)
    assert sorted(path.name for path in folder.iterdir()) == sorted(
        ["report.json", "index.html", IMAGE] + [f"{kind}.png" for kind in KINDS]
    )


def test_kinds_are_drawn_in_the_reports_order_and_unknown_ones_refused(pipe, rec, tmp_path):
    report = write_report(pipe, rec, tmp_path / "some", makers=SMALL_MAKERS, kinds=["unet", "tokens", "steps"])
    assert [entry["kind"] for entry in report.report["figures"]] == ["tokens", "steps", "unet"]
    with pytest.raises(ValueError, match="unknown figure kind 'colours'"):
        write_report(pipe, rec, tmp_path / "other", makers=SMALL_MAKERS, kinds=["tokens", "colours"])
    with pytest.raises(ValueError, match="no figure maker for kind 'unet'"):
        write_report(pipe, rec, tmp_path / "other", makers={"tokens": SMALL_MAKERS["tokens"]}, kinds=["unet"])
    assert not (tmp_path / "other").exists()


def test_a_failing_maker_costs_only_its_own_figure(pipe, rec, tmp_path):
    makers = {**SMALL_MAKERS, "steps": failing_maker, "unet": lambda pipe, rec, out: "not a figure"}
    report = write_report(pipe, rec, tmp_path / "report", makers=makers)
    entries = {entry["kind"]: entry for entry in report.report["figures"]}
    assert list(entries) == list(KINDS)
    assert entries["steps"] == {"kind": "steps", "error": "RuntimeError: the maker broke here"}
    assert entries["unet"] == {"kind": "unet", "error": "TypeError: the maker returned str, not a Figure"}
    assert [e["kind"] for e in report.errors] == ["steps", "unet"]
    assert [figure.kind for figure in report.figures] == [k for k in KINDS if k not in ("steps", "unet")]
    assert pyplot.get_fignums() == []
    page = (report.folder / "index.html").read_text(encoding="utf-8")
    failed = re.search(r'<section class="figure failed" id="steps".*?</section>', page, re.S)
    assert failed and "RuntimeError: the maker broke here" in failed.group(0)
    assert json.loads((report.folder / "report.json").read_text())["figures"][KINDS.index("steps")] == entries["steps"]


def test_a_figure_must_name_its_own_file_in_the_folder(pipe, rec, tmp_path):
    def outside(pipe, rec, out: Path) -> Figure:
        return Figure("tokens", "../elsewhere.png", "a caption")

    def captionless(pipe, rec, out: Path) -> Figure:
        return Figure("steps", save(pyplot.figure(), out, "steps.png"), " ")

    report = write_report(pipe, rec, tmp_path / "r", makers={"tokens": outside, "steps": captionless})
    assert [e["error"] for e in report.errors] == [
        "ValueError: the figure's file '../elsewhere.png' is not a file in the report's folder",
        "ValueError: the figure has no caption",
    ]


def test_the_folder_is_written_whole_and_never_over_a_folder_that_is_not_a_report(pipe, rec, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="holds no previous report"):
        write_report(pipe, rec, out, makers=SMALL_MAKERS)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(ValueError, match="is not a folder"):
        write_report(pipe, rec, tmp_path / "a-file", makers=SMALL_MAKERS)

    first = write_report(pipe, rec, out, makers=SMALL_MAKERS, kinds=["tokens"], overwrite=True)
    assert not (out / "notes.txt").exists() and (out / "tokens.png").is_file()
    # A previous report is replaced without being asked to.
    write_report(pipe, rec, out, makers=SMALL_MAKERS, kinds=["unet"])
    assert {p.name for p in out.iterdir()} == {"report.json", "index.html", IMAGE, "unet.png"}
    assert first.folder == out

    def interrupted(pipe, rec, out: Path) -> Figure:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_report(pipe, rec, out, makers={**SMALL_MAKERS, "steps": interrupted})
    assert {p.name for p in out.iterdir()} == {"report.json", "index.html", IMAGE, "unet.png"}
    with pytest.raises(KeyboardInterrupt):
        write_report(pipe, rec, tmp_path / "new", makers={"steps": interrupted})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "out"]  # no half-written folder left


# ---- the page -----------------------------------------------------------------------------------


class References(HTMLParser):
    """Every address the page names: src, href, and url(...) in its style."""

    def __init__(self):
        super().__init__()
        self.addresses: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.addresses += [value for name, value in attrs if name in ("src", "href", "srcset", "data") and value]

    def handle_data(self, data):
        self.addresses += re.findall(r"url\(\s*['\"]?([^'\")]+)", data)


def check_offline_page(folder: Path) -> list[str]:
    """The page's local files: each exists in `folder`; no address leaves it (no scheme, no //, no ..)."""
    page = (folder / "index.html").read_text(encoding="utf-8")
    assert not re.search(r"https?:|//[a-z]|<script|@import|<link", page, re.I)
    parser = References()
    parser.feed(page)
    files = []
    for address in parser.addresses:
        if address.startswith("#"):
            assert f'id="{address[1:]}"' in page
            continue
        assert ":" not in address and not address.startswith("/") and ".." not in address, address
        assert (folder / address).is_file(), address
        files.append(address)
    return files


@pytest.fixture(scope="module")
def shipped_report(pipe, tmp_path_factory) -> Report:
    """The full report on the shipped model (the command's defaults, at the model card's guidance 4), timed."""
    start = time.perf_counter()
    report = illustrate(pipe, PROMPT, out=tmp_path_factory.mktemp("illustrated") / "report", seed=0, cfg_scale=4.0)
    seconds = time.perf_counter() - start
    timings = report.report["timings"]
    figures = ", ".join(f"{kind} {value:.2f}" for kind, value in timings["figures"].items())
    print(
        f"\nshipped-model report: {seconds:.1f} s ({report.report['settings']['threads']} threads): "
        f"the run {timings['record']:.1f} s, figures {timings['figures_total']:.1f} s ({figures})"
    )
    return report


def test_every_kind_is_drawn_on_the_shipped_model(shipped_report):
    data = json.loads((shipped_report.folder / "report.json").read_text(encoding="utf-8"))
    assert shipped_report.errors == []
    assert [entry["kind"] for entry in data["figures"]] == list(KINDS)
    for entry in data["figures"]:
        assert (shipped_report.folder / entry["file"]).is_file(), entry
        assert entry["caption"].strip(), entry
        with Image.open(shipped_report.folder / entry["file"]) as image:
            assert image.width > 50 and image.height > 50
    assert data["attention"]["tokens"] and len(data["attention"]["maps"]) == len(data["attention"]["tokens"])
    assert all(np.asarray(m).ndim == 2 for m in data["attention"]["maps"])
    assert data["settings"]["steps"] == 20 and data["model"] == "default"


def test_the_page_names_only_its_own_files(shipped_report):
    folder = shipped_report.folder
    files = check_offline_page(folder)
    assert set(files) == {IMAGE} | {entry["file"] for entry in shipped_report.report["figures"]}
    page = (folder / "index.html").read_text(encoding="utf-8")
    assert f'<p class="prompt">{PROMPT}</p>' in page
    positions = [page.index(f'id="{kind}"') for kind in KINDS]
    assert positions == sorted(positions)
    for figure in shipped_report.figures:
        assert f"<h2>{escape(TITLES[figure.kind])}</h2>" in page
    assert page.index('id="final-image"') < positions[0]


def test_the_page_escapes_the_prompt(pipe, rec, tmp_path):
    rec_html = replace(rec, prompt='<img src="http://example.com/x.png"> & more')
    report = write_report(pipe, rec_html, tmp_path / "r", makers=SMALL_MAKERS, kinds=["tokens"])
    page = (report.folder / "index.html").read_text(encoding="utf-8")
    assert "&lt;img src=&#34;http" in page and '<img src="http' not in page


def test_the_page_shows_every_figure_with_the_network_blocked(shipped_report):
    playwright_api = pytest.importorskip("playwright.sync_api", reason="Playwright's Python package is not installed")
    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(chromium).exists():
        pytest.skip("Debian's chromium is not installed (make test installs it: scripts/install-browser.sh)")
    args = ["--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"]
    requested, blocked = [], []

    def route(request_route):
        url = request_route.request.url
        requested.append(url)
        if url.startswith("file://"):
            request_route.continue_()
        else:
            blocked.append(url)
            request_route.abort()

    with playwright_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=args)
        try:
            context = browser.new_context(offline=True, viewport={"width": 1200, "height": 900})
            page = context.new_page()
            page.route("**/*", route)
            page.goto((shipped_report.folder / "index.html").as_uri())
            page.wait_for_load_state("load")
            images = page.eval_on_selector_all(
                "img", "els => els.map(e => [e.getAttribute('src'), e.complete && e.naturalWidth > 0])"
            )
            sections = page.eval_on_selector_all("section.figure", "els => els.map(e => e.dataset.kind)")
            SCREENSHOTS.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(SCREENSHOTS / "illustrate-report.png"), full_page=True)
        finally:
            browser.close()
    assert sections == list(KINDS)
    assert len(images) == len(KINDS) + 1 and all(loaded for _, loaded in images), images
    assert blocked == [] and all(url.startswith("file://") for url in requested)


# ---- the command ------------------------------------------------------------------------------


def test_the_command_writes_a_report(tmp_path, capsys):
    out = tmp_path / "report"
    options = ["--seed", "7", "--steps", "4", "--cfg-scale", "4", "--sampler", "Euler a", "-W", "72", "-H", "64"]
    assert cli.main(["illustrate", PROMPT, *options, "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == str(out / "index.html")
    data = json.loads((out / "report.json").read_text(encoding="utf-8"))
    settings = data["settings"]
    assert (data["seed"], settings["steps"], settings["sampler"], settings["cfg_scale"]) == (7, 4, "Euler a", 4.0)
    assert (settings["width"], settings["height"]) == (72, 64) and Image.open(out / IMAGE).size == (72, 64)
    assert [entry["kind"] for entry in data["figures"]] == list(KINDS)
    assert all("error" not in entry for entry in data["figures"])
    check_offline_page(out)


def test_the_default_folder_is_named_by_seed_and_prompt(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli._check_illustrate_args(cli.build_parser().parse_args(["illustrate", "A Red  circle!", "--seed", "3"]))[
        1
    ] == Path("outputs/illustrated/3-a-red-circle")


@pytest.mark.parametrize(
    "options, message",
    [
        (["--width", "63"], "-W/--width must be a multiple of 8"),
        (["--steps", "0"], "--steps must be an integer from 1 to 1000"),
        (["--cfg-scale", "nan"], "--cfg-scale must be a number"),
        (["--sampler", "Nonesuch"], "Nonesuch"),
        (["--seed", "-5"], "--seed/--dtype/--device: seed must be an integer"),
        (["--out", "{file}"], "is a file, not a folder"),
        (["--out", "{notes}"], "holds no previous report; pass overwrite"),
        (["--model", "{missing}"], "missing"),
    ],
)
def test_bad_input_is_one_line_before_the_model_loads(options, message, tmp_path, monkeypatch, capsys):
    (tmp_path / "file").write_text("x")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "mine.txt").write_text("x")
    options = [
        o.format(file=tmp_path / "file", notes=tmp_path / "notes", missing=tmp_path / "missing") for o in options
    ]
    if "--model" not in options:
        monkeypatch.setattr(cli, "_load", lambda args: pytest.fail("the model loaded before the options were checked"))
    assert cli.main(["illustrate", PROMPT, "--out", str(tmp_path / "r"), *options]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert error[-1].startswith("diffuse: error: ") and message in error[-1], error
    assert (tmp_path / "notes" / "mine.txt").exists() and not (tmp_path / "r").exists()
