"""Concurrency over real HTTP (uvicorn), real Redis and the real Scientific bundle: many writers on one user keep
the history capped and every call's items together and in order; ingest, delete and recommend running at once
never return an item after its deletion was acknowledged, and never fail."""

from __future__ import annotations

import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from harness.launch import InProcessServer, bundle_ids
from tests.service_helpers import make_app

TASKS, CALLS, PER_CALL = 8, 10, 3


@pytest.fixture
def server(scientific_bundle, redis_url, key_prefix, tiny_clip, tmp_path):
    app = make_app(scientific_bundle, redis_url, key_prefix, tiny_clip, tmp_path)
    with InProcessServer(app) as running:
        yield running


def test_concurrent_events_for_one_user_stay_capped_and_ordered(server, scientific_bundle):
    ids = bundle_ids(scientific_bundle)[1 : 1 + TASKS * CALLS * PER_CALL]
    origin = {}  # item -> (task, call, position in the call)
    for t in range(TASKS):
        for c in range(CALLS):
            for j in range(PER_CALL):
                origin[ids[(t * CALLS + c) * PER_CALL + j]] = (t, c, j)
    user = f"busy-{uuid.uuid4().hex[:8]}"
    lengths: list[int] = []

    def writer(t: int) -> None:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            for c in range(CALLS):
                items = [ids[(t * CALLS + c) * PER_CALL + j] for j in range(PER_CALL)]
                r = client.post(f"/v1/users/{user}/events", json={"item_ids": items})
                assert r.status_code == 200, r.text
                lengths.append(r.json()["history_length"])

    with ThreadPoolExecutor(TASKS) as pool:
        list(pool.map(writer, range(TASKS)))
    history = httpx.get(f"{server.url}/v1/users/{user}/history").json()["item_ids"]
    cap = 50  # the bundle's max_len
    assert len(history) == cap and max(lengths) <= cap and len(lengths) == TASKS * CALLS
    assert len(set(history)) == cap, "an item was stored twice"
    entries = [origin[item] for item in history]
    # group consecutive entries by call: one group per call, positions in order; only the oldest may be cut
    groups: list[tuple[tuple[int, int], list[int]]] = []
    for t, c, j in entries:
        if groups and groups[-1][0] == (t, c):
            groups[-1][1].append(j)
        else:
            groups.append(((t, c), [j]))
    calls = [g[0] for g in groups]
    assert len(calls) == len(set(calls)), f"a call's items were interleaved with another call's: {entries}"
    for n, (_, positions) in enumerate(groups):
        full = list(range(PER_CALL))
        assert positions == (full[-len(positions) :] if n == 0 else full), (n, positions)
    # per writer: its calls in order, and the kept ones are its newest (the history is the global tail)
    for t in {t for t, _ in calls}:
        mine = [c for task, c in calls if task == t]
        assert mine == list(range(CALLS - len(mine), CALLS)), (t, mine)


def test_concurrent_retries_with_one_idempotency_key_apply_once(server, scientific_bundle):
    items = bundle_ids(scientific_bundle)[1:4]
    user, key = f"retry-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    barrier = threading.Barrier(16)

    def send(_: int) -> dict:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            barrier.wait()
            r = client.post(f"/v1/users/{user}/events", json={"item_ids": items}, headers={"Idempotency-Key": key})
            assert r.status_code == 200, r.text
            return r.json()

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(send, range(16)))
    assert sorted(a["duplicate"] for a in answers) == [False] + [True] * 15
    assert sum(a["appended"] for a in answers) == len(items)
    assert httpx.get(f"{server.url}/v1/users/{user}/history").json()["item_ids"] == items


def _live_items(url: str) -> float:
    text = httpx.get(f"{url}/metrics").text
    return float(next(line.split()[-1] for line in text.splitlines() if line.startswith("missrec_live_items ")))


def test_ingest_delete_recommend_at_once_never_serve_a_deleted_item(server, scientific_bundle, abo_dir, abo_products):
    url = server.url
    ids = bundle_ids(scientific_bundle)
    query = ids[1:4]
    live_before = _live_items(url)
    top = [i["item_id"] for i in httpx.post(f"{url}/v1/recommend", json={"history": query, "k": 60}).json()["items"]]
    victims = top[:40]  # the items this query would be served: deleting them must show at once
    photos = [(p["text"], image) for p in abo_products for image in p["images"]][:8]
    deleted_at: dict[str, float] = {}  # item -> when its 204 arrived
    ingested: list[str] = []
    served: list[tuple[float, list[str]]] = []  # (request sent, items returned)
    failures: list[str] = []
    writers_done = threading.Event()

    def delete(client: httpx.Client, item: str) -> None:
        r = client.delete(f"/v1/items/{item}")
        if r.status_code == 204:
            deleted_at[item] = time.monotonic()
        else:
            failures.append(f"delete {item}: {r.status_code} {r.text}")

    def deleter() -> None:
        with httpx.Client(base_url=url, timeout=30) as client:
            for item in victims:
                delete(client, item)
                time.sleep(0.02)

    def ingester() -> None:
        with httpx.Client(base_url=url, timeout=60) as client:
            for n, (text, image) in enumerate(photos):
                item = f"conc-{uuid.uuid4().hex[:6]}-{n}"
                r = client.post(
                    "/v1/items", data={"item_id": item, "text": text}, files={"image": (image.name, image.read_bytes())}
                )
                if r.status_code != 201:
                    failures.append(r.text)
                    continue
                ingested.append(item)
                if n % 2:  # every other new item is deleted again while recommendations run
                    delete(client, item)

    def recommender(w: int) -> None:
        with httpx.Client(base_url=url, timeout=30) as client:
            while not writers_done.is_set():
                recent = ingested[-1:] if w == 2 else []
                history = query if w == 0 else recent  # 1: popular fallback (history []), 2: a new item
                sent = time.monotonic()
                r = client.post("/v1/recommend", json={"history": history, "k": 100, "explain": w == 0})
                if r.status_code == 200:
                    served.append((sent, [i["item_id"] for i in r.json()["items"]]))
                elif not (r.status_code == 422 and r.json()["error"]["code"] == "unknown_items" and recent):
                    failures.append(f"{r.status_code} {r.text}")  # only a just-deleted history item may be unknown

    threads = [threading.Thread(target=recommender, args=(w,)) for w in range(3)]
    writers = [threading.Thread(target=deleter), threading.Thread(target=ingester)]
    for t in threads + writers:
        t.start()
    for t in writers:
        t.join(120)
    writers_done.set()
    for t in threads:
        t.join(30)
    assert failures == [], failures[:5]
    assert len(deleted_at) == len(victims) + len(photos) // 2 and len(ingested) == len(photos)
    stale = [(item, sent) for sent, items in served for item in items if deleted_at.get(item, sent) < sent]
    assert stale == [], f"{len(stale)} deleted items served after their delete was acknowledged: {stale[:5]}"
    assert len(served) > 30, "too few recommendations overlapped the writes to prove anything"
    with httpx.Client(base_url=url, timeout=30) as client:
        for history in (query, []):
            final = {
                i["item_id"] for i in client.post("/v1/recommend", json={"history": history, "k": 1000}).json()["items"]
            }
            assert not final & set(deleted_at)
        assert all(client.get(f"/v1/items/{item}").status_code == 404 for item in deleted_at)
        assert all(client.get(f"/v1/items/{item}").status_code == 200 for item in set(ingested) - set(deleted_at))
    assert _live_items(url) == live_before - len(victims) + len(photos) - len(photos) // 2
