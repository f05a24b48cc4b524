"""Micro-batching: concurrent requests are grouped (up to max_batch) and one batch at a time runs off the event
loop in a worker thread.

Batches also form by themselves: while one batch runs, new requests queue, and the next batch takes all of them
at once. ``max_wait`` > 0 additionally lets a batch linger for batch-mates. Measured on 2 cores (Scientific
bundle, ABBA order, docs/benchmarks.md): lingering 2 ms costs about 2 ms of p50 at 100 req/s, but its slightly
bigger batches cut CPU per request, which at 200-280 req/s kept p99 at 41-90 ms where 0 ms gave 98-805 ms and
once failed to sustain 280 req/s. Hence the adaptive linger (the default): a batch lingers only while the worker
is busy (its busy fraction over recent batches, an exponential average, is at least ``busy_to_linger``), so an
idle service answers at once and a loaded one still forms bigger batches. ``adaptive=False`` always lingers."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

BUSY_TO_LINGER = 0.5  # adaptive linger: linger once the worker is busy at least half of the time
BUSY_DECAY = 0.8  # weight of the previous average per batch (about the last 5 batches count)


class MicroBatcher(Generic[T, R]):
    """``await submit(x)`` -> ``fn([x, ...])[i]``. ``fn`` runs in ``executor`` and returns one result (or an
    Exception instance, raised to that caller alone) per input, in order. ``on_batch(size)`` sees every batch,
    ``on_wait(seconds)`` every request's queue wait (submit -> its batch starts)."""

    def __init__(
        self,
        fn: Callable[[list[T]], Sequence[R | Exception]],
        max_batch: int,
        max_wait_s: float,
        executor: Executor | None = None,
        on_batch: Callable[[int], None] | None = None,
        on_wait: Callable[[float], None] | None = None,
        adaptive: bool = True,
        busy_to_linger: float = BUSY_TO_LINGER,
    ) -> None:
        self.fn, self.max_batch, self.max_wait_s = fn, max_batch, max_wait_s
        self.executor, self.on_batch, self.on_wait = executor, on_batch, on_wait
        self.adaptive, self.busy_to_linger = adaptive, busy_to_linger
        self.busy = 0.0  # exponential average of the worker's busy fraction (batch run time / batch cycle time)
        self.lingered = 0  # batches that lingered (tests)
        self._queue: asyncio.Queue[tuple[T, asyncio.Future[R], float]] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="micro-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        while not self._queue.empty():
            _, fut, _ = self._queue.get_nowait()
            if not fut.done():
                fut.set_exception(RuntimeError("service is shutting down"))

    async def submit(self, item: T) -> R:
        if self._task is None:
            raise RuntimeError("micro-batcher is not running")
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[R] = loop.create_future()
        await self._queue.put((item, fut, loop.time()))
        return await fut

    async def _collect(self) -> tuple[list[tuple[T, asyncio.Future[R], float]], float]:
        """The next batch, and how long it lingered for batch-mates (0.0 when it did not)."""
        batch = [await self._queue.get()]
        while len(batch) < self.max_batch and not self._queue.empty():  # everything queued meanwhile, no waiting
            batch.append(self._queue.get_nowait())
        if self.max_wait_s <= 0 or (self.adaptive and self.busy < self.busy_to_linger):
            return batch, 0.0
        self.lingered += 1
        loop = asyncio.get_running_loop()
        started = loop.time()
        deadline = started + self.max_wait_s
        while len(batch) < self.max_batch:
            if not self._queue.empty():
                batch.append(self._queue.get_nowait())
                continue
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), remaining))
            except TimeoutError:
                break
        return batch, loop.time() - started

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        cycle_start = loop.time()
        while True:
            batch, lingered_s = await self._collect()
            now = loop.time()
            live = [(x, f) for x, f, _ in batch if not f.cancelled()]
            if not live:
                continue
            if self.on_batch:
                self.on_batch(len(live))
            if self.on_wait:
                for _, f, queued in batch:
                    if not f.cancelled():
                        self.on_wait(now - queued)
            try:
                results = await loop.run_in_executor(self.executor, self.fn, [x for x, _ in live])
            except Exception as exc:  # the whole batch failed: every caller gets the error
                log.exception("micro-batch of %d failed", len(live))
                results = [exc] * len(live)
            done = loop.time()
            # busy fraction of this cycle (previous batch's end -> this batch's end, its linger left out): the run
            # over the cycle; lingering must not make a busy worker look idle
            fraction = (done - now) / max(done - cycle_start - lingered_s, 1e-9)
            self.busy = BUSY_DECAY * self.busy + (1 - BUSY_DECAY) * fraction
            cycle_start = done
            for (_, fut), result in zip(live, results, strict=True):
                if fut.done():
                    continue
                if isinstance(result, Exception):
                    fut.set_exception(result)
                else:
                    fut.set_result(result)
