"""The micro-batcher: batches form from what queued while the previous batch ran; optional lingering; errors."""

from __future__ import annotations

import asyncio
import threading

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
    sizes: list[int] = []
    batcher = MicroBatcher(rec, max_batch, max_wait_s, on_batch=sizes.append, adaptive=adaptive, rate_window_s=2.0)
    batcher.start()
    try:
        return await body(batcher), sizes
    finally:
        await batcher.stop()


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
        rec.entered.clear()
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
    """Sparse traffic: no batch lingers, so a lone request does not wait out max_wait; with a fixed linger the
    same request waits it out."""
    rec = Recorder()

    async def body(batcher):
        loop = asyncio.get_running_loop()
        waits = []
        for x in range(5):
            started = loop.time()
            await batcher.submit(x)
            waits.append(loop.time() - started)
            await asyncio.sleep(0.02)  # idle between requests
        return waits, batcher.lingered

    (waits, lingered), _ = asyncio.run(_with_batcher(rec, 8, 0.3, body, adaptive=True))
    assert lingered == 0 and max(waits) < 0.3, waits
    (waits_fixed, lingered_fixed), _ = asyncio.run(_with_batcher(rec, 8, 0.3, body, adaptive=False))
    assert lingered_fixed == 5 and min(waits_fixed) >= 0.29


class Slow(Recorder):
    def __call__(self, xs):
        threading.Event().wait(0.03)  # a batch costs 30 ms
        return super().__call__(xs)


def test_a_lone_client_sending_back_to_back_never_waits_for_company():
    """One client, the next request sent the moment the previous answer arrives, the worker busy nearly all the
    time: no request arrives while another is in flight, so no batch lingers (the linger tax of a busy-fraction
    rule, which lingered here)."""
    rec = Slow()

    async def body(batcher):
        for x in range(12):
            await batcher.submit(x)
        return batcher.lingered, batcher.arrival_rate()

    (lingered, rate), sizes = asyncio.run(_with_batcher(rec, 8, 0.2, body, adaptive=True))
    assert lingered == 0 and rate == 0.0 and sizes == [1] * 12


def test_adaptive_linger_lingers_once_requests_overlap():
    """Requests that arrive while others are in flight raise the arrival rate; once it expects a batch-mate within
    the wait, batches linger and take the requests that arrive within it."""
    rec = Slow()

    async def body(batcher):
        async def client(base):
            for x in range(6):
                await batcher.submit(base + x)

        await asyncio.gather(*(client(10 * c) for c in range(4)))  # four overlapping clients
        rate = batcher.arrival_rate()
        lingered_before = batcher.lingered
        first = asyncio.ensure_future(batcher.submit(100))
        await asyncio.sleep(0.05)  # inside the linger of the batch that holds 100
        second = asyncio.ensure_future(batcher.submit(101))
        return rate, lingered_before, await first, await second

    (rate, lingered, a, b), sizes = asyncio.run(_with_batcher(rec, 8, 0.2, body, adaptive=True))
    assert rate * 0.2 >= 1.0 and lingered >= 1, (rate, lingered)
    assert (a, b) == (200, 202) and sizes[-1] == 2


def test_a_cancelled_caller_is_left_out_and_stop_fails_nothing_answered():
    rec = Recorder()

    async def body(batcher):
        rec.hold.clear()
        first = asyncio.ensure_future(batcher.submit(1))
        await asyncio.to_thread(rec.entered.wait, 10)
        gone, kept = asyncio.ensure_future(batcher.submit(2)), asyncio.ensure_future(batcher.submit(3))
        await asyncio.sleep(0.02)
        gone.cancel()
        await asyncio.sleep(0.02)
        rec.hold.set()
        return await first, await kept, batcher.in_flight

    (one, three, in_flight), sizes = asyncio.run(_with_batcher(rec, 64, 0.0, body))
    assert (one, three, in_flight) == (2, 6, 0) and rec.batches == [[1], [3]] and sizes == [1, 1]


def test_overload_sheds_fast_and_computed_requests_keep_a_bounded_queue_wait():
    """max_queue_s: behind a batch that runs too long, a new request is refused at once when the oldest queued one
    has waited longer than the bound, and queued ones whose wait passed it are shed rather than computed late."""
    from service.micro_batch import QueueTimeout

    rec = Recorder()
    waits: list[float] = []

    async def scenario():
        batcher = MicroBatcher(rec, 1, 0.0, on_wait=waits.append, adaptive=False, max_queue_s=0.05)
        batcher.start()
        try:
            rec.hold.clear()
            first = asyncio.ensure_future(batcher.submit(1))
            await asyncio.to_thread(rec.entered.wait, 10)  # batch [1] runs and is held
            queued = [asyncio.ensure_future(batcher.submit(x)) for x in (2, 3)]
            await asyncio.sleep(0.2)  # the queued ones have now waited past the bound
            with pytest.raises(QueueTimeout):
                await batcher.submit(4)  # refused at once: nothing is queued behind a stale head
            rec.hold.set()
            results = await asyncio.gather(first, *queued, return_exceptions=True)
            after = await batcher.submit(5)  # the queue drained: admitted and computed again
            return results, after, batcher.shed
        finally:
            await batcher.stop()

    (one, two, three), after, shed = asyncio.run(scenario())
    assert one == 2 and after == 10
    assert isinstance(two, QueueTimeout) and isinstance(three, QueueTimeout)
    assert rec.batches == [[1], [5]] and shed == 3
    assert max(waits) <= 0.05  # every computed request waited within the bound
