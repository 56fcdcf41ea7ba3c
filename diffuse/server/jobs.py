"""The server's job queue: generation requests run one at a time on the model, in arrival order.

A request becomes a Job with an id and joins a bounded queue; one worker thread takes the jobs
in turn and runs each one's work function. The HTTP handlers wait on the job's future, so a
slow generation never blocks the event loop that answers /progress and /interrupt meanwhile.

    submit(kind, work)   queue a job; QueueFull (answered 503) when `capacity` jobs already wait
    current()            the running job, whose step, total and latest preview /progress reports
    interrupt()          ask the running job, and only it, to stop after its current step: its
                         work function returns what it had (A1111's interrupt)
    cancel(job)          the job is not wanted any more (its client went away): a waiting job
                         leaves the queue at once and frees its place; a running one stops
                         after its current step and returns nothing (its future raises Cancelled)

A work function gets its Job and calls job.step_done(...) from the pipeline's per-step callback:
that records the progress and raises Interrupted or Cancelled when the job was asked to stop,
which ends the sampling loop; the work function decides what an interrupted job returns, and
lets Cancelled through. A finished job drops its work function and latest step, so the jobs
kept for their results (the page's) hold no request images or latents.
"""

from __future__ import annotations

import collections
import itertools
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any


class QueueFull(Exception):
    """Every place in the queue is taken."""


class Interrupted(Exception):
    """Raised inside a running job's step callback once interrupt() asked it to stop."""


class Cancelled(Exception):
    """Raised inside a running job's step callback once cancel() asked it to stop: nothing is returned."""


@dataclass
class Job:
    kind: str  # "txt2img", "img2img", ...: what /progress reports as the job's name
    work: Callable[[Job], Any] | None
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    number: int = 0  # order of arrival, from 1
    queued_at: float = field(default_factory=time.monotonic)
    started_at: float | None = None
    finished_at: float | None = None
    step: int = 0  # sampling steps done
    total_steps: int = 0
    latest: Any = None  # what the work function last handed to step_done (e.g. the pipeline's Step)
    stop_requested: bool = False
    cancel_requested: bool = False
    future: Future = field(default_factory=Future)

    def step_done(self, step: int, total: int, latest: Any = None) -> None:
        """Record that `step` of `total` sampling steps are done; raise Cancelled or Interrupted if asked to stop."""
        self.step, self.total_steps, self.latest = step, total, latest
        if self.cancel_requested:
            raise Cancelled
        if self.stop_requested:
            raise Interrupted

    @property
    def state(self) -> str:
        if self.future.cancelled():
            return "cancelled"
        if self.future.done():
            if isinstance(self.future.exception(), Cancelled):
                return "cancelled"
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
        self.submitted = 0  # jobs ever taken into the queue
        self._waiting: collections.deque[Job] = collections.deque()
        self._current: Job | None = None
        self._closed = False
        self._changed = threading.Condition()
        self._numbers = itertools.count(1)
        self._worker = threading.Thread(target=self._run, name="diffuse-jobs", daemon=True)
        self._worker.start()

    def submit(self, kind: str, work: Callable[[Job], Any]) -> Job:
        job = Job(kind=kind, work=work)
        with self._changed:
            if self._closed:
                raise QueueFull("the server is stopping; no more jobs are taken")
            if len(self._waiting) >= self.capacity:
                raise QueueFull(f"{self.capacity} jobs are already waiting; try again later")
            job.number = next(self._numbers)
            self.submitted += 1
            self._waiting.append(job)
            self._changed.notify()
        return job

    def current(self) -> Job | None:
        return self._current

    def waiting(self) -> int:
        return len(self._waiting)

    def position(self, job: Job) -> int | None:
        """How many jobs run before `job` (the running one included); None once it started or left."""
        with self._changed:
            if job not in self._waiting:
                return None
            return self._waiting.index(job) + (self._current is not None)

    def interrupt(self) -> Job | None:
        """Ask the running job to stop after its current step; returns it, or None when idle."""
        with self._changed:
            job = self._current
            if job is not None:
                job.stop_requested = True
        return job

    def cancel(self, job: Job) -> str:
        """Withdraw `job`: "dropped" (it was waiting: gone, its place free), "stopping" (it runs and
        will stop after its current step, returning nothing) or "ended" (it had finished)."""
        with self._changed:
            if job in self._waiting:
                self._waiting.remove(job)
                job.work = None
                job.future.cancel()
                return "dropped"
            if self._current is job:
                job.cancel_requested = True
                return "stopping"
        return "ended"

    def close(self) -> None:
        """Let the worker finish the running job and leave (jobs still waiting are cancelled)."""
        with self._changed:
            self._closed = True
            for job in self._waiting:
                job.work = None
                job.future.cancel()
            self._waiting.clear()
            self._changed.notify_all()
        self._worker.join(timeout=60)

    def _next(self) -> Job | None:
        """The next job to run, marked running (None: the queue is closed)."""
        with self._changed:
            while True:
                while not self._waiting and not self._closed:
                    self._changed.wait()
                if not self._waiting:
                    return None
                job = self._waiting.popleft()
                if job.future.set_running_or_notify_cancel():
                    self._current = job
                    return job

    def _run(self) -> None:
        while (job := self._next()) is not None:
            job.started_at = time.monotonic()
            result, failure = None, None
            try:
                result = job.work(job)
            except BaseException as error:  # the job's failure is its caller's to report, not the worker's end
                failure = error
            job.finished_at = time.monotonic()
            job.work, job.latest = None, None  # the request's images and latents go with them
            # The queue is idle before anyone hears the job ended: a client that asks for
            # /progress right after its answer must not see its own job still running.
            with self._changed:
                self._current = None
            if failure is not None:
                job.future.set_exception(failure)
            else:
                job.future.set_result(result)
