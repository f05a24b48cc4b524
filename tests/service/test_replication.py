"""Replication of item changes when Redis loses item state: two replicas (real apps, real redis-server of the
test's own) must apply every write Redis acknowledged, or turn unready until they have (issue 12, item 2)."""

from __future__ import annotations

import time
import uuid

import pytest
import redis
from fastapi.testclient import TestClient

from harness.launch import RedisServer
from tests.service_helpers import make_app

pytestmark = pytest.mark.slow  # the process tier: a redis-server of its own, flushed and restarted

WAIT_S = 15.0


def _agree(replicas: list[TestClient], check) -> float:
    """Wait until every replica is ready and ``check(client)`` holds on each (unready meanwhile is fine)."""
    started = time.monotonic()
    deadline = started + WAIT_S
    while True:
        failing = [i for i, c in enumerate(replicas) if c.get("/readyz").status_code != 200 or not check(c)]
        if not failing:
            return time.monotonic() - started
        if time.monotonic() > deadline:
            pytest.fail(f"replicas {failing} still ready-and-wrong or unready after {WAIT_S} s")
        time.sleep(0.1)


def _write(c: TestClient, method: str, path: str, **kw):
    """A write, retried while the replica answers 503 ``not_ready`` (rebuilding: nothing acknowledged)."""
    deadline = time.monotonic() + WAIT_S
    while True:
        r = c.request(method, path, **kw)
        if r.status_code != 503 or r.json()["error"]["code"] != "not_ready" or time.monotonic() > deadline:
            return r
        time.sleep(0.05)


def _served(c: TestClient, item_id: str) -> bool:
    return c.get(f"/v1/items/{item_id}").status_code == 200


def _text(c: TestClient, item_id: str) -> str | None:
    r = c.get(f"/v1/items/{item_id}")
    return r.json()["text"] if r.status_code == 200 else None


@pytest.mark.parametrize("loss", ["flush-item-keys", "restart-without-aof"])
def test_acknowledged_writes_apply_after_the_version_counter_goes_back(loss, scientific_bundle, tiny_clip, tmp_path):
    server = RedisServer(tmp_path / "redis", aof=loss != "restart-without-aof").start()
    prefix = f"repl-{uuid.uuid4().hex[:6]}"
    apps = [
        make_app(scientific_bundle, server.url, prefix, tiny_clip, tmp_path / f"r{i}", warmup=False) for i in (0, 1)
    ]
    bundle_ids = []
    try:
        with TestClient(apps[0]) as a, TestClient(apps[1]) as b:
            replicas = [a, b]
            bundle_ids = [i["item_id"] for i in a.post("/v1/recommend", json={"history": [], "k": 4}).json()["items"]]
            # before the loss: versions 1..4 held by both replicas
            for n in range(3):
                assert a.post("/v1/items", json={"item_id": "x", "text": f"x v{n}"}).status_code == 201
            assert a.post("/v1/items", json={"item_id": "y", "text": "y old"}).status_code == 201
            _agree(replicas, lambda c: _text(c, "x") == "x v2" and _text(c, "y") == "y old")

            if loss == "flush-item-keys":
                with redis.Redis.from_url(server.url) as r:
                    r.delete(*r.keys(f"{prefix}:{{items}}:*"))
            else:
                server.kill()
                server.start()  # same port, no AOF: empty

            # writes right after the loss: the counter restarts at 1, below what the replicas hold
            acked = {}
            deleted = _write(b, "DELETE", "/v1/items/x")  # 204, or 404 when b has already noticed that Redis lost x
            assert deleted.status_code in (204, 404), deleted.text
            r = _write(b, "POST", "/v1/items", json={"item_id": "y", "text": "y new"})
            assert r.status_code == 201, r.text
            acked["y"] = "y new"
            r = _write(a, "POST", "/v1/items", json={"item_id": "z", "text": "z new"})
            assert r.status_code == 201, r.text
            acked["z"] = "z new"
            assert _write(a, "DELETE", f"/v1/items/{bundle_ids[0]}").status_code == 204

            def consistent(c: TestClient) -> bool:
                return (
                    not _served(c, "x")  # deleted after the loss (or lost with it): never served again
                    and all(_text(c, i) == t for i, t in acked.items())
                    and not _served(c, bundle_ids[0])
                )

            took = _agree(replicas, consistent)
            print(f"{loss}: both replicas ready and serving every acknowledged write {took:.2f} s after the writes")
            # and recommendations agree with it: the deleted items are never recommended
            for c in replicas:
                items = c.post("/v1/recommend", json={"history": [], "k": 50}).json()["items"]
                assert {"x", bundle_ids[0]}.isdisjoint(i["item_id"] for i in items)
            # a replica started now (replaying Redis) serves the same
            with TestClient(
                make_app(scientific_bundle, server.url, prefix, tiny_clip, tmp_path / "r2", warmup=False)
            ) as fresh:
                assert consistent(fresh)
    finally:
        server.stop()
