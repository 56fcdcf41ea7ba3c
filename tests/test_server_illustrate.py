"""The "How it was made" routes over real HTTP on the shipped model: a page result drawn again by
diffuse illustrate as a job on the server's queue, its report served only by the names report.json
lists, behind the same guard as every route, with ids that are random tokens and a bounded number
of reports on disk."""

from __future__ import annotations

import io
import json
import os
import secrets
import stat
import tempfile
import time
import urllib.error
import urllib.request
from email.message import Message
from pathlib import Path

import pytest
from PIL import Image

pytest.importorskip("fastapi")
from test_server import PROMPT, Running, settings  # noqa: E402

from diffuse.illustrate import report as report_module  # noqa: E402
from diffuse.illustrate.report import KINDS, TITLES  # noqa: E402
from diffuse.server import illustrate_routes  # noqa: E402
from diffuse.server.a1111 import Limits  # noqa: E402

EVIL = "http://evil.example"
LIMITS = Limits(max_side=256, max_steps=60, max_images=4)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    running = Running(settings(tmp_path_factory.mktemp("illustrate"), limits=LIMITS, queue_capacity=4))
    yield running
    running.stop()


def page_result(server: Running, body: dict) -> dict:
    """A page job's saved image (url, parameters, fields), followed to its end as the page does."""
    status, answer, _ = server.call("POST", "/diffuse/v1/jobs", body)
    assert status == 202, answer
    with urllib.request.urlopen(f"{server.base}/diffuse/v1/jobs/{answer['id']}/events", timeout=120) as stream:
        last = stream.read().decode().strip().split("\n\n")[-1]
    head, data = last.split("\n", 1)
    assert head == "event: done", last
    return json.loads(data.removeprefix("data: "))["images"][0]


def made(server: Running, report_id: str, timeout: float = 180) -> dict:
    """The report's state once its job has ended."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status, state, headers = server.call("GET", f"/diffuse/v1/illustrate/{report_id}")
        assert status == 200, state
        assert headers.get("cache-control") == "no-store"
        if state["state"] not in ("queued", "running"):
            return state
        time.sleep(0.2)
    raise AssertionError(f"report {report_id} not made in {timeout} s")


def fetch(server: Running, path: str, headers: dict | None = None) -> tuple[int, bytes, Message]:
    request = urllib.request.Request(server.base + path, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read(), response.headers
    except urllib.error.HTTPError as error:
        return error.code, error.read(), error.headers


@pytest.fixture(scope="module")
def result(server):
    """A result made on the page, and the report of it the page asks for with the result's fields."""
    image = page_result(server, {"prompt": PROMPT, "steps": 3, "cfg_scale": 3, "sampler_name": "Euler a", "seed": 11})
    queue = server.app.app.state.server.queue
    before = queue.submitted
    status, answer, _ = server.call("POST", "/diffuse/v1/illustrate", image["fields"])
    assert status == 202, answer
    assert queue.submitted == before + 1  # the generation queue's own job
    return image, answer["id"], made(server, answer["id"])


def test_an_image_made_with_another_quantize_is_refused(server, result):
    """A gallery image's fields carry its quantize; a server running another would draw another image."""
    image, _, _ = result
    assert image["fields"]["quantize"] is None
    status, answer, _ = server.call("POST", "/diffuse/v1/illustrate", {**image["fields"], "quantize": "int8"})
    assert status == 422 and answer["field"] == "quantize"
    assert answer["detail"] == "quantize: the image was made with quantize int8; this server runs with off"


def test_a_result_is_drawn_again_with_every_figure(server, result):
    image, report_id, state = result
    assert state["state"] == "done", state
    base = state["files"]
    assert base == f"/diffuse/v1/illustrate/{report_id}/files/" and state["titles"] == TITLES
    status, data, headers = fetch(server, base + "report.json")
    assert status == 200 and headers["Content-Type"] == "application/json"
    report = json.loads(data)
    fields = image["fields"]
    assert report["prompt"] == fields["prompt"] == PROMPT and report["seed"] == fields["seed"] == 11
    assert report["settings"]["steps"] == 3 and report["settings"]["cfg_scale"] == 3
    assert [entry["kind"] for entry in report["figures"]] == list(KINDS)
    assert [entry for entry in report["figures"] if "error" in entry] == []
    for entry in report["figures"]:
        status, data, headers = fetch(server, base + entry["file"])
        assert status == 200 and headers["Content-Type"] == "image/png", entry["file"]
        assert headers["X-Content-Type-Options"] == "nosniff"
        assert "script-src" not in headers["Content-Security-Policy"]  # default-src 'none' covers scripts
        assert "default-src 'none'" in headers["Content-Security-Policy"]
        assert Image.open(io.BytesIO(data)).size[0] > 0
    status, page, headers = fetch(server, base + "index.html")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert PROMPT in page.decode() and "<script" not in page.decode()
    # The same run as the page's result: the report's final image is that image, pixel for pixel.
    drawn = Image.open(io.BytesIO(fetch(server, base + report["image"])[1])).convert("RGB")
    shown = Image.open(io.BytesIO(fetch(server, image["url"])[1])).convert("RGB")
    assert drawn.tobytes() == shown.tobytes()


def test_only_the_names_the_report_lists_are_served(server, result, tmp_path):
    _, report_id, state = result
    base = state["files"]
    folder = server.app.app.state.reports.get(report_id).folder
    (folder / "extra.png").write_bytes((folder / "image.png").read_bytes())  # in the folder, not listed
    outside = tmp_path / "secret.png"
    outside.write_bytes(b"\x89PNG not for anyone")
    for name in (
        "extra.png",
        "..%2F..%2Fetc%2Fpasswd",
        "%2E%2E",
        "..",
        ".",
        "..%2Freport.json",
        "%2Fetc%2Fpasswd",
        "report.json%00",
        "REPORT.JSON",
        "report.json%2Fx",
    ):
        status, _, _ = fetch(server, base + name)
        assert status == 404, name
    for path in (
        f"/diffuse/v1/illustrate/..%2F{report_id}/files/report.json",
        f"/diffuse/v1/illustrate/{report_id}%2F..%2F{report_id}/files/report.json",
        "/diffuse/v1/illustrate/%2E%2E/files/report.json",
    ):
        assert fetch(server, path)[0] == 404, path
    # A listed name that is no longer a regular file of the report (a link put in its place) is not followed.
    (folder / "image.png").rename(folder / "image.saved")
    try:
        (folder / "image.png").symlink_to(outside)
        assert fetch(server, base + "image.png")[0] == 404
    finally:
        (folder / "image.png").unlink()
        (folder / "image.saved").rename(folder / "image.png")
    assert fetch(server, base + "image.png")[0] == 200


def test_unknown_ids_are_not_found(server, result):
    for report_id in (secrets.token_urlsafe(16), "x", "0" * 22, result[1][:-1], result[1] + "A"):
        assert server.call("GET", f"/diffuse/v1/illustrate/{report_id}")[0] == 404, report_id
        assert fetch(server, f"/diffuse/v1/illustrate/{report_id}/files/report.json")[0] == 404, report_id


def test_the_guard_holds_for_the_report_routes(server, result):
    queue = server.app.app.state.server.queue
    before = queue.submitted
    body = json.dumps({"prompt": "x", "steps": 2}).encode()
    for content_type, extra, want in (
        ("application/json", {"Origin": EVIL}, 403),
        ("application/json", {"Origin": "null"}, 403),
        ("application/json", {"Sec-Fetch-Site": "cross-site"}, 403),
        ("text/plain", {}, 415),
        ("application/x-www-form-urlencoded", {}, 415),
    ):
        status, answer, _ = server.call(
            "POST", "/diffuse/v1/illustrate", raw=body, headers={"Content-Type": content_type, **extra}
        )
        assert status == want, (content_type, extra, answer)
    status, _, _ = server.call("POST", "/diffuse/v1/illustrate", raw=b'{"prompt": "x", "seed": NaN}')
    assert status == 400
    assert queue.submitted == before
    # A page of another origin cannot read a report either.
    for path in (f"/diffuse/v1/illustrate/{result[1]}", result[2]["files"] + "report.json"):
        assert fetch(server, path, {"Origin": EVIL})[0] == 403, path
        assert fetch(server, path, {"Host": "evil.example"})[0] == 403, path


@pytest.mark.parametrize(
    "body, status, field",
    [
        ({"prompt": "x", "batch_size": 2}, 422, "batch_size"),
        ({"prompt": "x", "init_images": ["x"]}, 422, "init_images"),
        ({"prompt": "x", "steps": 61}, 422, "steps"),
        ({"prompt": "x", "width": 512}, 422, "width"),
        ({"prompt": "x", "sampler_name": "No Such Sampler"}, 422, None),
        ({"prompt": 3}, 422, "prompt"),
        ({"prompt": "x", "model_hash": "0000000000"}, 404, None),
        ({"prompt": "x", "model_hash": 12}, 422, "model_hash"),
        ([1, 2], 422, "body"),
    ],
)
def test_bad_requests_are_refused_before_the_queue(server, body, status, field):
    queue, store = server.app.app.state.server.queue, server.app.app.state.reports
    before, reports = queue.submitted, len(store.entries)
    answer_status, answer, _ = server.call("POST", "/diffuse/v1/illustrate", body)
    assert answer_status == status, answer
    if field is not None:
        assert answer["field"] == field
    assert queue.submitted == before and len(store.entries) == reports


def test_few_reports_are_kept_and_none_outlives_the_server(tmp_path, monkeypatch):
    real = report_module.illustrate

    def one_figure(*args, **kwargs):
        # The real report, drawn with its first figure only: the bound is about folders, not figures.
        return real(*args, **kwargs, kinds=["components"])

    monkeypatch.setattr(illustrate_routes, "illustrate", one_figure)
    running = Running(settings(tmp_path, limits=LIMITS))
    try:
        store = running.app.app.state.reports
        store.keep = 2
        ids = []
        for seed in range(3):
            status, answer, _ = running.call(
                "POST", "/diffuse/v1/illustrate", {"prompt": "a cat", "steps": 1, "seed": seed}
            )
            assert status == 202, answer
            ids.append(answer["id"])
            assert made(running, answer["id"])["state"] == "done"
        root = store.get(ids[-1]).folder.parent
        assert stat.S_IMODE(os.stat(root).st_mode) == 0o700 and root.parent == Path(tempfile.gettempdir())
        assert sorted(path.name for path in root.iterdir()) == sorted(ids[1:])  # the oldest deleted
        assert running.call("GET", f"/diffuse/v1/illustrate/{ids[0]}")[0] == 404
        assert fetch(running, f"/diffuse/v1/illustrate/{ids[0]}/files/report.json")[0] == 404
        assert fetch(running, f"/diffuse/v1/illustrate/{ids[2]}/files/report.json")[0] == 200
    finally:
        running.stop()
    assert not root.exists()  # the server's reports go with it
