"""The batching scheduler: requests wait in a bounded queue; one worker thread runs them in batches.

Requests whose work has the same key (operation, VAE, precision, tiling, input shape) that arrive within a short
window are stacked into one forward pass; different keys (other sizes, other VAEs) form separate groups, run in
the order their first request arrived. The event loop only enqueues and awaits: all tensor work happens on the
worker thread.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

from vaekit.errors import VaekitError

GroupRunner = Callable[[Hashable, Sequence[Any]], Sequence[Any]]


class QueueFullError(VaekitError):
    """The queue is full; the client should retry after ``retry_after`` seconds."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class RequestTimeoutError(VaekitError):
    """A request waited or ran longer than the per-request timeout."""


@dataclass
class _Job:
    key: Hashable
    item: Any
    future: asyncio.Future[Any]
    loop: asyncio.AbstractEventLoop
    enqueued: float = field(default_factory=time.monotonic)


@dataclass
class SchedulerStats:
    """Counters for /health and the benchmark."""

    submitted: int = 0
    completed: int = 0
    failed: int = 0
    rejected: int = 0
    timed_out: int = 0
    batches: int = 0
    largest_batch: int = 0
    seconds_per_item: float = 0.0  # moving average, for Retry-After


def _deliver(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.done():  # timed out or cancelled meanwhile
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


class BatchScheduler:
    """A bounded queue and one worker thread that runs same-key requests together."""

    def __init__(
        self,
        run_group: GroupRunner,
        max_queue: int = 64,
        window_s: float = 0.01,
        max_batch: int = 8,
        timeout_s: float = 120.0,
    ) -> None:
        self.run_group = run_group
        self.max_queue = max_queue
        self.window_s = window_s
        self.max_batch = max_batch
        self.timeout_s = timeout_s
        self.stats = SchedulerStats()
        self._queue: deque[_Job] = deque()
        self._cond = threading.Condition()
        self._running = False
        self._thread: threading.Thread | None = None

    # --- lifecycle ---------------------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the worker thread."""
        with self._cond:
            if self._running:
                return
            self._running = True
        self._thread = threading.Thread(target=self._work, name="vaekit-worker", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the worker after the batch in progress; waiting requests fail with a clear error."""
        with self._cond:
            self._running = False
            pending = list(self._queue)
            self._queue.clear()
            self._cond.notify_all()
        for job in pending:
            job.loop.call_soon_threadsafe(_deliver, job.future, None, VaekitError("the server is shutting down"))
        if self._thread is not None:
            self._thread.join(timeout=30)

    @property
    def queued(self) -> int:
        """Requests waiting for the worker."""
        return len(self._queue)

    # --- the event loop's side ---------------------------------------------------------------------------------
    async def submit(self, key: Hashable, item: Any) -> Any:
        """Queue one item of work and wait for its result (raises QueueFullError, RequestTimeoutError)."""
        loop = asyncio.get_running_loop()
        job = _Job(key, item, loop.create_future(), loop)
        with self._cond:
            if not self._running:
                raise VaekitError("the server is not running its worker")
            if len(self._queue) >= self.max_queue:
                self.stats.rejected += 1
                wait = len(self._queue) * max(self.stats.seconds_per_item, 0.05)
                raise QueueFullError(
                    f"the server is busy ({len(self._queue)} requests queued); retry later", max(1, math.ceil(wait))
                )
            self._queue.append(job)
            self.stats.submitted += 1
            self._cond.notify()
        try:
            return await asyncio.wait_for(job.future, self.timeout_s)
        except TimeoutError:
            self.stats.timed_out += 1
            raise RequestTimeoutError(f"the request took longer than the timeout of {self.timeout_s:g} s") from None

    async def submit_many(self, key: Hashable, items: Sequence[Any]) -> list[Any]:
        """Queue several items under one key (they may share a batch) and wait for all."""
        return list(await asyncio.gather(*(self.submit(key, item) for item in items)))

    # --- the worker's side -------------------------------------------------------------------------------------
    def _take_batch(self) -> list[_Job] | None:
        with self._cond:
            while self._running and not self._queue:
                self._cond.wait()
            if not self._running:
                return None
            first = self._queue[0]
            deadline = first.enqueued + self.window_s
            while self._running:
                same = sum(1 for j in self._queue if j.key == first.key)
                remaining = deadline - time.monotonic()
                if same >= self.max_batch or remaining <= 0:
                    break
                self._cond.wait(remaining)
            batch = [j for j in self._queue if j.key == first.key][: self.max_batch]
            for job in batch:
                self._queue.remove(job)
            return batch

    def _work(self) -> None:
        while True:
            batch = self._take_batch()
            if batch is None:
                return
            live = [j for j in batch if not j.future.done()]  # skip requests that timed out while queued
            if live:
                self._run(live)

    def _run(self, jobs: list[_Job]) -> None:
        start = time.monotonic()
        try:
            results = list(self.run_group(jobs[0].key, [j.item for j in jobs]))
            if len(results) != len(jobs):
                raise VaekitError(f"internal error: {len(results)} results for {len(jobs)} requests")
            outcomes: list[tuple[Any, BaseException | None]] = [(r, None) for r in results]
        except Exception as e:
            if len(jobs) > 1:
                # One failing item must not fail the others: run each alone so the error lands where it belongs.
                for job in jobs:
                    self._run([job])
                return
            outcomes = [(None, e)] * len(jobs)
        elapsed = time.monotonic() - start
        with self._cond:
            st = self.stats
            st.batches += 1
            st.largest_batch = max(st.largest_batch, len(jobs))
            per_item = elapsed / len(jobs)
            st.seconds_per_item = per_item if st.seconds_per_item == 0 else 0.8 * st.seconds_per_item + 0.2 * per_item
            for _, error in outcomes:
                if error is None:
                    st.completed += 1
                else:
                    st.failed += 1
        for job, (result, error) in zip(jobs, outcomes, strict=True):
            job.loop.call_soon_threadsafe(_deliver, job.future, result, error)
