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


async def _with_batcher(rec: Recorder, max_batch: int, max_wait_s: float, body):
    pool = ThreadPoolExecutor(1)
    sizes: list[int] = []
    batcher = MicroBatcher(rec, max_batch, max_wait_s, pool, on_batch=sizes.append)
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
