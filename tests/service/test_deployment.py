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

from tests.paths import ROOT
from tests.service_helpers import make_app


def _run_fresh(script: str) -> dict:
    """Run ``script`` in a fresh interpreter (nothing imported yet); its last stdout line, parsed as JSON."""
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
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_service_runs_against_redis_cluster(
    redis_cluster, scientific_bundle, tiny_clip, tmp_path, abo_dir, abo_products
):

    app = make_app(scientific_bundle, redis_cluster, "missrec-cluster", tiny_clip, tmp_path, redis_cluster=True)
    product = abo_products[0]
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
    result = _run_fresh(script)
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


def test_ingestion_through_onnx_imports_no_torch(
    scientific_bundle, tiny_clip, tiny_clip_onnx, abo_dir, redis_url, key_prefix, tmp_path
):
    """With MISSREC_CLIP_ONNX the whole service process, ingestion included, imports neither torch nor open_clip,
    and the features it stores are open_clip's (<= 1e-4)."""
    import asyncio

    import numpy as np
    import redis.asyncio as aredis

    from clip_features.torch_encoder import ClipEncoder
    from service.store import ItemStore

    photo = sorted(abo_dir.glob("*/*.jpg"))[3]
    text = "Yoga Bag. Iron Grey. Starter."
    script = f"""
import sys, json, base64
from fastapi.testclient import TestClient
from service.app import create_app
from service.settings import Settings
app = create_app(Settings(bundle={str(scientific_bundle)!r}, redis_url={redis_url!r}, key_prefix={key_prefix!r},
                          clip_onnx={str(tiny_clip_onnx)!r}, data_dir={str(tmp_path)!r}))
image = base64.b64encode(open({str(photo)!r}, "rb").read()).decode()
with TestClient(app) as c:
    ready = c.get("/readyz").json()["checks"]["ingestion"]
    ingest = c.post("/v1/items", json={{"item_id": "onnx-new", "text": {text!r}, "image_base64": image}})
    bad = c.post("/v1/items", json={{"item_id": "onnx-bad", "image_base64": base64.b64encode(b"no image").decode()}})
    rec = c.post("/v1/recommend", json={{"history": ["onnx-new"], "k": 5}})
    info = c.get("/v1/items/onnx-new").json()
print(json.dumps({{"torch": "torch" in sys.modules, "open_clip": "open_clip" in sys.modules, "ready": ready,
                  "ingest": ingest.status_code, "bad": [bad.status_code, bad.json()["error"]["code"]],
                  "rec": [rec.status_code, len(rec.json()["items"])], "source": info["source"]}}))
"""
    result = _run_fresh(script)
    assert result == {
        "torch": False,
        "open_clip": False,
        "ready": "ok",
        "ingest": 201,
        "bad": [422, "invalid_image"],
        "rec": [200, 5],
        "source": "ingested",
    }

    async def stored():
        client = aredis.Redis.from_url(redis_url)
        try:
            return await ItemStore(client, prefix=key_prefix).get_item("onnx-new")
        finally:
            await client.aclose()

    record = asyncio.run(stored())
    expected = ClipEncoder(*tiny_clip).encode_item(text, photo.read_bytes())
    for modality in ("text", "image"):
        got = np.frombuffer(record.arrays[f"feature_{modality}"], dtype=np.float32)
        assert np.abs(got - expected[modality]).max() <= 1e-4, modality


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"clip_model": "ViT-B-32"}, r"MISSREC_CLIP_MODEL=ViT-B-32 contradicts MISSREC_CLIP_ONNX \(missrec-tiny-512\)"),
        ({"clip_pretrained": "openai"}, "MISSREC_CLIP_PRETRAINED=openai is not the weights MISSREC_CLIP_ONNX was"),
        ({"clip_pretrained": None}, "MISSREC_CLIP_PRETRAINED is unset"),
    ],
)
def test_contradictory_clip_settings_refuse_to_start(
    scientific_bundle, tiny_clip_onnx, redis_url, key_prefix, tmp_path, overrides, expected
):
    from service.app import create_app
    from service.replication import StartupRefused
    from service.settings import Settings

    settings = Settings(
        bundle=scientific_bundle,
        redis_url=redis_url,
        key_prefix=key_prefix,
        clip_onnx=tiny_clip_onnx,
        data_dir=tmp_path,
        warmup=False,
        **overrides,
    )
    with pytest.raises(StartupRefused, match=expected), TestClient(create_app(settings)):
        pass


def test_clip_onnx_of_the_same_weights_starts_and_other_widths_refuse(tiny_clip, tiny_clip_onnx, tmp_path):
    """The explicit checkpoint the graphs came from is accepted (same sha256); a CLIP width other than the bundle's is
    refused; a damaged directory is refused (not silently ingestion-off)."""
    import shutil

    from service.replication import StartupRefused
    from service.settings import Settings
    from service.state import load_onnx_encoder

    same = Settings(clip_onnx=tiny_clip_onnx, clip_model=tiny_clip[0], clip_pretrained=tiny_clip[1])
    assert load_onnx_encoder(same, 512).dim == 512
    with pytest.raises(StartupRefused, match="gives 512-d features, the bundle takes 768"):
        load_onnx_encoder(Settings(clip_onnx=tiny_clip_onnx), 768)
    copy = Path(shutil.copytree(tiny_clip_onnx, tmp_path / "clip"))
    (copy / "image_encoder.onnx").write_bytes(b"damaged")
    with pytest.raises(StartupRefused, match="does not match its sha256"):
        load_onnx_encoder(Settings(clip_onnx=copy), 512)
