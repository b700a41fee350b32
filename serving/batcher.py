"""Dynamic batching: concurrent requests' queries go through one ``generate``.

A bounded queue in front of one generation thread. The loop takes up to ``max_batch_size`` queued queries that
decode the same way (greedy, or the same sampling settings). When fewer are ready than the previous batch had,
it holds the batch open for at most ``max_wait_s`` (after the oldest one arrived or the previous batch ended,
whichever is later): under steady concurrent load the callers just answered send their next queries within a
few milliseconds, and a lone caller (previous batch of one) never waits.
Past ``max_queue`` waiting queries a request is refused with :class:`Overloaded` (HTTP 429 + ``Retry-After``);
a request not answered within ``timeout_s`` gets :class:`Unavailable` (HTTP 503 + ``Retry-After``): its queries
leave the queue at once, and a query already generating is marked ``dead`` so that its row stops. A request's
queries are admitted all together or not at all.

``run_batch(jobs)`` runs on the generation thread. It may answer a job early with ``job.deliver(result)`` (a row
that has ended while the rest of its batch goes on) and returns one result per job at the end; a job's first
answer wins. A query may carry ``on_token(token_id)``, called from the generation thread (streaming).
"""

from __future__ import annotations

import asyncio
import collections
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

from deepmedix.errors import DeepMedixError, InputError
from serving import prometheus


class Overloaded(DeepMedixError):
    """The queue is full: HTTP 429 with Retry-After."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


class Unavailable(DeepMedixError):
    """Timed out, or not ready: HTTP 503 with Retry-After."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


def _settle(fut: asyncio.Future, result) -> None:
    if not fut.done():
        fut.set_result(result)


@dataclass
class Job:
    query: object  # serving.inputs.Query
    on_token: Callable[[int], None] | None = None
    future: asyncio.Future | None = None
    enqueued: float = field(default_factory=time.monotonic)
    dead: threading.Event = field(default_factory=threading.Event)  # its caller is gone (read by the generator)
    loop: asyncio.AbstractEventLoop | None = None

    @property
    def live(self) -> bool:
        return self.future is not None and not self.future.done()

    def deliver(self, result) -> None:
        """From the generation thread: answer this job now."""
        self.loop.call_soon_threadsafe(_settle, self.future, result)


class Batcher:
    def __init__(self, run_batch: Callable[[list[Job]], list], max_batch_size: int = 8, max_wait_s: float = 0.020,
                 max_queue: int = 64, timeout_s: float = 120.0):
        if max_batch_size < 1 or max_queue < 1 or max_wait_s < 0 or timeout_s <= 0:
            raise InputError("max_batch_size and max_queue must be >= 1, max_wait_s >= 0, timeout_s > 0")
        self.run_batch = run_batch
        self.max_batch_size, self.max_wait_s = int(max_batch_size), float(max_wait_s)
        self.max_queue, self.timeout_s = int(max_queue), float(timeout_s)
        self._queue: collections.deque[Job] = collections.deque()
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="generate")
        self._batch_s = 1.0  # running mean of one batch's seconds, for Retry-After
        self._callers = 1  # queries in the last batch + those queued when it ended: what the next one waits for

    # ------------------------------------------------------------------ admission

    def waiting(self) -> int:
        return sum(1 for j in self._queue if j.live)

    def admit(self, n: int) -> None:
        """Refuse at once (429) when ``n`` more queries would overflow the queue; called before a request's
        images are decoded, and again when it is queued."""
        waiting = self.waiting()
        if waiting and waiting + n > self.max_queue:
            prometheus.REJECTED.labels(reason="queue_full").inc()
            raise Overloaded(f"server busy: {waiting} queries waiting (limit {self.max_queue}); retry later",
                             self.retry_after())

    def retry_after(self) -> int:
        batches_ahead = 1 + self.waiting() / self.max_batch_size
        return max(1, math.ceil(batches_ahead * self._batch_s))

    async def submit(self, jobs: list[Job]) -> list:
        """Queue ``jobs`` (one request's queries) and wait for their results, in order."""
        loop = asyncio.get_running_loop()
        if self._task is None or self._task.done():
            self._wakeup = asyncio.Event()
            self._task = loop.create_task(self._loop(), name="deepmedix-batcher")
        self.admit(len(jobs))
        for j in jobs:
            j.loop = loop
            j.future = loop.create_future()
            j.enqueued = time.monotonic()
            self._queue.append(j)
        prometheus.QUEUE.set(self.waiting())
        self._wakeup.set()
        try:
            return await asyncio.wait_for(asyncio.gather(*(j.future for j in jobs)), self.timeout_s)
        except asyncio.TimeoutError:
            prometheus.REJECTED.labels(reason="timeout").inc()
            raise Unavailable(f"no answer within the request timeout of {self.timeout_s:g} s; retry later",
                              self.retry_after()) from None
        finally:
            gone = [j for j in jobs if not j.future.done()]
            for j in gone:  # timed out, or the client went away: out of the queue, and its row stops
                j.future.cancel()
                j.dead.set()
            if gone:
                self._queue = collections.deque(j for j in self._queue if j.live)
            prometheus.QUEUE.set(self.waiting())

    # ------------------------------------------------------------------ the loop

    def _take(self) -> list[Job]:
        while self._queue and not self._queue[0].live:
            self._queue.popleft()
        if not self._queue:
            return []
        key = self._queue[0].query.sampling
        batch, rest = [], collections.deque()
        while self._queue:
            j = self._queue.popleft()
            if not j.live:
                continue
            if len(batch) < self.max_batch_size and j.query.sampling == key:
                batch.append(j)
            else:
                rest.append(j)
        self._queue = rest
        return batch

    def _ready_count(self) -> int:
        if not self._queue:
            return 0
        key = next((j.query.sampling for j in self._queue if j.live), None)
        return sum(1 for j in self._queue if j.live and j.query.sampling == key)

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        free_since = 0.0
        while True:
            while not any(j.live for j in self._queue):
                self._queue.clear()
                self._wakeup.clear()
                await self._wakeup.wait()
            # Hold the batch open (at most max_wait after the oldest query arrived, or after the last batch ended
            # if that is later) until as many queries are ready as there were callers last time: those in the
            # last batch plus those that queued behind it. Under steady load the callers just answered are sending
            # their next queries now; a lone caller never waits.
            oldest = next(j for j in self._queue if j.live)
            deadline = max(oldest.enqueued, free_since) + self.max_wait_s
            target = min(self.max_batch_size, self._callers)
            while self._ready_count() < target and (left := deadline - time.monotonic()) > 0:
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), left)
                except asyncio.TimeoutError:
                    break
            batch = self._take()
            prometheus.QUEUE.set(self.waiting())
            if not batch:
                continue
            prometheus.BATCH_SIZE.observe(len(batch))
            t0 = time.monotonic()
            try:
                results = await loop.run_in_executor(self._executor, self.run_batch, batch)
            except Exception as exc:  # noqa: BLE001 - handed to each waiting request
                for j in batch:
                    if j.live:
                        j.future.set_exception(exc)
            else:
                for j, r in zip(batch, results):
                    if j.live:
                        j.future.set_result(r)
            finally:
                self._callers = len(batch) + self.waiting()
                free_since = time.monotonic()
                dt = free_since - t0
                prometheus.GENERATE_SECONDS.observe(dt)
                self._batch_s = 0.8 * self._batch_s + 0.2 * dt

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)
