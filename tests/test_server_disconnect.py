"""A client that goes away takes its job with it: waiting, the job leaves the queue and frees its
place; running, it stops at its next step and nothing comes of it; the queue moves on. Over real
HTTP (sockets closed by hand), then the queue's own cancel path without a model."""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest
from test_server import QUICK, Running, settings

from diffuse.server.a1111 import Limits
from diffuse.server.jobs import Cancelled, Interrupted, JobQueue, QueueFull


def post_and_leave_open(base: str, path: str, body: dict) -> socket.socket:
    """Send a whole JSON POST and return the socket without reading the answer."""
    port = int(base.rsplit(":", 1)[1])
    data = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(
        (
            f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\n\r\n"
        ).encode()
        + data
    )
    return sock


def read_body(sock: socket.socket) -> bytes:
    """The body of the answer on `sock`: the headers and the body may arrive in separate segments."""
    answer = b""
    while b"\r\n\r\n" not in answer:
        answer += (chunk := sock.recv(4096))
        assert chunk, "the server closed the connection before its answer"
    head, _, body = answer.partition(b"\r\n\r\n")
    length = int(
        next(line.split(b":", 1)[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:"))
    )
    while len(body) < length:
        body += (chunk := sock.recv(4096))
        assert chunk, "the server closed the connection in the middle of its answer"
    return body


def wait_for(condition, what: str, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


@pytest.fixture
def running(tmp_path):
    server = Running(settings(tmp_path, queue_capacity=1, limits=Limits(max_steps=1000)))
    yield server
    server.stop()


def test_a_client_that_leaves_takes_its_job_with_it(running):
    queue = running.app.app.state.server.queue
    jobs = []
    submit = queue.submit
    queue.submit = lambda kind, work: jobs.append(submit(kind, work)) or jobs[-1]
    first = post_and_leave_open(running.base, "/sdapi/v1/txt2img", {**QUICK, "steps": 1000, "seed": 1})
    wait_for(lambda: queue.current() is not None and queue.current().step >= 2, "the first job did not start")
    second = post_and_leave_open(running.base, "/sdapi/v1/txt2img", {**QUICK, "steps": 4, "seed": 2})
    wait_for(lambda: queue.waiting() == 1, "the second job was not queued")
    status, body, _ = running.call("POST", "/sdapi/v1/txt2img", QUICK)
    assert status == 503  # one place in the queue, taken
    second.close()
    wait_for(lambda: queue.waiting() == 0, "the second job kept its place after its client left")
    assert jobs[1].state == "cancelled" and jobs[1].started_at is None
    third = post_and_leave_open(running.base, "/sdapi/v1/txt2img", {**QUICK, "steps": 4, "seed": 3})
    wait_for(lambda: queue.waiting() == 1, "the freed place was not taken")  # the place is free again
    third.close()
    wait_for(lambda: queue.waiting() == 0, "the third job kept its place")
    running_job = jobs[0]
    assert running_job.state == "running"
    first.close()
    wait_for(running_job.future.done, "the running job did not stop when its client left")
    assert isinstance(running_job.future.exception(), Cancelled) and running_job.step < 1000
    # The queue moves on, the next answer is whole, and nothing is left over.
    status, body, _ = running.call("POST", "/sdapi/v1/txt2img", {**QUICK, "steps": 2, "seed": 4})
    assert status == 200 and json.loads(body["info"])["interrupted"] is False
    assert [job.state for job in jobs] == ["cancelled", "cancelled", "cancelled", "done"]
    assert running.app.budget.used == 0


def test_a_page_job_runs_on_without_its_submitter(running):
    server = running.app.app.state.server
    leaving = post_and_leave_open(running.base, "/diffuse/v1/jobs", {**QUICK, "steps": 3, "seed": 8})
    job_id = json.loads(read_body(leaving))["id"]
    leaving.close()
    job = server.jobs[job_id]
    wait_for(job.future.done, "the page's job did not finish")
    assert job.state == "done" and len(list(server.settings.outputs.glob("*-8.png"))) == 1


# ---- the queue itself ---------------------------------------------------------------------------


def stepping(started: threading.Event, steps: int = 10_000):
    def work(job):
        started.set()
        for step in range(1, steps + 1):
            job.step_done(step, steps)
            time.sleep(0.001)
        return "finished"

    return work


@pytest.mark.parametrize("stop, expected", [("interrupt", Interrupted), ("cancel", Cancelled)])
def test_cancel_is_not_interrupt(stop, expected):
    queue = JobQueue(1)
    try:
        started = threading.Event()
        job = queue.submit("test", stepping(started))
        assert started.wait(10)
        if stop == "interrupt":
            assert queue.interrupt() is job
        else:
            assert queue.cancel(job) == "stopping"
        with pytest.raises(expected):
            job.future.result(timeout=10)
        assert job.state == ("cancelled" if stop == "cancel" else "failed") and job.work is None
        assert queue.cancel(job) == "ended"
    finally:
        queue.close()


def test_cancelling_a_waiting_job_frees_its_place():
    queue = JobQueue(1)
    try:
        started = threading.Event()
        running = queue.submit("test", stepping(started))
        assert started.wait(10)
        waiting = queue.submit("test", stepping(threading.Event()))
        assert queue.position(waiting) == 1 and queue.position(running) is None
        with pytest.raises(QueueFull):
            queue.submit("test", stepping(threading.Event()))
        assert queue.cancel(waiting) == "dropped" and waiting.future.cancelled() and waiting.work is None
        replacement = queue.submit("test", stepping(threading.Event(), steps=1))
        queue.interrupt()
        assert replacement.future.result(timeout=10) == "finished" and waiting.started_at is None
    finally:
        queue.close()
