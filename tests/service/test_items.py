"""The read endpoints behind the console, on the real Scientific bundle and real Redis: GET /v1/items?q= (search),
GET /v1/items/{id}/similar (checked against brute-force fused scoring), /image (thumbnails of ingested photos),
GET /v1/status (the overview), and the console's static files."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from fastapi.testclient import TestClient

from tests.paths import ROOT
from tests.service_helpers import make_app


@pytest.fixture
def client(scientific_bundle, redis_url, key_prefix, tiny_clip, tmp_path):
    with TestClient(make_app(scientific_bundle, redis_url, key_prefix, tiny_clip, tmp_path)) as c:
        yield c


@pytest.fixture(scope="module")
def table(scientific_bundle):
    """ids, texts and the unit text/image vectors of the bundle, read from its files."""
    from serving_core.towers import load_towers

    towers = load_towers(scientific_bundle, "cpu")
    t = towers.table
    return t.ids, t.texts, t.vectors, towers.manifest.scorer


def brute_force_similar(table, row: int, k: int, deleted: set[int] = frozenset()) -> tuple[list[str], np.ndarray]:
    """Independent oracle: q = unit(mean of the item's text and image vectors), fused score against every item."""
    ids, _, vectors, scorer = table
    t, v = vectors["text"], vectors["image"]
    q = (t[row] + v[row]) / 2
    q = q / np.linalg.norm(q)
    s_t, s_v = t @ q, v @ q
    w_t = 1 / (1 + np.exp(-scorer.fusion.alpha * (s_t - s_v)))  # softmax of alpha*[s_t, s_v], text side
    scores = (w_t * s_t + (1 - w_t) * s_v).astype(np.float64)
    scores[[0, row, *deleted]] = -np.inf
    order = np.lexsort((np.arange(scores.size), -scores))[:k]
    return [ids[r] for r in order], scores[order]


def test_similar_is_the_exact_fused_top_k_of_the_items_own_vector(client, table):
    ids, _, _, scorer = table
    assert scorer.kind == "missrec_fusion" and not scorer.fusion.transductive
    for row in (1, 200, len(ids) - 1):
        body = client.get(f"/v1/items/{ids[row]}/similar", params={"k": 25, "explain": "true"}).json()
        want, scores = brute_force_similar(table, row, 25)
        got = [i["item_id"] for i in body["items"]]
        assert got == want and ids[row] not in got and len(got) == 25
        assert np.allclose([i["score"] for i in body["items"]], scores, atol=1e-4)
        assert body["exact"] is True and body["item_id"] == ids[row]
        weights = [i["explanation"]["text_weight"] + i["explanation"]["image_weight"] for i in body["items"]]
        assert np.allclose(weights, 1.0, atol=1e-5)
    assert len(client.get(f"/v1/items/{ids[1]}/similar").json()["items"]) == 10  # default k


def test_similar_never_returns_deleted_items_and_still_k(client, table):
    ids = table[0]
    first = [i["item_id"] for i in client.get(f"/v1/items/{ids[7]}/similar", params={"k": 5}).json()["items"]]
    for gone in first[:2]:
        assert client.delete(f"/v1/items/{gone}").status_code == 204
    again = [i["item_id"] for i in client.get(f"/v1/items/{ids[7]}/similar", params={"k": 5}).json()["items"]]
    want, _ = brute_force_similar(table, 7, 5, {ids.index(g) for g in first[:2]})
    assert again == want and len(again) == 5 and not set(first[:2]) & set(again)
    r = client.get(f"/v1/items/{first[0]}/similar")  # a deleted item has no neighbours: it does not exist
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


@pytest.mark.parametrize(
    ("query", "status"),
    [("k=0", 422), ("k=1001", 422), ("k=ten", 422), ("explain=maybe", 422)],
)
def test_similar_bad_parameters_are_4xx(client, table, query, status):
    r = client.get(f"/v1/items/{table[0][1]}/similar?{query}")
    assert r.status_code == status and r.json()["error"]["code"] == "invalid_input", r.text


def test_similar_of_an_unknown_item_is_404(client):
    r = client.get("/v1/items/no-such-item/similar")
    assert r.status_code == 404 and r.json()["error"]["message"] == "item 'no-such-item' does not exist"


def test_search_matches_every_word_in_the_real_texts(client, table):
    ids, texts, _, _ = table
    body = client.get("/v1/items", params={"q": "Gorilla glue", "limit": 100}).json()
    want = [i for i, t in zip(ids[1:], texts[1:], strict=True) if "gorilla" in t.lower() and "glue" in t.lower()]
    assert body["total"] == len(want) > 0
    assert sorted(i["item_id"] for i in body["items"]) == sorted(want)
    assert all("gorilla glue" in i["text"].lower() for i in body["items"][:1])  # the phrase ranks first
    exact = client.get("/v1/items", params={"q": ids[3]}).json()  # an id matches itself, first
    assert exact["items"][0]["item_id"] == ids[3] and exact["items"][0]["source"] == "bundle"
    few = client.get("/v1/items", params={"q": "a", "limit": 3}).json()
    assert len(few["items"]) == 3 and few["total"] > 3


@pytest.mark.parametrize("query", ["", "q=", "q=%20%20", "q=glue&limit=0", "q=glue&limit=101", "q=" + "x" * 257])
def test_search_bad_input_is_422(client, query):
    r = client.get(f"/v1/items?{query}")
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_input", r.text


def test_search_and_status_follow_ingest_and_delete(client, table, abo_dir, abo_products):
    ids = table[0]
    product = abo_products[0]
    before = client.get("/v1/status").json()
    assert before["catalogue"] == {
        "bundle_items": len(ids) - 1,
        "ingested": 0,
        "deleted": 0,
        "live": len(ids) - 1,
        "seq": before["catalogue"]["seq"],
    }
    with product["images"][0].open("rb") as fh:
        r = client.post(
            "/v1/items", data={"item_id": "abo-photo", "text": product["text"]}, files={"image": ("p.jpg", fh)}
        )
    assert r.status_code == 201, r.text
    word = product["text"].split()[0]
    assert "abo-photo" in [i["item_id"] for i in client.get("/v1/items", params={"q": word}).json()["items"]]
    assert client.delete(f"/v1/items/{ids[1]}").status_code == 204
    assert ids[1] not in [i["item_id"] for i in client.get("/v1/items", params={"q": ids[1]}).json()["items"]]
    client.post("/v1/recommend", json={"history": ids[2:5], "k": 5})
    after = client.get("/v1/status").json()
    assert after["catalogue"]["ingested"] == 1 and after["catalogue"]["deleted"] == 1
    assert after["catalogue"]["live"] == len(ids) - 1 and after["ingest"]["created"] == 1
    assert after["model"]["kind"] == "missrec" and after["model"]["modalities"] == ["text", "image"]
    assert after["checks"]["redis"] == "ok" and after["checks"]["ingestion"] == "ok"
    for stage in ("request", "queue", "user_tower", "search", "ingest_encode"):
        hist = after["stages"][stage]
        assert hist["count"] >= 1 and hist["cumulative_counts"][-1] == hist["count"]
        assert len(hist["cumulative_counts"]) == len(hist["upper_bounds"]) + 1
    assert after["batch_size"]["count"] >= 1 and after["requests"]["/v1/recommend"] >= 1


def test_thumbnail_of_an_ingested_photo(client, table, abo_dir, abo_products):
    from PIL import Image

    product = abo_products[1]
    photo = product["images"][0]
    with photo.open("rb") as fh:
        r = client.post("/v1/items", data={"item_id": "abo-thumb"}, files={"image": (photo.name, fh)})
    assert r.status_code == 201, r.text
    assert client.get("/v1/items/abo-thumb").json()["has_image"] is True
    r = client.get("/v1/items/abo-thumb/image")
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    thumb, original = Image.open(io.BytesIO(r.content)), Image.open(photo)
    assert max(thumb.size) == 192 and abs(thumb.size[0] / thumb.size[1] - original.size[0] / original.size[1]) < 0.02
    bundle_item = client.get(f"/v1/items/{table[0][1]}/image")
    assert bundle_item.status_code == 404 and bundle_item.json()["error"]["code"] == "no_image"
    assert client.get("/v1/items/nothing-here/image").json()["error"]["code"] == "not_found"


def test_an_upload_is_decoded_once_and_encodes_as_its_bytes_do(
    scientific_bundle, tiny_clip, abo_dir, monkeypatch, abo_products
):
    """The ingest path decodes the image once (Pillow opens the bytes as often as one decode does, not twice as
    often) and the encoder and thumbnail take that picture: the features are exactly those of the raw bytes, and a
    photo's thumbnail is the one made from a full decode of it."""
    from PIL import Image

    from clip_features.preprocess import decode_image
    from clip_features.torch_encoder import ClipEncoder
    from service.serving_model import ServingModel
    from service.settings import Settings
    from service.thumbnail import thumbnail
    from service.usecases import _embed

    model = ServingModel.load(scientific_bundle, Settings(bundle=scientific_bundle, onnx_provider="cpu"))
    encoder = ClipEncoder(*tiny_clip)
    product = abo_products[2]
    photo = product["images"][0].read_bytes()
    opened, real_open = [], Image.open
    monkeypatch.setattr(Image, "open", lambda *a, **kw: opened.append(1) or real_open(*a, **kw))
    decode_image(photo)
    once, opened[:] = len(opened), []
    record = _embed(model, encoder, "once", product["text"], photo)
    assert len(opened) == once > 0
    expected = encoder.encode_item(product["text"], photo)
    for m in ("text", "image"):
        np.testing.assert_array_equal(np.frombuffer(record.arrays[f"feature_{m}"], dtype=np.float32), expected[m])
    assert record.thumbnail == thumbnail(decode_image(photo))


def test_console_is_served_from_the_package(client):
    page = client.get("/console/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert '<main id="main"' in page.text and 'src="console.js"' in page.text
    assert "script-src 'self'" in page.headers["content-security-policy"]
    for asset in ("console.js", "console.css"):
        assert client.get(f"/console/{asset}").status_code == 200
    assert client.get("/console", follow_redirects=False).status_code in (307, 308)
    spec = client.get("/openapi.json").json()
    assert "/v1/items/{item_id}/similar" in spec["paths"] and "/v1/status" in spec["paths"]
    json.dumps(spec)


def test_every_console_file_is_package_data():
    """The console ships in the wheel: pyproject's package-data globs cover every file of service/console/."""
    import tomllib

    root = ROOT
    globs = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["service"]
    files = [p.relative_to(root / "service") for p in (root / "service" / "console").rglob("*") if p.is_file()]
    assert files and all(any(f.match(g) for g in globs) for f in files), (files, globs)


def test_item_search_has_its_own_concurrency_bound(scientific_bundle, redis_url, key_prefix, tiny_clip, tmp_path):
    """At most MISSREC_SEARCH_CONCURRENCY scans run at once (each holds the GIL the recommend path needs), at most
    MISSREC_SEARCH_QUEUE wait; beyond that 503 ``overloaded`` at once, and recommendations are not refused."""
    import threading

    app = make_app(scientific_bundle, redis_url, key_prefix, tiny_clip, tmp_path, search_concurrency=1, search_queue=0)
    with TestClient(app) as c:
        gate = c.app.state.service.search_gate
        release = threading.Event()
        held = c.portal.start_task_soon(gate.run, release.wait, 30)  # a search slot held until released
        try:
            while not (gate._sem is not None and gate._sem.locked()):
                threading.Event().wait(0.01)
            busy = c.get("/v1/items", params={"q": "glue"})
            assert busy.status_code == 503 and busy.json()["error"]["code"] == "overloaded", busy.text
            assert busy.headers["retry-after"] == "1"
            assert c.post("/v1/recommend", json={"history": ["B00O47ILVA"], "k": 3}).status_code == 200
        finally:
            release.set()
            held.result(30)
        assert c.get("/v1/items", params={"q": "glue"}).status_code == 200
