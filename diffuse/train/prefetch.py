"""Batches made ahead of time by worker processes, so the training device never waits for data.

make_batch(start, count) is a pure function of the sample indices (loop.py), so a batch
made early by another process is the batch the loop would have made itself: the losses
do not depend on how many workers there are. A GPU trains on samples faster than one
process renders them, so there the rendering runs in parallel; on a CPU the model's own
work already uses every core, so it is better left inline (workers=0).

Workers start by spawning (not forking): the parent may already hold a CUDA context,
which a forked child must never touch. Each worker receives make_batch once, when it
starts, and from then on only (start, count) pairs; the batches come back through
shared memory.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.multiprocessing

BATCHES_AHEAD_PER_WORKER = 2  # enough to hide one slow batch, without holding much memory

_worker_make_batch: Callable[[int, int], Any] | None = None


def _start_worker(make_batch: Callable[[int, int], Any]) -> None:
    global _worker_make_batch
    _worker_make_batch = make_batch
    torch.set_num_threads(1)  # each worker is one of many processes: one core each


def _make_in_worker(start: int, count: int) -> Any:
    assert _worker_make_batch is not None, "the worker was not started with a make_batch"
    return _worker_make_batch(start, count)


def batch_stream(
    make_batch: Callable[[int, int], Any], first_start: int, stride: int, count: int, batches: int, workers: int = 0
) -> Iterator[Any]:
    """make_batch(first_start + k * stride, count) for k = 0 .. batches-1, in order.

    With workers > 0 that many processes make the batches ahead; make_batch must then be
    picklable (a module-level function, or a functools.partial of one). The workers start
    with the first batch asked for and stop when the stream is exhausted or closed. A bad
    worker count is refused here, when the stream is made, before any training starts.
    """
    if workers < 0:
        raise ValueError(f"data workers must be 0 (inline) or more, not {workers}")
    starts = [first_start + k * stride for k in range(batches)]
    if workers == 0:
        return (make_batch(start, count) for start in starts)
    return _made_ahead(make_batch, starts, count, workers)


def _made_ahead(make_batch: Callable[[int, int], Any], starts: list[int], count: int, workers: int) -> Iterator[Any]:
    pool = torch.multiprocessing.get_context("spawn").Pool(workers, initializer=_start_worker, initargs=(make_batch,))
    try:
        pending: deque = deque()
        queued = iter(starts)
        for _ in starts:
            for start in itertools.islice(queued, workers * BATCHES_AHEAD_PER_WORKER - len(pending)):
                pending.append(pool.apply_async(_make_in_worker, (start, count)))
            yield pending.popleft().get()
    finally:
        pool.terminate()
        pool.join()
