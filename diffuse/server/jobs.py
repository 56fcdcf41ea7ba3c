"""The server's job queue: generation requests run one at a time on the model, in arrival order.

A request becomes a Job with an id and joins a bounded queue; one worker thread takes the jobs
in turn and runs each one's work function. The HTTP handlers wait on the job's future, so a
slow generation never blocks the event loop that answers /progress and /interrupt meanwhile.

    submit(kind, work)   queue a job; QueueFull (answered 503) when `capacity` jobs already wait
    current()            the running job, whose step, total and latest preview /progress reports
    interrupt()          ask the running job, and only it, to stop after its current step

A work function gets its Job and calls job.step_done(...) from the pipeline's per-step callback:
that records the progress and raises Interrupted when the job was asked to stop, which ends
the sampling loop; the work function decides what an interrupted job returns.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
import uuid
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable


class QueueFull(Exception):
    """Every place in the queue is taken."""


class Interrupted(Exception):
    """Raised inside a running job's step callback once interrupt() asked it to stop."""


@dataclass
class Job:
    kind: str  # "txt2img", "img2img", ...: what /progress reports as the job's name
    work: Callable[["Job"], Any]
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    number: int = 0  # order of arrival, from 1
    queued_at: float = field(default_factory=time.monotonic)
    started_at: float | None = None
    finished_at: float | None = None
    step: int = 0  # sampling steps done
    total_steps: int = 0
    latest: Any = None  # what the work function last handed to step_done (e.g. the pipeline's Step)
    stop_requested: bool = False
    future: Future = field(default_factory=Future)

    def step_done(self, step: int, total: int, latest: Any = None) -> None:
        """Record that `step` of `total` sampling steps are done; raise Interrupted if asked to stop."""
        self.step, self.total_steps, self.latest = step, total, latest
        if self.stop_requested:
            raise Interrupted

    @property
    def state(self) -> str:
        if self.future.cancelled():
            return "cancelled"
        if self.future.done():
            return "failed" if self.future.exception() is not None else "done"
        return "running" if self.started_at is not None else "queued"

    def eta(self) -> float:
        """Seconds left by the time the steps so far took (0 before the first step is done)."""
        if self.started_at is None or self.step == 0 or self.total_steps == 0:
            return 0.0
        elapsed = time.monotonic() - self.started_at
        return elapsed / self.step * (self.total_steps - self.step)


class JobQueue:
    """Runs jobs one at a time in a worker thread; at most `capacity` wait behind the running one."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"the queue needs room for at least one job, not {capacity}")
        self.capacity = capacity
        self._waiting: queue.Queue[Job | None] = queue.Queue(maxsize=capacity)
        self._current: Job | None = None
        self._lock = threading.Lock()
        self._numbers = itertools.count(1)
        self._worker = threading.Thread(target=self._run, name="diffuse-jobs", daemon=True)
        self._worker.start()

    def submit(self, kind: str, work: Callable[[Job], Any]) -> Job:
        job = Job(kind=kind, work=work)
        with self._lock:
            job.number = next(self._numbers)
            try:
                self._waiting.put_nowait(job)
            except queue.Full:
                raise QueueFull(f"{self.capacity} jobs are already waiting; try again later") from None
        return job

    def current(self) -> Job | None:
        return self._current

    def waiting(self) -> int:
        return self._waiting.qsize()

    def interrupt(self) -> Job | None:
        """Ask the running job to stop after its current step; returns it, or None when idle."""
        with self._lock:
            job = self._current
            if job is not None:
                job.stop_requested = True
        return job

    def close(self) -> None:
        """Let the worker finish the running job and leave (jobs still waiting are cancelled)."""
        while True:
            try:
                job = self._waiting.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.future.cancel()
        self._waiting.put(None)
        self._worker.join(timeout=60)

    def _run(self) -> None:
        while (job := self._waiting.get()) is not None:
            if not job.future.set_running_or_notify_cancel():
                continue
            with self._lock:
                self._current = job
            job.started_at = time.monotonic()
            result, failure = None, None
            try:
                result = job.work(job)
            except BaseException as error:  # the job's failure is its caller's to report, not the worker's end
                failure = error
            job.finished_at = time.monotonic()
            # The queue is idle before anyone hears the job ended: a client that asks for
            # /progress right after its answer must not see its own job still running.
            with self._lock:
                self._current = None
            if failure is not None:
                job.future.set_exception(failure)
            else:
                job.future.set_result(result)
