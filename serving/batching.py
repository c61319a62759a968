"""Server-side micro-batching: concurrent requests with equal steering share one session run.

The first queued request waits at most `timeout_s` for companions (up to `max_batch` images);
requests with another steering wait for a later run. The queue is bounded: a full queue
raises `Overloaded` at once, so overload costs a fast 503 and never unbounded memory.
Each model instance (`serving.instances`) has its own run thread and runs one batch at a time,
with one more batch waiting on that thread, so it starts its next run without a round trip
through the event loop (7% more images/s with two instances on 2 cores). Batches are formed
when an instance can take one, so under load the queue fills while every instance is busy,
and the next batch leaves full. Per-batch observers run on the event loop right
after the responses are resolved, so they must be cheap (metrics, handing the outputs to a
`serving.drain.BackgroundDrain`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np

from serving.errors import InferenceFailed, Overloaded
from serving.priority import lower_this_thread
from serving.runtime import Steering
from serving.stats import RequestTiming

log = logging.getLogger("elude.serving")

BATCHES_PER_INSTANCE = 2  # the one running and the one waiting behind it on the instance's thread
RunFn = Callable[[np.ndarray, Steering], Mapping[str, np.ndarray]]
# observer(outputs of the whole batch, number of images, seconds the run took, steering)
BatchObserver = Callable[[Mapping[str, np.ndarray], int, float, Steering], None]


@dataclass(eq=False)
class _Job:
    images: np.ndarray
    steering: Steering
    future: asyncio.Future
    timing: RequestTiming | None = None
    enqueued: float = field(default_factory=time.perf_counter)

    @property
    def size(self) -> int:
        return int(self.images.shape[0])


class MicroBatcher:
    """`runs`: one run function per model instance (`ModelRuntime.runners()`), each called on its own thread."""

    def __init__(self, runs: Sequence[RunFn], max_batch: int = 8, timeout_s: float = 0.002, queue_size: int = 64,
                 observers: list[BatchObserver] | None = None, run_nice: int = 0):
        if not runs:
            raise ValueError("MicroBatcher needs at least one run function")
        self._runs = list(runs)
        self.max_batch = max_batch
        self.timeout_s = timeout_s
        self.queue_size = queue_size
        self.observers = list(observers or [])
        self._pending: deque[_Job] = deque()
        self._wakeup: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None
        self._idle: asyncio.Queue[int] | None = None  # one entry per batch an instance can still take
        self._run_threads: list[ThreadPoolExecutor] = []
        self._executing: set[asyncio.Task] = set()
        self.run_nice = run_nice  # the run threads' priority below the loop's (see serving.priority)

    # lifecycle -----------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self._worker is not None and not self._worker.done()

    async def start(self) -> None:
        if self.running:
            return
        self._wakeup = asyncio.Event()
        self._idle = asyncio.Queue()
        self._run_threads = [ThreadPoolExecutor(1, thread_name_prefix=f"elude-run-{k}", initializer=lower_this_thread,
                                                initargs=(self.run_nice,)) for k in range(len(self._runs))]
        for _ in range(BATCHES_PER_INSTANCE):
            for k in range(len(self._runs)):
                self._idle.put_nowait(k)
        self._worker = asyncio.get_running_loop().create_task(self._work(), name="elude-batcher")

    async def stop(self) -> None:
        """Cancel the worker and the batches still running; their requests and the queued ones get 503."""
        tasks = [task for task in (self._worker, *self._executing) if task is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            try:
                await task
            except asyncio.CancelledError:
                pass  # the cancellation we asked for
        while self._pending:
            _shutting_down(self._pending.popleft())
        for thread in self._run_threads:  # a run still going ends on its thread; the loop stays free meanwhile
            await asyncio.to_thread(thread.shutdown, wait=True, cancel_futures=True)
        self._run_threads = []
        self._worker = None

    @property
    def depth(self) -> int:
        return len(self._pending)

    # requests ------------------------------------------------------------------------------
    async def submit(self, images: np.ndarray, steering: Steering, timeout_s: float,
                     timing: RequestTiming | None = None) -> dict[str, np.ndarray]:
        """This request's slice of every output; `Overloaded` if the queue is full or time runs out.

        `timing` (optional) receives the request's queue and run seconds (Triton-style statistics).
        """
        if not self.running or self._wakeup is None:
            raise Overloaded("server is not ready", cause="not_ready")
        if len(self._pending) >= self.queue_size:
            raise Overloaded(f"queue full ({self.queue_size} requests waiting); retry later", cause="queue_full")
        loop = asyncio.get_running_loop()
        job = _Job(images, steering, loop.create_future(), timing)
        self._pending.append(job)
        self._wakeup.set()
        # one timer instead of wait_for(shield(...)): cheaper per request; awaiting the future
        # directly also cancels it when the client goes away, so the worker skips the job
        timer = loop.call_later(timeout_s, self._expire, job, timeout_s)
        try:
            return await job.future
        finally:
            timer.cancel()

    @staticmethod
    def _expire(job: _Job, timeout_s: float) -> None:
        if not job.future.done():  # the worker skips it, or drops its result
            job.future.set_exception(Overloaded(f"request not served within {timeout_s:g}s", cause="timeout"))

    # worker --------------------------------------------------------------------------------
    def _compatible_images(self, key: tuple) -> int:
        return sum(job.size for job in self._pending if job.steering.key == key and not job.future.done())

    def _take_batch(self) -> list[_Job]:
        while self._pending and self._pending[0].future.done():
            self._pending.popleft()  # cancelled or timed out while queued
        if not self._pending:
            return []
        key = self._pending[0].steering.key
        batch: list[_Job] = []
        images = 0
        for job in list(self._pending):
            if job.future.done() or job.steering.key != key:
                continue
            if batch and images + job.size > self.max_batch:
                break
            batch.append(job)
            images += job.size
        for job in batch:
            self._pending.remove(job)
        return batch

    async def _work(self) -> None:
        assert self._wakeup is not None and self._idle is not None
        loop = asyncio.get_running_loop()
        while True:
            while not self._pending:
                self._wakeup.clear()
                await self._wakeup.wait()
            instance = await self._idle.get()
            if not self._pending:  # every queued job was cancelled or expired meanwhile
                self._idle.put_nowait(instance)
                continue
            first = self._pending[0]
            deadline = first.enqueued + self.timeout_s
            while self._compatible_images(first.steering.key) < self.max_batch:
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    break
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), remaining)
                except asyncio.TimeoutError:
                    break
            batch = self._take_batch()
            if not batch:
                self._idle.put_nowait(instance)
                continue
            task = loop.create_task(self._execute(loop, batch, instance), name=f"elude-run-{instance}")
            self._executing.add(task)
            task.add_done_callback(self._executing.discard)

    async def _execute(self, loop: asyncio.AbstractEventLoop, batch: list[_Job], instance: int) -> None:
        assert self._idle is not None
        try:
            await self._run_batch(loop, batch, instance)
        except asyncio.CancelledError:  # shutdown: these requests will not be answered by a run
            for job in batch:
                _shutting_down(job)
            raise
        finally:
            self._idle.put_nowait(instance)

    async def _run_batch(self, loop: asyncio.AbstractEventLoop, batch: list[_Job], instance: int) -> None:
        steering = batch[0].steering
        images = batch[0].images if len(batch) == 1 else np.concatenate([job.images for job in batch])
        try:
            outputs, started, seconds = await loop.run_in_executor(
                self._run_threads[instance], _timed, self._runs[instance], images, steering)
        except Exception as exc:  # a failed run fails its requests, never the worker
            log.exception("inference failed for a batch of %d image(s)", len(images))
            for job in batch:
                if not job.future.done():
                    job.future.set_exception(InferenceFailed(f"inference failed: {exc.__class__.__name__}"))
            return
        offset = 0
        for job in batch:
            if job.timing is not None:
                job.timing.queue, job.timing.compute_infer = started - job.enqueued, seconds
            if not job.future.done():
                job.future.set_result({name: value[offset:offset + job.size] for name, value in outputs.items()})
            offset += job.size
        self._observe(outputs, len(images), seconds, steering)

    def _observe(self, outputs: Mapping[str, np.ndarray], n: int, seconds: float, steering: Steering) -> None:
        for observer in self.observers:
            try:
                observer(outputs, n, seconds, steering)
            except Exception:  # a monitoring bug must not take inference down; it is logged
                log.exception("batch observer %r failed", observer)


def _timed(run: RunFn, images: np.ndarray, steering: Steering) -> tuple[Mapping[str, np.ndarray], float, float]:
    """(outputs, start, seconds) of a run, timed on its thread: a batch waiting behind another is queue time."""
    started = time.perf_counter()
    outputs = run(images, steering)
    return outputs, started, time.perf_counter() - started


def _shutting_down(job: _Job) -> None:
    if not job.future.done():
        job.future.set_exception(Overloaded("server is shutting down", cause="shutdown"))
