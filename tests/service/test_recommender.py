"""The serving core under the service: every documented metric is recorded, id lookups never wait for a batch,
snapshots are immutable while writers publish new ones (real Scientific bundle, real Redis, real ONNX Runtime)."""

from __future__ import annotations

import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
from fastapi.testclient import TestClient

import service.metrics
from harness.launch import InProcessServer, bundle_ids
from harness.ports import free_port
from service.embedded_redis import EmbeddedRedis
from service.serving_model import ServingModel
from service.settings import Settings
from service.store import ItemRecord
from tests.service_helpers import make_app


def _documented() -> tuple[list[str], list[str]]:
    """(metric names, stage labels) as the module docstring of service.metrics documents them."""
    doc = service.metrics.__doc__ or ""
    names = re.findall(r"^    ([a-z_]+)(?:\{[^}]*\})?\s", doc, flags=re.M)
    stages = re.search(r"histogram: ([a-z_, ]+)", doc)
    assert names and stages, doc
    return names, [s.strip() for s in stages.group(1).split(",")]


def _value(text: str, series: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(series + " ") or line.startswith(series + "{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_every_documented_metric_moves(scientific_bundle, abo_dir, key_prefix, tiny_clip, tmp_path, abo_products):
    """Drive each use case (recommend by history and by user, popular fallback, events, ingest, delete, a Redis
    failure) and check that every series the docs name has moved, each stage label included."""
    names, stages = _documented()
    assert {"queue", "rescore", "request"} <= set(stages)
    redis = EmbeddedRedis(tmp_path / "redis", port=free_port())
    url = redis.start()
    product = abo_products[0]
    app = make_app(scientific_bundle, url, key_prefix, tiny_clip, tmp_path, warmup=False)
    ids = bundle_ids(scientific_bundle)
    try:
        with TestClient(app) as client:
            assert client.post("/v1/recommend", json={"history": ids[1:4], "k": 5, "explain": True}).status_code == 200
            assert client.post("/v1/users/m1/events", json={"item_ids": ids[1:3]}).status_code == 200
            assert client.post("/v1/recommend", json={"user_id": "m1", "k": 5}).status_code == 200
            assert client.post("/v1/recommend", json={"user_id": "nobody", "k": 5}).json()["fallback"] == "popular"
            assert client.get(f"/v1/items/{ids[1]}/similar").status_code == 200
            image = product["images"][0].read_bytes()
            r = client.post("/v1/items", data={"item_id": "m-new", "text": product["text"]}, files={"image": image})
            assert r.status_code == 201, r.text
            assert client.delete("/v1/items/m-new").status_code == 204
            redis.stop()
            assert client.post("/v1/recommend", json={"user_id": "m1", "k": 5}).status_code == 503
            text = client.get("/metrics").text
    finally:
        redis.stop()
    # the swap and shadow metrics move in tests/service/test_swap.py and tests/service/test_shadow.py
    for name in (n for n in names if not n.startswith(("bundle_", "shadow_"))):
        series = f"missrec_{name}"
        if name in ("stage_seconds", "batch_size", "gc_seconds"):
            series += "_count"
        assert _value(text, series) > 0, f"{series} never moved"
    for stage in stages:
        assert _value(text, f'missrec_stage_seconds_count{{stage="{stage}"}}') > 0, f"stage {stage} never recorded"
    assert 'route="/v1/recommend",status="200"' in text and 'route="/v1/items/{item_id:path}",status="204"' in text


def test_lookups_and_ingest_checks_do_not_wait_for_a_running_batch(
    scientific_bundle, redis_url, key_prefix, tiny_clip, tmp_path
):
    """A batch whose user tower takes 1.5 s is running: GET /v1/items/{id}, a recommend that fails validation and
    an ingest that fails its checks all answer at once (they read the current snapshot; nothing holds a lock)."""
    app = make_app(scientific_bundle, redis_url, key_prefix, tiny_clip, tmp_path, warmup=False)
    ids = bundle_ids(scientific_bundle)
    with InProcessServer(app) as server:
        tower = app.state.service.catalogue.current.model.towers.user
        real_run, in_batch = tower.run, threading.Event()

        def slow_run(feeds):  # the real ONNX Runtime session, slowed down inside the batch
            in_batch.set()
            time.sleep(1.5)
            return real_run(feeds)

        tower.run = slow_run
        try:
            with ThreadPoolExecutor(1) as pool, httpx.Client(base_url=server.url, timeout=30) as client:
                slow = pool.submit(client.post, "/v1/recommend", json={"history": ids[1:3], "k": 5})
                assert in_batch.wait(10)
                timings = {}
                for name, call in {
                    "get item": lambda: client.get(f"/v1/items/{ids[5]}"),
                    "unknown history item": lambda: client.post("/v1/recommend", json={"history": ["nope"]}),
                    "ingest without content": lambda: client.post("/v1/items", data={"item_id": "x", "text": " "}),
                }.items():
                    started = time.perf_counter()
                    r = call()
                    timings[name] = time.perf_counter() - started
                    assert r.status_code in (200, 422), (name, r.text)
                still_running = not slow.done()
                assert slow.result().status_code == 200
        finally:
            tower.run = real_run
    print({k: f"{1e3 * v:.1f} ms" for k, v in timings.items()})
    assert still_running, "the slow batch ended before the lookups: the test proved nothing"
    assert max(timings.values()) < 0.5, timings


def test_a_snapshot_never_changes_while_writers_publish(scientific_bundle, tmp_path):
    """Readers keep the snapshot they took: ingests and deletes publish new snapshots and leave old ones intact."""
    from service.catalogue import Catalogue

    model = ServingModel.load(scientific_bundle, Settings(bundle=scientific_bundle, onnx_provider="cpu"))
    catalogue = Catalogue(model, compact_rows=2)
    before = catalogue.current
    frozen = (before.n, before.deleted.copy(), before.tokens.copy(), dict(before.overlay))
    target = model.bundle.table.ids[7]
    d = model.manifest.dims
    rng = np.random.default_rng(0)

    def record(item_id: str, version: int) -> ItemRecord:
        arrays = {
            f"feature_{m}": rng.standard_normal(d.feature(m)).astype(np.float32).tobytes()
            for m in model.manifest.modalities
        }
        return ItemRecord(item_id=item_id, version=version, text="t", bundle_version="another-bundle", arrays=arrays)

    catalogue.apply([record(f"new-{i}", i + 1) for i in range(5)])  # re-encoded by this bundle's item tower
    catalogue.apply([ItemRecord(item_id=target, version=10, deleted=True)])
    after = catalogue.current
    assert (before.n, dict(before.overlay)) == (frozen[0], frozen[3])
    np.testing.assert_array_equal(before.deleted, frozen[1])
    np.testing.assert_array_equal(before.tokens, frozen[2])
    assert before.row(target) == 7 and after.row(target) is None
    assert after.n == before.n + 5 and after.row("new-3") == before.n + 3 and before.row("new-3") is None
    assert after.index_rows == after.n and before.index_rows == before.n  # the tail was folded into a copy
    assert before.index is not after.index and before.index.ntotal == before.n


def test_the_one_serving_path_serves_what_the_three_copies_computed(scientific_bundle):
    """service.recommender.serve against the code it replaced (the recommender's batch, shadow's one request and
    evaluate-bundle's batch each ran the user tower and top_k themselves, cutting histories to max_len): the same
    rows, scores, proofs and explanation weights, per user, with mixed k, exclusions, a tail of ingested rows and a
    delete; a history longer than max_len serves as its last max_len items."""
    from service.catalogue import Catalogue
    from service.recommender import serve
    from serving_core.topk import top_k

    model = ServingModel.load(scientific_bundle, Settings(bundle=scientific_bundle, onnx_provider="cpu"))
    catalogue = Catalogue(model)
    d, rng = model.manifest.dims, np.random.default_rng(0)

    def raw() -> dict[str, bytes]:
        return {
            f"feature_{m}": rng.standard_normal(d.feature(m)).astype(np.float32).tobytes() for m in ("text", "image")
        }

    catalogue.apply([ItemRecord(f"new-{i}", i + 1, bundle_version="another", arrays=raw()) for i in range(3)])
    catalogue.apply([ItemRecord(model.bundle.table.ids[5], 9, deleted=True)])
    snap, max_len = catalogue.current, model.max_len
    assert snap.index_rows < snap.n and snap.deleted[5]  # a tail past the index, and a delete
    live = np.flatnonzero(~snap.deleted)
    histories = [rng.choice(live, size=size) for size in (1, 3, max_len, max_len + 30, 7, 2 * max_len)]
    ks = [10, 50, 10, 7, 50, 10]
    exclude = [set(h.tolist()) for h in histories]
    exclude[3], exclude[4] = set(), {int(live[0]), snap.n - 1}
    explain = [True, False, False, True, False, False]

    def before(members: list[int], k: int, users: np.ndarray | None = None) -> object:
        """The removed copies: cut to max_len, one tower call (or the batch's user vectors), one top_k."""
        if users is None:
            users = model.towers.user.encode([histories[b][-max_len:] for b in members], snap.item_arrays())
        return top_k(
            users,
            k,
            snap.index,
            snap.scorer(),
            exclude=[exclude[b] for b in members],
            deleted=snap.deleted,
            explain=any(explain[b] for b in members),
            options=model.options,
        )

    def same(got: object, found: object, j: int) -> None:
        rows, scores = found.row(j)
        np.testing.assert_array_equal(got.rows, rows)
        np.testing.assert_array_equal(got.scores, scores)
        assert got.exact == bool(found.user_exact[j])

    served = serve(snap, histories, ks, exclude, explain)
    everyone = list(range(len(histories)))
    users = model.towers.user.encode([h[-max_len:] for h in histories], snap.item_arrays())
    for k in (10, 50, 7):  # the recommender's batch: one tower call, then one search per k
        members = [b for b in everyone if ks[b] == k]
        found = before(members, k, users[members])
        for j, b in enumerate(members):
            same(served[b], found, j)
            if any(explain[m] for m in members):
                np.testing.assert_array_equal(served[b].weights, found.weights[j])
            else:
                assert served[b].weights is None
    assert [len(s.rows) for s in served] == ks
    assert not set(served[5].rows.tolist()) & exclude[5] and not snap.deleted[served[4].rows].any()
    explain = [False] * len(histories)
    found = before(everyone, 50)  # evaluate-bundle: a batch with one k
    for b, got in enumerate(serve(snap, histories, [50] * len(histories), exclude)):
        same(got, found, b)
    for b in everyone:  # shadow scoring: one request at a time
        same(serve(snap, [histories[b]], [ks[b]], [exclude[b]])[0], before([b], ks[b]), 0)
    long, last = serve(snap, [histories[5], histories[5][-max_len:]], [10, 10], [set(), set()])
    np.testing.assert_array_equal(long.rows, last.rows)
    np.testing.assert_array_equal(long.scores, last.scores)
