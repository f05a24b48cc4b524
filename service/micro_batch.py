"""Micro-batching: concurrent requests are grouped (up to max_batch) and one batch at a time runs off the event
loop, in the batcher's own worker thread.

The hand-off is one thread-safe queue put (event loop -> worker) and one ``call_soon_threadsafe`` per batch
(worker -> event loop): no collector task, no executor future chain. Batches form by themselves: while one batch
runs, new requests queue, and the worker's next batch takes everything queued at once (up to ``max_batch``).

Lingering (``max_wait`` > 0) lets a batch wait for batch-mates. ``adaptive`` (the default) lingers only when the
measured arrival rate makes a fuller batch likely within the wait: the rate counts only the requests that arrived
while others were still in flight (a lone client, which sends its next request after the answer, never counts, so
it never waits for company), decayed over ``rate_window_s``; a batch lingers when that rate times ``max_wait``
expects at least ``linger_arrivals`` batch-mates. ``adaptive=False`` always lingers.

Overload sheds fast (``max_queue_s``): above capacity the queue would grow without bound and every answer come
later and later. A request that finds the oldest queued one already waiting longer than ``max_queue_s`` is refused
at once (:class:`QueueTimeout`, 503 with Retry-After at the edge), and a queued request whose wait passed it by the
time its batch starts is answered with the same error instead of being computed late: the queue wait of every
request that is computed stays within ``max_queue_s``."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import math
import queue
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

LINGER_ARRIVALS = 1.0  # adaptive linger: linger when at least one batch-mate is expected within the wait
RATE_WINDOW_S = 0.1  # the arrival rate's memory (exponential decay time constant)
_STOP = object()


class QueueTimeout(Exception):
    """Shed: the request would wait (or has waited) longer than the batcher's ``max_queue_s``."""


class MicroBatcher(Generic[T, R]):
    """``await submit(x)`` -> ``fn([x, ...])[i]``. ``fn`` runs in the batcher's worker thread and returns one result
    (or an Exception instance, raised to that caller alone) per input, in order. ``on_batch(size)`` sees every
    batch, ``on_wait(seconds)`` every request's queue wait (submit -> its batch starts); both run in the worker
    thread."""

    def __init__(
        self,
        fn: Callable[[list[T]], Sequence[R | Exception]],
        max_batch: int,
        max_wait_s: float,
        on_batch: Callable[[int], None] | None = None,
        on_wait: Callable[[float], None] | None = None,
        adaptive: bool = True,
        linger_arrivals: float = LINGER_ARRIVALS,
        rate_window_s: float = RATE_WINDOW_S,
        max_queue_s: float | None = None,
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        self.fn, self.max_batch, self.max_wait_s = fn, max_batch, max_wait_s
        self.on_batch, self.on_wait = on_batch, on_wait
        self.adaptive, self.linger_arrivals, self.rate_window_s = adaptive, linger_arrivals, rate_window_s
        self.lingered = 0  # batches that lingered (tests)
        self.max_queue_s = max_queue_s
        self.shed = 0  # requests refused or dropped for their queue wait
        # submit times of what is queued, oldest first (appended on the event loop, popped by the worker; deque
        # appends and pops are atomic)
        self._queued_at: collections.deque[float] = collections.deque()
        self.in_flight = 0  # submitted, not yet answered (event-loop thread only)
        self._rate = 0.0  # overlapping arrivals per second, exponentially decayed (written on the event loop)
        self._rate_at = time.perf_counter()
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # ----- event-loop side ------------------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._loop = asyncio.get_running_loop()
            self._thread = threading.Thread(target=self._work, name="micro-batcher", daemon=True)
            self._thread.start()

    async def stop(self) -> None:
        thread, self._thread = self._thread, None
        if thread is not None:
            self._queue.put(_STOP)
            await asyncio.to_thread(thread.join)
        while True:  # whatever was submitted after the stop marker
            try:
                entry = self._queue.get_nowait()
            except queue.Empty:
                break
            if entry is not _STOP and not entry[1].done():
                entry[1].set_exception(RuntimeError("service is shutting down"))

    def arrival_rate(self, now: float | None = None) -> float:
        """Requests per second that arrived while others were in flight (decayed to ``now``)."""
        now = time.perf_counter() if now is None else now
        return self._rate * math.exp(-(now - self._rate_at) / self.rate_window_s)

    async def submit(self, item: T) -> R:
        if self._thread is None or self._loop is None:
            raise RuntimeError("micro-batcher is not running")
        now = time.perf_counter()
        if self.max_queue_s is not None and (waited := self._oldest_wait(now)) > self.max_queue_s:
            self.shed += 1
            raise QueueTimeout(self._too_long(waited))
        if self.in_flight:  # someone else is waiting: this arrival could have been a batch-mate
            self._rate = self.arrival_rate(now) + 1.0 / self.rate_window_s
            self._rate_at = now
        fut: asyncio.Future[R] = self._loop.create_future()
        self.in_flight += 1
        try:
            self._queued_at.append(now)
            self._queue.put((item, fut, now))
            return await fut
        finally:
            self.in_flight -= 1

    def _oldest_wait(self, now: float) -> float:
        try:
            return now - self._queued_at[0]
        except IndexError:  # nothing queued (or the worker just took it)
            return 0.0

    def _too_long(self, waited: float) -> str:
        return f"overloaded: requests queue for {1000 * waited:.0f} ms, above {1000 * self.max_queue_s:.0f} ms; retry"

    def _resolve(self, futures: list[asyncio.Future[R]], results: Sequence[R | Exception]) -> None:
        for fut, result in zip(futures, results, strict=True):
            if fut.done():
                continue
            if isinstance(result, BaseException):
                fut.set_exception(result)
            else:
                fut.set_result(result)

    # ----- worker side ----------------------------------------------------------------------------------------
    def _should_linger(self) -> bool:
        if self.max_wait_s <= 0:
            return False
        return not self.adaptive or self.arrival_rate() * self.max_wait_s >= self.linger_arrivals

    def _collect(self, first: Any) -> tuple[list[Any], bool]:
        """The batch that starts with ``first``: everything queued meanwhile, then (when lingering) what arrives
        within the wait. Second value: the stop marker was seen."""
        batch, stopping = [first], False
        while len(batch) < self.max_batch:
            try:
                entry = self._queue.get_nowait()
            except queue.Empty:
                break
            if entry is _STOP:
                return batch, True
            batch.append(entry)
        if len(batch) >= self.max_batch or not self._should_linger():
            return batch, stopping
        self.lingered += 1
        deadline = time.perf_counter() + self.max_wait_s
        while len(batch) < self.max_batch:
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                break
            try:
                entry = self._queue.get(timeout=remaining)
            except queue.Empty:
                break
            if entry is _STOP:
                return batch, True
            batch.append(entry)
        return batch, stopping

    def _work(self) -> None:
        loop = self._loop
        assert loop is not None
        stopping = False
        while not stopping:
            first = self._queue.get()
            if first is _STOP:
                break
            batch, stopping = self._collect(first)
            for _ in batch:
                with contextlib.suppress(IndexError):
                    self._queued_at.popleft()
            now = time.perf_counter()
            live = [(x, f, queued) for x, f, queued in batch if not f.done()]  # done: cancelled by its caller
            if self.max_queue_s is not None:  # waited too long already: an answer now would come too late
                late = [(f, now - queued) for _, f, queued in live if now - queued > self.max_queue_s]
                if late:
                    self.shed += len(late)
                    errors = [QueueTimeout(self._too_long(waited)) for _, waited in late]
                    with contextlib.suppress(RuntimeError):
                        loop.call_soon_threadsafe(self._resolve, [f for f, _ in late], errors)
                    live = [(x, f, queued) for x, f, queued in live if now - queued <= self.max_queue_s]
            if not live:
                continue
            try:
                if self.on_batch:
                    self.on_batch(len(live))
                if self.on_wait:
                    for _, _, queued in live:
                        self.on_wait(now - queued)
                results: Sequence[R | Exception] = self.fn([x for x, _, _ in live])
                if len(results) != len(live):
                    raise RuntimeError(f"batch function returned {len(results)} results for {len(live)} inputs")
            except Exception as exc:  # the whole batch failed: every caller gets the error
                log.exception("micro-batch of %d failed", len(live))
                results = [exc] * len(live)
            with contextlib.suppress(RuntimeError):  # the loop closed under us (shutdown)
                loop.call_soon_threadsafe(self._resolve, [f for _, f, _ in live], results)
