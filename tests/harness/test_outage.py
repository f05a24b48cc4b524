"""Reliability under faults: Redis outages under load (a real redis-server started here), Redis down at start-up."""

from __future__ import annotations

import pytest

from harness.launch import InProcessServer, RedisServer, bundle_ids
from harness.outage import run_outage
from tests.service_helpers import make_app

pytestmark = pytest.mark.slow  # the process tier: a redis-server of its own stopped and killed under load


@pytest.fixture
def own_redis(tmp_path):
    """A redis-server of this test's own (TCP, AOF fsync always), so it can be killed, stopped and restarted."""
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.stop()


@pytest.mark.parametrize("mode", ["kill", "stop"])
def test_redis_outage_under_load_fails_fast_and_recovers(mode, own_redis, scientific_bundle, tiny_clip, tmp_path):
    # max_queue_ms 5,000 (default 500): what is checked is Redis failing fast and coming back, not load shedding
    # (tests/service/test_micro_batch.py); a starved CI machine shed 3 explicit-history requests as "overloaded"
    app = make_app(scientific_bundle, own_redis.url, "outage", tiny_clip, tmp_path, max_queue_ms=5000.0)
    with InProcessServer(app) as server:
        # A paused Redis makes each call wait out the 0.5 s timeout, so that outage runs longer for as many samples.
        outage_s = 1.5 if mode == "kill" else 2.5
        report = run_outage(server.url, own_redis, bundle_ids(scientific_bundle)[1:50], mode, 6, 1.0, outage_s, 1.5)
    print("\n".join(report.lines()))
    assert report.during_outage > 20
    assert report.slowest_overall_s < 1.0, report.lines()
    assert report.unexpected == [], report.unexpected[:5]
    assert report.wrong_during_outage == [], report.wrong_during_outage[:5]
    assert report.history_recommends_failed == 0  # the bundle alone serves explicit histories
    assert report.unready_after_s is not None and report.unready_after_s < 1.0
    assert report.ready_after_s is not None and report.ready_after_s < 1.0
    assert report.failed_after_return == 0  # a stale pooled connection is retried once on a fresh one
    assert report.recovered_after_s < 1.0
    assert report.events_acknowledged > 10 and report.acknowledged_found == report.events_acknowledged


def test_shutdown_survives_cancellations_that_redis_py_loses(
    scientific_bundle, redis_url, key_prefix, tiny_clip, tmp_path
):
    """redis-py sometimes swallows a cancellation landing inside a command (a few in a hundred for the item-stream
    XREAD loop, most often right after it starts); stopping the consumer must still end, every time."""
    import asyncio
    import random
    import time

    from service.replication import stop_task

    app = make_app(scientific_bundle, redis_url, key_prefix, tiny_clip, tmp_path, warmup=False)
    rng = random.Random(0)

    async def scenario() -> int:
        recancelled = 0
        async with app.router.lifespan_context(app):  # leaving it closes the service: that must end too
            rep = app.state.service.replicator
            for _ in range(60):
                await asyncio.sleep(rng.uniform(0, 0.05))
                started = time.monotonic()
                await asyncio.wait_for(stop_task(rep._task, every_s=0.3), 5)  # TimeoutError = a hang
                recancelled += time.monotonic() - started > 0.3  # the first cancellation was lost
                rep.start()
        return recancelled

    print(f"stop_task had to cancel again {asyncio.run(scenario())} times in 60")
