"""Deployment properties: Redis Cluster, no torch on the recommend path, micro-batching under concurrency."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import redis
from fastapi.testclient import TestClient

from tests.service_helpers import make_app

ROOT = Path(__file__).resolve().parents[1]


def test_service_runs_against_redis_cluster(redis_cluster, scientific_bundle, tiny_clip, tmp_path, abo_dir):
    from tests.service_helpers import abo_products

    app = make_app(scientific_bundle, redis_cluster, "missrec-cluster", tiny_clip, tmp_path, redis_cluster=True)
    product = abo_products(abo_dir)[0]
    users = [f"cluster-user-{i}" for i in range(20)]  # spread over many slots
    with TestClient(app) as client:
        for u in users:
            r = client.post(
                f"/v1/users/{u}/events",
                json={"item_ids": ["B00O47ILVA", "B006ATU73A"]},
                headers={"Idempotency-Key": f"k-{u}"},
            )
            assert r.status_code == 200, r.text
            again = client.post(
                f"/v1/users/{u}/events",
                json={"item_ids": ["B00O47ILVA", "B006ATU73A"]},
                headers={"Idempotency-Key": f"k-{u}"},
            )
            assert again.json()["duplicate"] is True
        for u in users:  # without an idempotency key too (its placeholder key must share the user's slot)
            r = client.post(f"/v1/users/{u}/events", json={"item_ids": ["B006ATU73A"]})
            assert r.status_code == 200 and r.json()["history_length"] == 3, r.text
        assert client.get(f"/v1/users/{users[3]}/history").json()["item_ids"] == [
            "B00O47ILVA",
            "B006ATU73A",
            "B006ATU73A",
        ]
        assert len(client.post("/v1/recommend", json={"user_id": users[5], "k": 5}).json()["items"]) == 5
        r = client.post(
            "/v1/items",
            data={"item_id": "cluster-item", "text": product["text"]},
            files={"image": ("p.jpg", product["images"][0].read_bytes(), "image/jpeg")},
        )
        assert r.status_code == 201, r.text
        assert client.get("/v1/readyz".replace("/v1", "")).status_code == 200
    with TestClient(
        make_app(scientific_bundle, redis_cluster, "missrec-cluster", tiny_clip, tmp_path, redis_cluster=True)
    ) as client:  # replay from the cluster on restart
        assert client.get("/v1/items/cluster-item").json()["source"] == "ingested"
    # every user's keys live in one slot; item keys share the {items} slot
    node = redis.RedisCluster.from_url(redis_cluster)
    keys = [k.decode() for k in node.scan_iter(match="missrec-cluster:*")]
    assert any(":{items}:" in k for k in keys) and any(":u:{" in k for k in keys)
    node.close()


def test_recommend_path_never_imports_torch(scientific_bundle, redis_url, tmp_path):
    """With ingestion disabled the service process serves recommendations without importing torch."""
    script = f"""
import sys, json
from fastapi.testclient import TestClient
from service.app import create_app
from service.settings import Settings
app = create_app(Settings(bundle={str(scientific_bundle)!r}, redis_url={redis_url!r}, key_prefix="missrec-notorch",
                          clip_pretrained=None, data_dir={str(tmp_path)!r}))
with TestClient(app) as c:
    c.post("/v1/users/nt/events", json={{"item_ids": ["B00O47ILVA"]}})
    a = c.post("/v1/recommend", json={{"user_id": "nt", "k": 5}}).json()
    b = c.post("/v1/recommend", json={{"history": ["B00O47ILVA"], "k": 5, "explain": True}}).json()
    ingest = c.post("/v1/items", json={{"item_id": "x", "text": "t"}})
print(json.dumps({{"torch": "torch" in sys.modules, "a": len(a["items"]), "b": len(b["items"]),
                  "ingest": ingest.status_code, "code": ingest.json()["error"]["code"]}}))
"""
    out = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
        check=False,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result == {"torch": False, "a": 5, "b": 5, "ingest": 501, "code": "ingestion_disabled"}


def test_concurrent_requests_are_micro_batched(scientific_bundle, redis_url, key_prefix, tiny_clip, tmp_path):
    import asyncio

    import httpx

    app = make_app(scientific_bundle, redis_url, key_prefix, tiny_clip, tmp_path, max_wait_ms=20.0, max_batch_size=16)

    async def burst():
        transport = httpx.ASGITransport(app=app)
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(transport=transport, base_url="http://t") as client,
        ):
            bodies = [{"history": ["B00O47ILVA", "B006ATU73A"][: 1 + i % 2], "k": 5} for i in range(48)]
            responses = await asyncio.gather(*(client.post("/v1/recommend", json=b) for b in bodies))
            assert all(r.status_code == 200 for r in responses)
            return (await client.get("/metrics")).text

    text = asyncio.run(burst())  # lifespan and requests in one event loop
    count = float(next(line.split()[-1] for line in text.splitlines() if line.startswith("missrec_batch_size_count")))
    total = float(next(line.split()[-1] for line in text.splitlines() if line.startswith("missrec_batch_size_sum")))
    assert total >= 48 and count < total, f"{count} batches for {total} requests: nothing was batched"


def test_ann_bundle_takes_search_params_and_caps_candidates(scientific_bundle, tmp_path):
    import shutil

    import faiss

    from index_builder.build import build_index
    from service.serving_model import ServingModel
    from service.settings import Settings
    from serving_core.bundle import BundleError

    ivf = tmp_path / "ivf"
    shutil.copytree(scientific_bundle, ivf)
    build_index(ivf, "IVF16,Flat", "cpu", progress=False)
    settings = Settings(bundle=ivf, index_params={"nprobe": 5}, max_candidates=64)
    model = ServingModel.load(ivf, settings)
    opts = model.options
    assert not opts.exact_index and opts.max_candidates == 64 and opts.initial_width == 64  # IVF: one scan
    assert faiss.extract_index_ivf(model.index).nprobe == 5
    exact = ServingModel.load(scientific_bundle, Settings(bundle=scientific_bundle, max_candidates=64)).options
    assert exact.exact_index and exact.max_candidates is None and exact.initial_width is None  # never capped
    with pytest.raises(BundleError, match="MISSREC_INDEX_PARAMS"):
        ServingModel.load(ivf, Settings(bundle=ivf, index_params={"efSearch": 16}))
