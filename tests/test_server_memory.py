"""Bounded memory: unknown keys are dropped and not echoed, and concurrent large bodies, and the
images queued jobs hold, stay within the server's request memory budget (503 beyond it)."""

from __future__ import annotations

import json
import select
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from PIL import Image
from test_server import QUICK, Running, png_data_url, settings

from diffuse.server.guard import MemoryBudget

REPOSITORY = Path(__file__).resolve().parent.parent
MB = 2**20


def send_head_then_body(port: int, path: str, body: bytes, barrier: threading.Barrier) -> tuple[int, bytes]:
    """POST `body` the careful way: the headers first; the body only if the server did not answer
    them at once (a refusal before the body is read), after every client has sent its headers."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    sock.sendall(
        (
            f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        ).encode()
    )
    barrier.wait()
    answered, _, _ = select.select([sock], [], [], 1.0)
    if not answered:
        sock.sendall(body)
    data = b""
    while chunk := sock.recv(1 << 20):
        data += chunk
    sock.close()
    head, _, payload = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), payload


def peak_resident_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError("no VmHWM in /proc")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the server's peak memory from /proc")
def test_ten_bodies_of_30_mb_at_once_stay_within_the_budget(tmp_path):
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "diffuse.cli",
            "serve",
            "--port",
            str(port),
            "--dtype",
            "float32",
            "--request-memory",
            "64",
            "--outputs",
            str(tmp_path),
        ],
        cwd=REPOSITORY,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(base + "/sdapi/v1/options", timeout=1).read()
                break
            except OSError:
                assert time.monotonic() < deadline and server.poll() is None, "the server did not start"
                time.sleep(0.2)
        warm = urllib.request.Request(
            base + "/sdapi/v1/txt2img",
            data=json.dumps({**QUICK, "steps": 1}).encode(),
            headers={"Content-Type": "application/json"},
        )
        urllib.request.urlopen(warm, timeout=60).read()
        try:
            Path(f"/proc/{server.pid}/clear_refs").write_text("5")  # the peak starts again from now
        except OSError:
            pass  # then the peak so far (the model's load) stands; it only makes the check looser
        before = peak_resident_kb(server.pid)
        body = json.dumps({**QUICK, "steps": 1, "seed": 1, "junk": "a" * (30 * MB)}).encode()
        barrier = threading.Barrier(10)
        answers = []
        threads = [
            threading.Thread(
                target=lambda: answers.append(send_head_then_body(port, "/sdapi/v1/txt2img", body, barrier))
            )
            for _ in range(10)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        growth_mb = (peak_resident_kb(server.pid) - before) / 1024
    finally:
        server.terminate()
        server.wait(timeout=30)
    statuses = sorted(status for status, _ in answers)
    assert statuses == [200] * 2 + [503] * 8, statuses  # 64 MB holds two 30 MB bodies at a time
    for status, payload in answers:
        answer = json.loads(payload)
        if status == 503:
            assert "--request-memory" in answer["detail"]
        else:
            assert "junk" not in answer["parameters"] and len(payload) < 100_000
    # Measured: ~140 MB with the budget, ~450 MB with all ten admitted (and 1.2 GB when
    # every body was kept until its job ran).
    assert growth_mb < 250, f"the server's peak memory grew by {growth_mb:.0f} MB"


@pytest.fixture
def small(tmp_path):
    running = Running(settings(tmp_path, max_body_bytes=2 * MB, request_memory_bytes=2 * MB))
    yield running
    running.stop()


def test_a_body_without_a_length_is_counted_as_it_comes(small):
    port = int(small.base.rsplit(":", 1)[1])
    budget = small.app.budget
    head = (
        f"POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
        "Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    ).encode()
    first = socket.create_connection(("127.0.0.1", port), timeout=30)
    first.sendall(head)
    opening = b'{"prompt": "' + b"a" * (1536 * 1024)
    first.sendall(b"%x\r\n%s\r\n" % (len(opening), opening))
    deadline = time.monotonic() + 10
    while budget.used < len(opening):
        assert time.monotonic() < deadline, "the first body was not counted"
        time.sleep(0.02)
    second = socket.create_connection(("127.0.0.1", port), timeout=30)
    second.sendall(head + b"%x\r\n%s\r\n0\r\n\r\n" % (MB, b" " * MB))
    assert second.recv(100).startswith(b"HTTP/1.1 503")
    second.close()
    rest = b'", "steps": 1}'
    first.sendall(b"%x\r\n%s\r\n0\r\n\r\n" % (len(rest), rest))
    answer = first.recv(100)
    first.close()
    assert answer.startswith(b"HTTP/1.1 422")  # read in full and checked (the prompt is over 10 000 characters)
    assert budget.used == 0


def test_images_held_by_queued_jobs_count(small):
    big = Image.new("RGB", (1024, 1024))  # 4 MB decoded, a few kB as a PNG
    status, body, headers = small.call(
        "POST",
        "/sdapi/v1/img2img",
        {**QUICK, "steps": 2, "width": 64, "height": 64, "denoising_strength": 0.5, "init_images": [png_data_url(big)]},
    )
    assert status == 503 and "images" in body["detail"] and headers.get("retry-after"), body
    fits = Image.new("RGB", (512, 512))  # 1 MB decoded
    status, body, _ = small.call(
        "POST",
        "/sdapi/v1/img2img",
        {
            **QUICK,
            "steps": 2,
            "width": 64,
            "height": 64,
            "denoising_strength": 0.5,
            "init_images": [png_data_url(fits)],
        },
    )
    assert status == 200, body
    assert small.app.budget.used == 0  # given back when the job ended
    assert set(body["parameters"]) >= {"prompt", "steps", "seed", "denoising_strength"}
    assert "init_images" not in body["parameters"]


def test_a_budget_is_given_back_once():
    budget = MemoryBudget(100)
    held = budget.reserve(60)
    assert budget.reserve(50) is None and held.grow(40) and not held.grow(1)
    held.release()
    held.release()
    assert budget.used == 0 and budget.reserve(100) is not None
