"""The micro-batcher: batches form from what queued while the previous batch ran; optional lingering; errors."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from service.micro_batch import MicroBatcher


class Recorder:
    """fn for the batcher: records each batch, doubles the inputs, fails on negative ones; can be held."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.hold = threading.Event()
        self.hold.set()
        self.entered = threading.Event()

    def __call__(self, xs: list[int]) -> list[int | Exception]:
        self.entered.set()
        self.hold.wait(10)
        self.batches.append(list(xs))
        return [ValueError(f"bad {x}") if x < 0 else 2 * x for x in xs]


async def _with_batcher(rec: Recorder, max_batch: int, max_wait_s: float, body, adaptive: bool = False):
    pool = ThreadPoolExecutor(1)
    sizes: list[int] = []
    batcher = MicroBatcher(rec, max_batch, max_wait_s, pool, on_batch=sizes.append, adaptive=adaptive)
    batcher.start()
    try:
        return await body(batcher), sizes
    finally:
        await batcher.stop()
        pool.shutdown()


def test_requests_queued_during_a_batch_form_the_next_batch_without_waiting():
    rec = Recorder()

    async def body(batcher):
        rec.hold.clear()
        first = asyncio.ensure_future(batcher.submit(1))
        await asyncio.to_thread(rec.entered.wait, 10)  # batch [1] is running and held
        rest = [asyncio.ensure_future(batcher.submit(x)) for x in range(2, 12)]
        await asyncio.sleep(0.05)  # all ten are queued behind the running batch
        rec.hold.set()
        return await first, await asyncio.gather(*rest)

    (one, rest), sizes = asyncio.run(_with_batcher(rec, 64, 0.0, body))
    assert one == 2 and rest == [2 * x for x in range(2, 12)]
    assert rec.batches == [[1], list(range(2, 12))] and sizes == [1, 10]


def test_a_lone_request_runs_alone_and_max_batch_caps_batches():
    rec = Recorder()

    async def body(batcher):
        alone = await batcher.submit(5)
        rec.hold.clear()
        first = asyncio.ensure_future(batcher.submit(0))
        await asyncio.to_thread(rec.entered.wait, 10)
        rest = [asyncio.ensure_future(batcher.submit(x)) for x in range(1, 11)]
        await asyncio.sleep(0.05)
        rec.hold.set()
        await first
        return alone, await asyncio.gather(*rest)

    (alone, rest), sizes = asyncio.run(_with_batcher(rec, 4, 0.0, body))
    assert alone == 10 and rest == [2 * x for x in range(1, 11)]
    assert sizes == [1, 1, 4, 4, 2]


def test_lingering_collects_batch_mates_that_arrive_within_the_wait():
    rec = Recorder()

    async def body(batcher):
        first = asyncio.ensure_future(batcher.submit(1))
        await asyncio.sleep(0.02)  # well inside the 1 s linger
        second = asyncio.ensure_future(batcher.submit(2))
        return await first, await second

    results, sizes = asyncio.run(_with_batcher(rec, 2, 1.0, body))  # full at 2: no need to wait out the second
    assert results == (2, 4) and sizes == [2]


def test_an_error_reaches_only_its_own_caller():
    rec = Recorder()

    async def body(batcher):
        rec.hold.clear()
        first = asyncio.ensure_future(batcher.submit(1))
        await asyncio.to_thread(rec.entered.wait, 10)
        good, bad = asyncio.ensure_future(batcher.submit(3)), asyncio.ensure_future(batcher.submit(-1))
        await asyncio.sleep(0.05)
        rec.hold.set()
        await first
        with pytest.raises(ValueError, match="bad -1"):
            await bad
        return await good

    good, sizes = asyncio.run(_with_batcher(rec, 64, 0.0, body))
    assert good == 6 and sizes == [1, 2]


def test_adaptive_linger_answers_an_idle_service_at_once():
    """Sparse traffic (the worker idle nearly all the time): no batch lingers, so a lone request does not wait
    out max_wait; with a fixed linger the same request waits it out."""
    rec = Recorder()

    async def body(batcher):
        loop = asyncio.get_running_loop()
        waits = []
        for x in range(5):
            started = loop.time()
            await batcher.submit(x)
            waits.append(loop.time() - started)
            await asyncio.sleep(0.02)  # idle between requests
        return waits, batcher.lingered, batcher.busy

    (waits, lingered, busy), _ = asyncio.run(_with_batcher(rec, 8, 0.3, body, adaptive=True))
    assert lingered == 0 and busy < 0.5 and max(waits) < 0.3, (waits, busy)
    (waits_fixed, lingered_fixed, _), _ = asyncio.run(_with_batcher(rec, 8, 0.3, body, adaptive=False))
    assert lingered_fixed == 5 and min(waits_fixed) >= 0.29


def test_adaptive_linger_lingers_once_the_worker_is_busy():
    """A worker kept busy (each batch takes long, requests arrive back to back) reaches the busy fraction and
    then lingers, forming batches of the requests that arrive within the wait."""

    class Slow(Recorder):
        def __call__(self, xs):
            threading.Event().wait(0.03)  # a batch costs 30 ms
            return super().__call__(xs)

    rec = Slow()

    async def body(batcher):
        for x in range(12):  # back to back: the worker is busy nearly all the time
            await batcher.submit(x)
        busy_before = batcher.busy
        lingered_before = batcher.lingered
        first = asyncio.ensure_future(batcher.submit(100))
        await asyncio.sleep(0.05)  # inside the linger of the batch that holds 100
        second = asyncio.ensure_future(batcher.submit(101))
        return busy_before, lingered_before, await first, await second

    (busy, lingered, a, b), sizes = asyncio.run(_with_batcher(rec, 8, 0.2, body, adaptive=True))
    assert busy >= 0.5 and lingered >= 1, (busy, lingered)
    assert (a, b) == (200, 202) and sizes[-1] == 2
