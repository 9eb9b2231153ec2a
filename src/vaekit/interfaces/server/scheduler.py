"""The batching scheduler: requests wait in a bounded queue; one worker thread runs them in batches.

Requests whose work has the same key (operation, VAE, precision, tiling, input shape) that arrive within a short
window are stacked into one forward pass; different keys (other sizes, other VAEs) form separate groups, run in
the order their first request arrived. The event loop only enqueues and awaits: all tensor work happens on the
worker thread.

A request that times out or whose client goes away is abandoned: a queued job leaves the queue, and a running batch
whose every request is gone stops at the next module the model calls (a process-wide forward pre-hook checks the
worker's current batch), so a hostile or impatient client cannot keep the only worker busy.
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

import torch

from vaekit.errors import VaekitError

GroupRunner = Callable[[Hashable, Sequence[Any]], Sequence[Any]]
_worker = threading.local()  # the running batch's "stop now" event, on the worker thread only


class JobCancelled(BaseException):  # noqa: N818 - a BaseException so that no `except Exception` retry swallows it
    """Raised inside the model's forward pass when every request of the running batch has been abandoned."""


def _check_cancelled(module: torch.nn.Module, args: Any) -> None:
    """Global forward pre-hook: stop the worker's batch when nobody waits for it any more."""
    stop = getattr(_worker, "stop", None)  # one attribute read per module call on other threads: cheap
    if stop is not None and stop.is_set():
        raise JobCancelled


class QueueFullError(VaekitError):
    """The queue is full; the client should retry after ``retry_after`` seconds."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class RequestTimeoutError(VaekitError):
    """A request waited or ran longer than the per-request timeout."""


class ShuttingDownError(VaekitError):
    """The server is stopping: work in progress or queued is dropped (503)."""


@dataclass(eq=False)
class _Job:
    key: Hashable
    item: Any
    future: asyncio.Future[Any]
    loop: asyncio.AbstractEventLoop
    admitted: bool = False  # continues a request admitted earlier (a stream's frames): not counted against max_queue
    enqueued: float = field(default_factory=time.monotonic)
    abandoned: threading.Event = field(default_factory=threading.Event)


@dataclass
class SchedulerStats:
    """Counters for /health and the benchmark."""

    submitted: int = 0
    completed: int = 0
    failed: int = 0
    rejected: int = 0
    timed_out: int = 0
    cancelled: int = 0  # abandoned (timed out or the client went away) before their work finished
    stopped_batches: int = 0  # running batches stopped part-way because every request of theirs was abandoned
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
        self._hook: Any = None
        self._running_jobs: list[_Job] = []  # the batch on the worker now
        self._stop_batch = threading.Event()  # set when nobody waits for that batch any more, or at shutdown

    # --- lifecycle ---------------------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the worker thread."""
        with self._cond:
            if self._running:
                return
            self._running = True
        self._hook = torch.nn.modules.module.register_module_forward_pre_hook(_check_cancelled)
        self._thread = threading.Thread(target=self._work, name="vaekit-worker", daemon=True)
        self._thread.start()

    def stop(self, wait: bool = True) -> None:
        """Stop the worker (a running batch stops at its next module call); waiting requests fail with a clear
        error. ``wait``: join the worker thread."""
        with self._cond:
            self._running = False
            self._stop_batch.set()
            pending = list(self._queue)
            self._queue.clear()
            self._cond.notify_all()
        for job in pending:
            job.loop.call_soon_threadsafe(_deliver, job.future, None, ShuttingDownError("the server is shutting down"))
        if not wait:
            return
        if self._thread is not None:
            self._thread.join(timeout=30)
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    @property
    def queued(self) -> int:
        """Requests waiting for the worker."""
        return len(self._queue)

    # --- the event loop's side ---------------------------------------------------------------------------------
    def check_room(self) -> None:
        """Raise QueueFullError when a new request would find the queue full (admission before any work)."""
        with self._cond:
            fresh = sum(1 for j in self._queue if not j.admitted)
            if fresh >= self.max_queue:
                self.stats.rejected += 1
                wait = len(self._queue) * max(self.stats.seconds_per_item, 0.05)
                raise QueueFullError(
                    f"the server is busy ({fresh} requests queued); retry later", max(1, math.ceil(wait))
                )

    async def submit(self, key: Hashable, item: Any, admitted: bool = False) -> Any:
        """Queue one item of work and wait for its result (raises QueueFullError, RequestTimeoutError).

        ``admitted``: the item continues a request that already passed admission (a stream's next frames); it is
        queued even when the queue is full and does not count against ``max_queue``, so a stream that got its 200
        is never refused half-way and streams (each with a bounded window of frames) cannot fill the queue.
        Cancelling the waiting task abandons the job: it leaves the queue, or its batch stops if nobody else waits.
        """
        loop = asyncio.get_running_loop()
        job = _Job(key, item, loop.create_future(), loop, admitted)
        with self._cond:
            if not self._running:
                raise VaekitError("the server is not running its worker")
            if not admitted:
                self.check_room()
            self._queue.append(job)
            self.stats.submitted += 1
            self._cond.notify()
        try:
            return await asyncio.wait_for(job.future, self.timeout_s)
        except TimeoutError:
            self.stats.timed_out += 1
            raise RequestTimeoutError(f"the request took longer than the timeout of {self.timeout_s:g} s") from None
        finally:
            if job.future.cancelled() or not job.future.done():
                self._abandon(job)

    def _abandon(self, job: _Job) -> None:
        with self._cond:
            if job.abandoned.is_set():
                return
            job.abandoned.set()
            self.stats.cancelled += 1
            if job in self._running_jobs and all(j.abandoned.is_set() for j in self._running_jobs):
                self._stop_batch.set()
            try:
                self._queue.remove(job)
            except ValueError:  # already taken by the worker: its batch checks ``abandoned``
                pass

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
            live = [j for j in batch if not j.abandoned.is_set()]  # skip requests abandoned while queued
            if live:
                self._run(live)

    def _run(self, jobs: list[_Job]) -> None:
        start = time.monotonic()
        with self._cond:
            self._running_jobs = jobs
            if not self._running or all(j.abandoned.is_set() for j in jobs):
                self._stop_batch.set()
            else:
                self._stop_batch.clear()
        _worker.stop = self._stop_batch
        try:
            results = list(self.run_group(jobs[0].key, [j.item for j in jobs]))
            if len(results) != len(jobs):
                raise VaekitError(f"internal error: {len(results)} results for {len(jobs)} requests")
            outcomes: list[tuple[Any, BaseException | None]] = [(r, None) for r in results]
        except JobCancelled:
            with self._cond:
                self.stats.stopped_batches += 1
            error = None if self._running else ShuttingDownError("the server is shutting down")
            for job in jobs:
                job.loop.call_soon_threadsafe(_deliver, job.future, None, error or RequestTimeoutError("abandoned"))
            return
        except Exception as e:
            if len(jobs) > 1:
                # One failing item must not fail the others: run each alone so the error lands where it belongs.
                for job in jobs:
                    if not job.abandoned.is_set():
                        self._run([job])
                return
            outcomes = [(None, e)] * len(jobs)
        finally:
            _worker.stop = None
            with self._cond:
                self._running_jobs = []
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
