"""Two SIGKILLs mid-stream of events, ingests of real ABO photos and deletes: first the service alone (a real
uvicorn process), then the service and its real redis-server together (AOF, appendfsync always). After each
restart, every acknowledged write is in Redis and served, retries (same idempotency key, same item id) duplicate
nothing, and the restarted index matches Redis. (CI-sized: `scripts/reliability.py durability` runs more.)"""

from __future__ import annotations

import pytest

from harness.durability import run_durability

pytestmark = pytest.mark.slow  # the process tier: a service and a redis-server SIGKILLed

KINDS = ("events", "ingest", "delete")


def test_acknowledged_writes_survive_sigkills(scientific_bundle, tiny_clip, abo_dir, tmp_path):
    report = run_durability(scientific_bundle, tiny_clip, abo_dir, tmp_path, events_threads=3, stream_s=2.0)
    print("\n".join(report.lines()))  # two rounds: the service killed, then the service and redis-server
    assert report.acknowledged["events"] >= 20 and report.acknowledged["ingest"] >= 3
    assert report.acknowledged.get("delete", 0) >= 1
    assert sum(report.unacknowledged.values()) >= 1  # the kill cut calls off
    for kind in KINDS:
        assert report.found_in_redis.get(kind, 0) == report.acknowledged.get(kind, 0), kind
        assert report.found_via_api.get(kind, 0) == report.acknowledged.get(kind, 0), kind
    assert report.missing == []
    assert report.retries_ok == report.retries  # every retry of an unacknowledged write went through
    assert report.duplicated == [] and report.duplicate_answers == report.resent > 0
    assert report.live_items_index == report.live_items_redis
    assert report.ingested_live >= 2 and report.recommendable == report.ingested_live
    assert report.deleted_checked >= 1 and report.deleted_served == []
    assert report.log_leaks == []
