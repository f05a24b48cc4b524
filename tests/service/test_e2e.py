"""End to end: real Redis, a bundle trained on REAL Scientific data, real ABO product photos through open_clip."""

from __future__ import annotations

import time

import numpy as np
import pytest
from fastapi.testclient import TestClient

from tests.service_helpers import make_app, offline_topk


@pytest.fixture
def app_factory(scientific_bundle, redis_url, key_prefix, tiny_clip, tmp_path):
    def build(**extra):
        return make_app(scientific_bundle, redis_url, key_prefix, tiny_clip, tmp_path, **extra)

    return build


def _ids(bundle):
    import json

    return json.loads((bundle / "items/ids.json").read_text())


def test_events_then_recommend_matches_offline_topk(app_factory, scientific_bundle, scientific_dir):
    from missrec.data.dataset import load_dataset

    ds = load_dataset(scientific_dir)
    ids = _ids(scientific_bundle)
    user = 17
    rows = ds.test.histories[user, : ds.test.lengths[user]].tolist()
    with TestClient(app_factory()) as client:
        r = client.post(f"/v1/users/{ds.user_ids[user]}/events", json={"item_ids": [ids[i] for i in rows]})
        assert r.status_code == 200, r.text
        assert r.json()["history_length"] == len(rows)
        assert client.get(f"/v1/users/{ds.user_ids[user]}/history").json()["item_ids"] == [ids[i] for i in rows]
        for exclude_seen in (True, False):
            got = client.post(
                "/v1/recommend", json={"user_id": ds.user_ids[user], "k": 20, "exclude_seen": exclude_seen}
            ).json()
            expected, scores = offline_topk(scientific_bundle, rows, 20, set(rows) if exclude_seen else set())
            assert [i["item_id"] for i in got["items"]] == [ids[r] for r in expected]
            assert np.allclose([i["score"] for i in got["items"]], scores, atol=1e-4)
            assert got["exact"] is True and got["fallback"] is None and got["history_length"] == len(rows)
        # the explicit-history form gives the same answer without touching Redis
        explicit = client.post("/v1/recommend", json={"history": [ids[i] for i in rows], "k": 20}).json()
        assert (
            explicit["items"]
            == client.post("/v1/recommend", json={"user_id": ds.user_ids[user], "k": 20}).json()["items"]
        )


def test_explanations_and_fallback(app_factory, scientific_bundle):
    ids = _ids(scientific_bundle)
    with TestClient(app_factory()) as client:
        body = client.post("/v1/recommend", json={"history": ids[1:4], "k": 5, "explain": True}).json()
        for item in body["items"]:
            e = item["explanation"]
            assert e["text_weight"] + e["image_weight"] == pytest.approx(1.0, abs=1e-5)
            assert e["interest"] >= 1
            # the score split: the parts sum to the item's score, the shares to 1
            assert [p["part"] for p in e["score_split"]] == ["text", "image"]
            assert sum(p["score"] for p in e["score_split"]) == pytest.approx(item["score"], abs=1e-5)
            assert sum(p["share"] for p in e["score_split"]) == pytest.approx(1.0, abs=1e-4)
            # "because of": history items, largest contribution first, positions into the history used
            because = e["because"]
            assert 1 <= len(because) <= 3 and len({b["item_id"] for b in because}) == len(because)
            assert all(ids[1:4][b["position"]] == b["item_id"] for b in because)
            drops = [b["contribution"] for b in because]
            assert drops == sorted(drops, reverse=True)
        plain = client.post("/v1/recommend", json={"history": ids[1:4], "k": 5}).json()
        assert [i["item_id"] for i in plain["items"]] == [i["item_id"] for i in body["items"]]
        assert all(i["explanation"] is None for i in plain["items"])
        one = client.post("/v1/recommend", json={"history": ids[1:2], "k": 3, "explain": True}).json()
        assert all(i["explanation"]["because"] == [] for i in one["items"])  # nothing to leave out
        similar = client.get(f"/v1/items/{ids[1]}/similar", params={"k": 3, "explain": True}).json()
        assert all(i["explanation"]["because"] is None and i["explanation"]["score_split"] for i in similar["items"])
        cold = client.post("/v1/recommend", json={"user_id": "nobody-has-seen-this-user", "k": 7}).json()
        assert cold["fallback"] == "popular" and len(cold["items"]) == 7
        assert [i["score"] for i in cold["items"]] == sorted((i["score"] for i in cold["items"]), reverse=True)
        empty = client.post("/v1/recommend", json={"history": [], "k": 7}).json()  # a new client-side user
        assert empty["fallback"] == "popular" and empty["items"] == cold["items"]


def test_exactly_k_items_with_heavy_exclusion(app_factory, scientific_bundle):
    ids = _ids(scientific_bundle)
    with TestClient(app_factory()) as client:
        first = client.post("/v1/recommend", json={"history": ids[5:8], "k": 100}).json()["items"]
        top = [i["item_id"] for i in first]
        again = client.post("/v1/recommend", json={"history": ids[5:8], "k": 100, "exclude": top}).json()["items"]
        assert len(again) == 100 and not set(top) & {i["item_id"] for i in again}


def test_ingest_recommend_delete_restart(app_factory, abo_dir, abo_products):
    products = abo_products
    lamp = next(p for p in products if len(p["images"]) >= 3)
    new_ids = [f"abo-{lamp['id']}-{i}" for i in range(len(lamp["images"]))]
    app = app_factory()
    with TestClient(app) as client:
        for item_id, image in zip(new_ids, lamp["images"], strict=True):
            with image.open("rb") as fh:
                r = client.post(
                    "/v1/items",
                    data={"item_id": item_id, "text": lamp["text"]},
                    files={"image": (image.name, fh, "image/jpeg")},
                )
            assert r.status_code == 201, r.text
            assert r.json()["text_cluster"] >= 1 and r.json()["image_cluster"] >= 1
        target = new_ids[-1]
        body = client.post("/v1/recommend", json={"history": new_ids[:-1], "k": 10}).json()
        assert target in [i["item_id"] for i in body["items"]], "an ingested item is recommended for its siblings"
        info = client.get(f"/v1/items/{target}").json()
        assert info["source"] == "ingested" and info["text"] == lamp["text"]
    # restart: a new app on the same Redis replays the ingested items
    with TestClient(app_factory()) as client:
        assert client.get(f"/v1/items/{target}").status_code == 200
        body = client.post("/v1/recommend", json={"history": new_ids[:-1], "k": 10}).json()
        assert target in [i["item_id"] for i in body["items"]]
        assert client.delete(f"/v1/items/{target}").status_code == 204
        assert client.get(f"/v1/items/{target}").status_code == 404
        body = client.post("/v1/recommend", json={"history": new_ids[:-1], "k": 1000}).json()
        assert target not in [i["item_id"] for i in body["items"]]
    with TestClient(app_factory()) as client:  # the deletion survives a restart too
        assert client.get(f"/v1/items/{target}").status_code == 404


def test_two_instances_see_each_others_items_within_a_second(app_factory, abo_dir, abo_products):
    product = abo_products[0]
    image = product["images"][0].read_bytes()
    with TestClient(app_factory()) as a, TestClient(app_factory()) as b:
        history = b.post("/v1/recommend", json={"history": ["B00O47ILVA"], "k": 1}).json()
        assert history["items"]
        r = a.post(
            "/v1/items",
            data={"item_id": "replicated-1", "text": product["text"]},
            files={"image": ("p.jpg", image, "image/jpeg")},
        )
        assert r.status_code == 201
        acknowledged = time.monotonic()
        while time.monotonic() - acknowledged < 1.0:
            if b.get("/v1/items/replicated-1").status_code == 200:
                break
            time.sleep(0.02)
        seen_after = time.monotonic() - acknowledged
        assert seen_after < 1.0, f"replica B saw the item after {seen_after:.2f} s"
        body = b.post("/v1/recommend", json={"history": ["replicated-1"], "k": 5, "exclude_seen": False}).json()
        assert "replicated-1" in [i["item_id"] for i in body["items"]]


def test_same_item_same_features_offline_and_online(
    app_factory, abo_dir, tiny_clip, tmp_path, redis_url, key_prefix, abo_products
):
    """`missrec prepare` (offline) and POST /v1/items (online) give bit-identical CLIP features."""
    import asyncio
    import json

    import redis.asyncio as aredis

    from clip_features.torch_encoder import ClipEncoder
    from missrec.data.prepare import prepare_dataset
    from service.store import ItemStore

    product = abo_products[1]
    image = product["images"][0]
    with TestClient(app_factory()) as client:
        with image.open("rb") as fh:
            r = client.post(
                "/v1/items",
                data={"item_id": "same-1", "text": product["text"]},
                files={"image": (image.name, fh, "image/jpeg")},
            )
        assert r.status_code == 201, r.text

    async def stored():
        redis = aredis.Redis.from_url(redis_url)
        record = await ItemStore(redis, prefix=key_prefix).get_item("same-1")
        await redis.aclose()
        return record

    record = asyncio.run(stored())
    online = {m: np.frombuffer(record.arrays[f"feature_{m}"], dtype=np.float32) for m in ("text", "image")}
    # offline: a catalog holding the same item, with enough interactions to survive 5-core filtering
    catalog = tmp_path / "raw"
    catalog.mkdir()
    items = [{"item_id": "same-1", "text": product["text"], "image": str(image)}]
    items += [{"item_id": f"other-{i}", "text": f"other product {i}"} for i in range(6)]
    (catalog / "items.jsonl").write_text("\n".join(json.dumps(i) for i in items) + "\n")
    lines = ["user_id,item_id,timestamp"]
    for u in range(6):
        for t, item in enumerate(["same-1", *[f"other-{i}" for i in range(6)]]):
            lines.append(f"u{u},{item},{u * 100 + t}")
    (catalog / "events.csv").write_text("\n".join(lines) + "\n")
    out = tmp_path / "prepared"
    prepare_dataset(
        catalog / "items.jsonl", catalog / "events.csv", out, ClipEncoder(*tiny_clip), name="P", progress=False
    )
    from missrec.data.dataset import load_dataset

    ds = load_dataset(out)
    row = ds.item_index()["same-1"]
    assert np.array_equal(ds.features["text"][row], online["text"])
    assert np.array_equal(ds.features["image"][row], online["image"])


def test_the_stores_keep_the_documented_key_layout(redis_url, key_prefix):
    """Deployments keep their data across versions: the keys (names, types, encodings) the three stores write are
    the ones service.store documents, on one client."""
    import asyncio
    import hashlib
    import json

    import redis as sync_redis
    from redis.asyncio import Redis

    from service.store import AnnouncementStore, HistoryStore, ItemRecord, ItemStore

    user, p = "ü-1", key_prefix
    tag = hashlib.sha1(user.encode()).hexdigest()[:20]

    async def write() -> None:
        client = Redis.from_url(redis_url)
        try:
            histories = HistoryStore(client, p, max_len=2, ttl_seconds=600)
            await histories.append_events(user, ["a", "b", "c"], [1.0, 2.0, 3.5], idempotency_key="k1")
            items = ItemStore(client, p)
            await items.put_item(ItemRecord("it", text="t", arrays={"tokens": b"\0" * 8}, ints={"x": 3}), "o")
            await AnnouncementStore(client, p).announce_bundle("/b", "v1", "r1")
        finally:
            await client.aclose()

    asyncio.run(write())
    r = sync_redis.Redis.from_url(redis_url)
    user_keys = {
        f"{p}:u:{{{tag}}}:hist",
        f"{p}:u:{{{tag}}}:id",
        f"{p}:u:{{{tag}}}:idem:" + hashlib.sha1(b"k1").hexdigest(),
    }
    items = {f"{p}:{{items}}:{k}" for k in ("item:it", "ids", "version", "epoch", "events")}
    bundle = {f"{p}:{{bundle}}:{k}" for k in ("current", "generation", "events")}
    assert {k.decode() for k in r.scan_iter(match=f"{p}:*")} == user_keys | items | bundle
    assert r.lrange(f"{p}:u:{{{tag}}}:hist", 0, -1) == [b"2.0\x1fb", b"3.5\x1fc"]  # capped at max_len, oldest first
    assert r.get(f"{p}:u:{{{tag}}}:id") == user.encode() and 0 < r.ttl(f"{p}:u:{{{tag}}}:hist") <= 600
    stored = r.hgetall(f"{p}:{{items}}:item:it")
    assert stored[b"version"] == b"1" and stored[b"text"] == b"t" and stored[b"a:tokens"] == b"\0" * 8
    assert stored[b"i:x"] == b"3" and stored[b"deleted"] == b"0"
    assert r.zscore(f"{p}:{{items}}:ids", "it") == 1 and r.type(f"{p}:{{items}}:events") == b"stream"
    announced = json.loads(r.get(f"{p}:{{bundle}}:current"))
    assert [announced[k] for k in ("generation", "bundle", "version", "by")] == [1, "/b", "v1", "r1"]
    r.close()
