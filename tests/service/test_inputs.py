"""Bad input gets a clear 4xx JSON error of the one error shape, never a 500."""

from __future__ import annotations

import io
import json
from urllib.parse import quote

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from tests.service_helpers import make_app


@pytest.fixture(scope="module")
def client(scientific_bundle, redis_url, tiny_clip, tmp_path_factory):
    import uuid

    prefix = f"missrec-test-{uuid.uuid4().hex[:10]}"
    app = make_app(
        scientific_bundle,
        redis_url,
        prefix,
        tiny_clip,
        tmp_path_factory.mktemp("inputs"),
        max_image_bytes=200_000,
        max_body_bytes=1_000_000,
    )
    with TestClient(app) as c:
        yield c


def _error(r, status: int, code: str | None = None) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and {"code", "message", "details"} <= set(body["error"])
    assert body["error"]["message"]
    if code:
        assert body["error"]["code"] == code
    return body["error"]


@pytest.mark.parametrize(
    ("payload", "status"),
    [
        ({"history": ["B00O47ILVA"], "k": 0}, 422),
        ({"history": ["B00O47ILVA"], "k": 10**6}, 422),
        ({"history": ["B00O47ILVA"], "k": "ten"}, 422),
        ({"history": ["B00O47ILVA"], "k": 1.5}, 422),
        ({"k": 10}, 422),
        ({"user_id": "u", "history": ["B00O47ILVA"]}, 422),
        ({"user_id": ""}, 422),
        ({"user_id": "bad\x00id"}, 422),
        ({"history": ["B00O47ILVA"] * 1001}, 422),
        ({"history": ["B00O47ILVA"], "unexpected": 1}, 422),
    ],
)
def test_recommend_schema_errors(client, payload, status):
    _error(client.post("/v1/recommend", json=payload), status, "invalid_input")


def test_malformed_json(client):
    r = client.post("/v1/recommend", content=b'{"history": ["a"', headers={"content-type": "application/json"})
    _error(r, 422, "invalid_input")


def test_unknown_ids_are_named(client):
    err = _error(
        client.post("/v1/recommend", json={"history": ["B00O47ILVA", "nope-1", "nope-2"]}), 422, "unknown_items"
    )
    assert err["details"]["item_ids"] == ["nope-1", "nope-2"]
    err = _error(client.post("/v1/users/u1/events", json={"item_ids": ["B00O47ILVA", "zzz"]}), 422, "unknown_items")
    assert err["details"]["item_ids"] == ["zzz"]
    # exclude: an unknown or deleted id can never be recommended, so it is ignored (issue 12: it failed the call)
    assert client.post("/v1/recommend", json={"history": ["B00O47ILVA"], "exclude": ["zzz"]}).status_code == 200


def test_nan_and_inf_are_rejected(client):
    for literal in ("NaN", "Infinity", "-Infinity"):
        body = '{"item_ids": ["B00O47ILVA"], "timestamps": [' + literal + "]}"
        r = client.post("/v1/users/u1/events", content=body, headers={"content-type": "application/json"})
        _error(r, 422, "invalid_input")
    _error(client.post("/v1/users/u1/events", json={"item_ids": ["B00O47ILVA"], "timestamps": [1, 2]}), 422)


def test_unicode_ids_round_trip(client):
    user = "usér-😀-דוד-\u200b"
    assert client.post(f"/v1/users/{user}/events", json={"item_ids": ["B00O47ILVA"]}).status_code == 200
    assert client.get(f"/v1/users/{user}/history").json()["item_ids"] == ["B00O47ILVA"]


def _png(size=(64, 64)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buf, format="PNG")
    return buf.getvalue()


def test_items_bad_inputs(client):
    _error(
        client.post("/v1/items", content=b"x", headers={"content-type": "text/plain"}), 415, "unsupported_media_type"
    )
    _error(
        client.post(
            "/v1/items",
            data={"item_id": "x1", "text": "t"},
            files={"image": ("a.jpg", b"definitely not an image", "image/jpeg")},
        ),
        422,
        "invalid_image",
    )
    _error(
        client.post(
            "/v1/items", data={"item_id": "x1", "text": "t"}, files={"image": ("a.png", b"\0" * 300_000, "image/png")}
        ),
        413,
        "payload_too_large",
    )
    _error(client.post("/v1/items", json={"item_id": "x2", "image_base64": "@@not-base64@@"}), 422)
    _error(client.post("/v1/items", json={"item_id": "x3"}), 422)  # neither text nor image
    _error(client.post("/v1/items", json={"text": "no id"}), 422)
    _error(client.post("/v1/items", data={"item_id": "bad\x01id", "text": "t"}), 422)
    # a decompression bomb: a tiny PNG that claims 20000 x 20000 pixels
    bomb = io.BytesIO()
    Image.new("1", (20000, 20000)).save(bomb, format="PNG")
    assert len(bomb.getvalue()) < 200_000
    _error(
        client.post(
            "/v1/items", data={"item_id": "bomb", "text": "t"}, files={"image": ("b.png", bomb.getvalue(), "image/png")}
        ),
        422,
        "invalid_image",
    )
    assert client.get("/v1/items/bomb").status_code == 404  # nothing was added


def test_json_ingest_with_base64(client):
    import base64

    r = client.post(
        "/v1/items", json={"item_id": "b64-1", "text": "red square", "image_base64": base64.b64encode(_png()).decode()}
    )
    assert r.status_code == 201, r.text
    assert r.headers["location"] == "/v1/items/b64-1"


def test_the_image_byte_limit_is_one_for_both_readers(client):
    """MISSREC_MAX_IMAGE_BYTES (200,000 here) exactly: a multipart file and base64 JSON of the limit are read (and
    refused as images), one byte more is 413 from either."""
    import base64

    for size, status, code in ((200_000, 422, "invalid_image"), (200_001, 413, "payload_too_large")):
        data = b"\0" * size
        form = client.post("/v1/items", data={"item_id": "lim", "text": "t"}, files={"image": ("a.png", data)})
        _error(form, status, code)
        body = {"item_id": "lim", "text": "t", "image_base64": base64.b64encode(data).decode()}
        _error(client.post("/v1/items", json=body), status, code)
    assert client.get("/v1/items/lim").status_code == 404


def test_body_limit_and_missing_resources(client):
    _error(
        client.post(
            "/v1/recommend", content=b"{" + b" " * 1_100_000 + b"}", headers={"content-type": "application/json"}
        ),
        413,
        "payload_too_large",
    )
    _error(client.get("/v1/items/does-not-exist"), 404, "not_found")
    _error(client.delete("/v1/items/does-not-exist"), 404, "not_found")
    _error(client.get("/v1/nothing-here"), 404)
    _error(client.put("/v1/recommend", json={}), 405)


def test_health_endpoints(client):
    assert client.get("/healthz").json() == {"status": "ok", "checks": {}}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["checks"]["redis"] == "ok"
    client.post("/v1/recommend", json={"history": ["B00O47ILVA"], "k": 3})
    text = client.get("/metrics").text
    for stage in ("user_tower", "search", "request"):
        assert f'missrec_stage_seconds_count{{stage="{stage}"}}' in text
    assert "missrec_batch_size_count" in text


def test_openapi_documents_every_route(client):
    spec = client.get("/openapi.json").json()
    paths = set(spec["paths"])
    assert {
        "/v1/recommend",
        "/v1/recommend/batch",
        "/v1/users/{user_id}/events",
        "/v1/users/{user_id}/history",
        "/v1/items",
        "/v1/items/{item_id}",
        "/healthz",
        "/readyz",
        "/metrics",
    } <= paths
    body = spec["paths"]["/v1/items"]["post"]["requestBody"]["content"]
    assert {"multipart/form-data", "application/json"} <= set(body)
    json.dumps(spec)


def test_batch_recommend_mixes_results_and_errors(client):
    r = client.post(
        "/v1/recommend/batch",
        json={
            "requests": [
                {"history": ["B00O47ILVA"], "k": 2},
                {"history": ["unknown-item"], "k": 2},
            ]
        },
    )
    assert r.status_code == 200
    first, second = r.json()["results"]
    assert len(first["items"]) == 2
    assert second["error"]["code"] == "unknown_items"


def test_api_key_protects_writes(scientific_bundle, redis_url, key_prefix, tiny_clip, tmp_path):
    app = make_app(scientific_bundle, redis_url, key_prefix, tiny_clip, tmp_path, api_key="s3cret")
    with TestClient(app) as c:
        _error(c.post("/v1/users/u/events", json={"item_ids": ["B00O47ILVA"]}), 401, "unauthorized")
        _error(c.post("/v1/users/u/events", json={"item_ids": ["B00O47ILVA"]}, headers={"X-API-Key": "nope"}), 401)
        ok = c.post("/v1/users/u/events", json={"item_ids": ["B00O47ILVA"]}, headers={"X-API-Key": "s3cret"})
        assert ok.status_code == 200
        _error(c.delete("/v1/items/B00O47ILVA"), 401)
        assert c.post("/v1/recommend", json={"user_id": "u", "k": 2}).status_code == 200  # reads stay open


def test_wrong_content_types_get_415(client):
    calls = {
        "/v1/recommend": {"history": ["B00O47ILVA"], "k": 2},
        "/v1/recommend/batch": {"requests": [{"history": ["B00O47ILVA"], "k": 2}]},
        "/v1/users/ctype-user/events": {"item_ids": ["B00O47ILVA"]},
    }
    for route, payload in calls.items():
        body = json.dumps(payload)
        for media in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", ""):
            err = _error(
                client.post(route, content=body, headers={"content-type": media}), 415, "unsupported_media_type"
            )
            assert "application/json" in err["message"]
        ok = client.post(route, content=body, headers={"content-type": "application/json; charset=utf-8"})
        assert ok.status_code == 200, ok.text
    item = json.dumps({"item_id": "ct-1", "text": "t"})
    _error(client.post("/v1/items", content=item, headers={"content-type": ""}), 415, "unsupported_media_type")
    _error(client.post("/v1/items", content=item, headers={"content-type": "multipart/form-data"}), 422)  # no boundary


def test_json_ingest_rejects_non_images_bombs_and_truncated_photos(client, abo_dir):
    import base64

    def ingest(data: bytes):
        return client.post(
            "/v1/items", json={"item_id": "b64-bad", "text": "t", "image_base64": base64.b64encode(data).decode()}
        )

    err = _error(ingest(b"%PDF-1.4 not an image at all"), 422, "invalid_image")
    assert "not a supported image" in err["message"]
    bomb = io.BytesIO()
    Image.new("1", (20000, 20000)).save(bomb, format="PNG")  # 400 Mpx in a few kB
    err = _error(ingest(bomb.getvalue()), 422, "invalid_image")
    assert "decompression bomb" in err["message"]
    tiff = io.BytesIO()
    Image.new("RGB", (8, 8)).save(tiff, format="TIFF")  # a real image, but not an allowed format
    assert "not a supported image" in _error(ingest(tiff.getvalue()), 422, "invalid_image")["message"]
    photo = sorted(abo_dir.glob("*/*.jpg"))[0].read_bytes()  # a real ABO product photo, cut short
    assert "corrupt or truncated" in _error(ingest(photo[: len(photo) // 2]), 422, "invalid_image")["message"]
    assert client.get("/v1/items/b64-bad").status_code == 404  # nothing was stored


def test_huge_histories_are_capped_or_refused(client):
    import uuid

    ids = [i for i in client.post("/v1/recommend", json={"history": [], "k": 1000}).json()["items"]]
    ids = [i["item_id"] for i in ids]
    user = f"huge-{uuid.uuid4().hex[:8]}"
    r = client.post(f"/v1/users/{user}/events", json={"item_ids": ids})  # the most one call accepts
    assert r.status_code == 200 and r.json()["appended"] == 1000 and r.json()["history_length"] == 50
    assert client.get(f"/v1/users/{user}/history").json()["item_ids"] == ids[-50:]  # the newest 50, in order
    explicit = client.post("/v1/recommend", json={"history": ids, "k": 5, "exclude_seen": False}).json()
    by_user = client.post("/v1/recommend", json={"user_id": user, "k": 5, "exclude_seen": False}).json()
    assert explicit["items"] == by_user["items"]  # a long explicit history is read like the stored one: its last 50
    _error(client.post(f"/v1/users/{user}/events", json={"item_ids": ids + ids[:1]}), 422, "invalid_input")


def test_k_bounds(client):
    r = client.post("/v1/recommend", json={"history": ["B00O47ILVA"], "k": 1000})
    assert r.status_code == 200 and len(r.json()["items"]) == 1000
    for bad in ("1001", "0", "-1", "NaN", "Infinity", "-Infinity", "1e400", "null", '"many"', "[5]"):
        body = '{"history": ["B00O47ILVA"], "k": ' + bad + "}"
        _error(client.post("/v1/recommend", content=body, headers={"content-type": "application/json"}), 422)


def test_limits_from_settings_are_enforced(scientific_bundle, redis_url, key_prefix, tiny_clip, tmp_path):
    """MISSREC_MAX_K and MISSREC_MAX_HISTORY lower the schema's bounds (they were accepted and then ignored)."""
    app = make_app(scientific_bundle, redis_url, key_prefix, tiny_clip, tmp_path, max_k=5, max_history=3, warmup=False)
    history = ["B00O47ILVA", "B006ATU73A", "B00O47ILVA"]
    with TestClient(app) as c:
        assert len(c.post("/v1/recommend", json={"history": history, "k": 5}).json()["items"]) == 5
        assert len(c.post("/v1/recommend", json={"history": history}).json()["items"]) == 5  # default 10 -> 5
        err = _error(c.post("/v1/recommend", json={"history": history, "k": 6}), 422, "invalid_input")
        assert err["details"] == {"k": 6, "max_k": 5}
        err = _error(c.post("/v1/recommend", json={"history": [*history, "B006ATU73A"]}), 422, "invalid_input")
        assert err["details"] == {"history_length": 4, "max_history": 3}
        batch = c.post(
            "/v1/recommend/batch", json={"requests": [{"history": history, "k": 2}, {"user_id": "u", "k": 9}]}
        )
        first, second = batch.json()["results"]
        assert len(first["items"]) == 2 and second["error"]["code"] == "invalid_input"
    with pytest.raises(ValueError, match="max_k"):
        make_app(scientific_bundle, redis_url, key_prefix, tiny_clip, tmp_path, max_k=1001)  # above the schema


def test_odd_ids_round_trip(client):
    """Ids are opaque strings: slashes, RTL marks, zero-width and astral characters work everywhere, and NFC / NFD
    spellings are different ids (no silent normalisation). (No "%" here: TestClient unquotes paths twice.)"""
    user = "tenant/42/usér-😀-\u200f"
    assert client.post(f"/v1/users/{quote(user, safe='')}/events", json={"item_ids": ["B00O47ILVA"]}).status_code == 200
    assert client.get(f"/v1/users/{quote(user, safe='')}/history").json()["item_ids"] == ["B00O47ILVA"]
    assert client.post("/v1/recommend", json={"user_id": user, "k": 2}).json()["history_length"] == 1
    nfc, nfd = "caf\u00e9/ü", "cafe\u0301/u\u0308"
    r = client.post("/v1/items", json={"item_id": nfc, "text": "a unicode item"})
    assert r.status_code == 201 and r.headers["location"] == f"/v1/items/{quote(nfc, safe='')}"
    assert client.get(r.headers["location"]).json()["item_id"] == nfc
    _error(client.get(f"/v1/items/{quote(nfd, safe='')}"), 404, "not_found")
    body = client.post("/v1/recommend", json={"history": [nfc], "k": 3}).json()
    assert body["history_length"] == 1 and nfc not in [i["item_id"] for i in body["items"]]
    _error(client.post("/v1/recommend", json={"history": [nfd]}), 422, "unknown_items")


def test_concurrent_encodes_are_bounded(scientific_bundle, redis_url, key_prefix, tiny_clip, tmp_path, abo_dir):
    """One encoder slot and no queue: of 8 simultaneous ingests, those that find the encoder busy get 503
    ``overloaded`` at once (each encode holds a decoded image; unbounded, a burst of uploads exhausts memory)."""
    import threading

    photo = sorted(abo_dir.glob("*/*.jpg"))[0].read_bytes()
    app = make_app(
        scientific_bundle,
        redis_url,
        key_prefix,
        tiny_clip,
        tmp_path,
        ingest_concurrency=1,
        ingest_queue=0,
        warmup=False,
    )
    statuses: list[tuple[int, str | None]] = []
    with TestClient(app) as c:
        start = threading.Barrier(8)

        def ingest(n: int) -> None:
            start.wait()
            r = c.post("/v1/items", data={"item_id": f"burst-{n}", "text": "t"}, files={"image": ("p.jpg", photo)})
            statuses.append((r.status_code, r.json().get("error", {}).get("code") if r.status_code >= 400 else None))

        threads = [threading.Thread(target=ingest, args=(n,)) for n in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    assert set(statuses) <= {(201, None), (503, "overloaded")}, statuses
    assert (503, "overloaded") in statuses and (201, None) in statuses, statuses


def test_chunked_bodies_over_the_limit_get_413(client):
    """No Content-Length (chunked upload): the limit trips while the body streams in (before: FastAPI turned the
    middleware's exception into 400 "There was an error parsing the body")."""

    def chunks(first: bytes, fill: bytes = b" "):
        yield first
        for _ in range(12):
            yield fill * 100_000

    for route, media, first in (
        ("/v1/recommend", "application/json", b'{"history": ["B00O47ILVA"], "k": 2'),
        ("/v1/items", "application/json", b'{"item_id": "chunked", "text": "'),
        ("/v1/users/chunky/events", "application/json", b'{"item_ids": ["B00O47ILVA"]'),
        ("/v1/items", "multipart/form-data; boundary=b", b'--b\r\nContent-Disposition: form-data; name="text"\r\n\r\n'),
    ):
        r = client.post(route, content=chunks(first), headers={"content-type": media})
        _error(r, 413, "payload_too_large")
    assert client.get("/v1/items/chunked").status_code == 404


def test_unknown_and_repeated_form_fields_get_422(client):
    """A misnamed file field (``photo``) made a text-only item with 201; a repeated ``item_id`` kept the last."""
    png = _png()
    err = _error(
        client.post("/v1/items", data={"item_id": "form-1", "text": "t"}, files={"photo": ("a.png", png)}), 422
    )
    assert err["details"]["unknown_fields"] == ["photo"]
    err = _error(client.post("/v1/items", data={"item_id": ["form-2", "form-3"], "text": "t"}), 422)
    assert err["details"]["repeated_fields"] == ["item_id"]
    err = _error(
        client.post(
            "/v1/items", data={"item_id": "form-4"}, files=[("image", ("a.png", png)), ("image", ("b.png", png))]
        ),
        422,
    )
    for item in ("form-1", "form-2", "form-3", "form-4"):
        assert client.get(f"/v1/items/{item}").status_code == 404


def test_deleted_items_in_client_histories_and_exclude_are_skipped(client):
    """A deleted id in an explicit history is skipped (as in a stored history) and named in the response; in
    ``exclude`` it is ignored; a retried events call whose item was deleted since is still a duplicate."""
    ids = [i["item_id"] for i in client.post("/v1/recommend", json={"history": [], "k": 3}).json()["items"]]
    assert client.post("/v1/items", json={"item_id": "gone-1", "text": "soon deleted"}).status_code == 201
    user = f"del-{ids[0]}"
    first = client.post(f"/v1/users/{user}/events", json={"item_ids": ["gone-1"], "idempotency_key": "k1"})
    assert first.status_code == 200 and first.json()["appended"] == 1
    assert client.delete("/v1/items/gone-1").status_code == 204
    r = client.post("/v1/recommend", json={"history": [ids[0], "gone-1"], "exclude": ["gone-1", ids[1]], "k": 5})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["history_length"] == 1 and body["skipped_item_ids"] == ["gone-1"]
    assert {"gone-1", ids[1]}.isdisjoint(i["item_id"] for i in body["items"])
    assert client.post("/v1/recommend", json={"user_id": user, "k": 2}).json()["skipped_item_ids"] == ["gone-1"]
    retry = client.post(f"/v1/users/{user}/events", json={"item_ids": ["gone-1"], "idempotency_key": "k1"})
    assert retry.status_code == 200 and retry.json()["duplicate"] is True, retry.text
    # ids that never existed are still an error (a typo must not silently give other recommendations)
    _error(client.post("/v1/recommend", json={"history": [ids[0], "never-was"]}), 422, "unknown_items")
    _error(client.post(f"/v1/users/{user}/events", json={"item_ids": ["gone-1"]}), 422, "unknown_items")


def test_batch_total_work_is_bounded(client):
    """256 requests x k=1000 (each within limits) took 5.4 s and stalled /healthz for 2.8 s: the sum of k of a
    batch is bounded (MISSREC_MAX_BATCH_TOTAL_K)."""
    big = {"requests": [{"history": ["B00O47ILVA"], "k": 1000}] * 256}
    err = _error(client.post("/v1/recommend/batch", json=big), 422, "batch_too_large")
    assert err["details"] == {"total_k": 256_000, "max_batch_total_k": 20_000}
    ok = client.post("/v1/recommend/batch", json={"requests": [{"history": ["B00O47ILVA"], "k": 1000}] * 20})
    assert ok.status_code == 200 and [len(r["items"]) for r in ok.json()["results"]] == [1000] * 20


def test_schema_invalid_sub_requests_get_per_item_errors(client):
    r = client.post(
        "/v1/recommend/batch",
        json={"requests": [{"history": ["B00O47ILVA"], "k": 2}, {"history": ["B00O47ILVA"], "k": 0}, {"k": 3}]},
    )
    assert r.status_code == 200, r.text
    first, second, third = r.json()["results"]
    assert len(first["items"]) == 2
    assert second["error"]["code"] == third["error"]["code"] == "invalid_input"
    assert second["error"]["details"]["errors"][0]["loc"] == ["k"]
    _error(client.post("/v1/recommend/batch", json={"requests": []}), 422, "invalid_input")  # the envelope still


# ----- issue 12, item 8: the smaller defects ------------------------------------------------------------------
def test_concurrent_first_ingests_of_one_id_say_replaced_once(client):
    import threading
    import uuid

    item = f"first-{uuid.uuid4().hex[:6]}"
    answers: list[bool] = []
    start = threading.Barrier(6)

    def ingest() -> None:
        start.wait()
        r = client.post("/v1/items", json={"item_id": item, "text": "same id, six writers"})
        assert r.status_code == 201, r.text
        answers.append(r.json()["replaced"])

    threads = [threading.Thread(target=ingest) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(answers) == [False] + [True] * 5  # Redis says which write found the id already there
    assert client.post("/v1/items", json={"item_id": "B00O47ILVA", "text": "a bundle item"}).json()["replaced"]


def test_idempotency_key_reused_with_another_payload_is_a_conflict(client):
    body = {"item_ids": ["B00O47ILVA"], "idempotency_key": "reuse-1"}
    assert client.post("/v1/users/idem-user/events", json=body).json()["appended"] == 1
    assert client.post("/v1/users/idem-user/events", json=body).json()["duplicate"] is True
    other = {"item_ids": ["B006ATU73A"], "idempotency_key": "reuse-1"}
    _error(client.post("/v1/users/idem-user/events", json=other), 409, "idempotency_key_reused")
    assert client.get("/v1/users/idem-user/history").json()["item_ids"] == ["B00O47ILVA"]


def test_invalid_utf8_in_path_ids_is_refused(client):
    for raw in ("%FF", "%FE", "a%C3"):
        _error(client.post(f"/v1/users/{raw}/events", json={"item_ids": ["B00O47ILVA"]}), 422, "invalid_input")
        _error(client.get(f"/v1/items/{raw}"), 422, "invalid_input")
    assert client.get("/v1/users/%EF%BF%BD/history").status_code == 200  # a real U+FFFD is a valid id


def test_location_of_dot_ids_can_be_followed(client):
    for item in (".", ".."):
        r = client.post("/v1/items", json={"item_id": item, "text": "a dot id"})
        assert r.status_code == 201, r.text
        assert r.headers["location"] == "/v1/items/" + "%2E" * len(item)
        assert client.get(r.headers["location"]).json()["item_id"] == item


def _path(item: str) -> str:
    """The path form of an id as httpx sends it unchanged (a browser would drop "." / ".." / %2E as dot segments)."""
    return "/v1/items/" + ("%2E" * len(item) if item in (".", "..") else quote(item, safe=""))


def test_the_id_in_the_query_routes_answer_what_the_path_routes_answer(client):
    """GET /v1/item?id= (and /similar, /image) answer exactly what GET /v1/items/{id} (/similar, /image) answer, for
    ids a URL path cannot carry too: the console reads every item this way."""
    odd = (".", "..", "a/b", "why?k=1", "frag#1", "100%", "%2E", "a b&id=x")
    for n, item in enumerate(odd):
        if n % 2 == 0:  # with a photo (multipart), or text only (JSON)
            image = {"image": ("x.png", _png((40 + n, 40)), "image/png")}
            r = client.post("/v1/items", data={"item_id": item, "text": f"odd id {n}"}, files=image)
        else:
            r = client.post("/v1/items", json={"item_id": item, "text": f"odd id {n}"})
        assert r.status_code == 201, (item, r.text)
    for n, item in enumerate(odd):
        got = client.get("/v1/item", params={"id": item})
        assert got.status_code == 200, (item, got.text)
        assert got.json()["item_id"] == item and got.json()["text"] == f"odd id {n}"
        near = client.get("/v1/item/similar", params={"id": item, "k": 5, "explain": "true"})
        assert near.status_code == 200 and near.json()["item_id"] == item
        photo = client.get("/v1/item/image", params={"id": item})
        if n % 2 == 0:
            assert photo.status_code == 200 and photo.headers["content-type"] == "image/jpeg"
        else:
            _error(photo, 404, "no_image")
        if item == "%2E":  # Starlette's TestClient percent-decodes a path twice (uvicorn once): no path twin here
            continue
        assert got.json() == client.get(_path(item)).json()
        assert near.json() == client.get(_path(item) + "/similar", params={"k": 5, "explain": "true"}).json()
        path_photo = client.get(_path(item) + "/image")
        assert (photo.status_code, photo.content) == (path_photo.status_code, path_photo.content)
    assert client.get("/v1/item?id=%2E%2E").json()["item_id"] == ".."  # a percent-encoded value decodes as usual
    assert client.get("/v1/item?id=%252E").json()["item_id"] == "%2E"
    # errors: the same 404 body as the path route, the one error shape for bad ids
    for route in ("", "/similar", "/image"):
        missing = _error(client.get(f"/v1/item{route}", params={"id": "no such/item"}), 404, "not_found")
        assert missing == _error(client.get(_path("no such/item") + route), 404, "not_found")
        assert missing["details"] == {"item_id": "no such/item"}
        _error(client.get(f"/v1/item{route}"), 422, "invalid_input")  # no id
        _error(client.get(f"/v1/item{route}?id="), 422, "invalid_input")
        _error(client.get(f"/v1/item{route}", params={"id": "x" * 257}), 422, "invalid_input")
        _error(client.get(f"/v1/item{route}?id=a%FF"), 422, "invalid_input")  # not UTF-8: never U+FFFD
    _error(client.get("/v1/item/similar", params={"id": ".", "k": 0}), 422, "invalid_input")
    assert client.delete(_path("..")).status_code == 204
    _error(client.get("/v1/item", params={"id": ".."}), 404, "not_found")


def test_request_numbers_and_flags_are_not_coerced(client):
    for field, value in (("k", True), ("k", "5"), ("exclude_seen", "yes"), ("explain", 1)):
        _error(client.post("/v1/recommend", json={"history": ["B00O47ILVA"], field: value}), 422, "invalid_input")


def test_blank_texts_and_ids_are_refused(client):
    _error(client.post("/v1/items", json={"item_id": "nul-text", "text": "\x00\x00\x00"}), 422, "invalid_input")
    for item in (" ", "\t", "\u00a0", "a\u0085b", "\u009f"):
        _error(client.post("/v1/items", json={"item_id": item, "text": "t"}), 422, "invalid_input")


def test_compressed_bodies_get_415(client):
    import gzip

    body = gzip.compress(json.dumps({"history": ["B00O47ILVA"]}).encode())
    r = client.post(
        "/v1/recommend", content=body, headers={"content-type": "application/json", "content-encoding": "gzip"}
    )
    _error(r, 415, "unsupported_media_type")


def test_disabled_ingestion_is_501_without_retry_after(scientific_bundle, redis_url, key_prefix, tmp_path):
    app = make_app(scientific_bundle, redis_url, key_prefix, ("ViT-B-32", None), tmp_path, warmup=False)
    with TestClient(app) as c:
        r = c.post("/v1/items", json={"item_id": "x", "text": "t"})
        _error(r, 501, "ingestion_disabled")
        assert "retry-after" not in r.headers


def test_head_on_get_routes_is_get_without_a_body(client):
    for path in ("/healthz", "/readyz", "/v1/items/B00O47ILVA", "/v1/users/someone/history"):
        got, head = client.get(path), client.head(path)
        assert head.status_code == got.status_code == 200, (path, head.status_code)
        assert head.content == b"" and head.headers["content-length"] == got.headers["content-length"]
    missing = client.head("/v1/items/does-not-exist")
    assert missing.status_code == 404 and missing.content == b""
    assert client.head("/v1/recommend").status_code == 405  # a POST route has no GET to answer with


def test_json_ingest_reads_its_body_like_the_other_json_routes(client):
    """+json media types and a UTF-8 BOM are accepted as on the other JSON routes, and errors have their shape."""
    body = json.dumps({"item_id": "bom-item", "text": "blue circle"}).encode()
    r = client.post("/v1/items", content=b"\xef\xbb\xbf" + body, headers={"content-type": "application/json"})
    assert r.status_code == 201, r.text
    r = client.post("/v1/items", content=body, headers={"content-type": "application/vnd.item+json"})
    assert r.status_code == 201, r.text
    recommend_bom = client.post(
        "/v1/recommend", content=b"\xef\xbb\xbf" + json.dumps({"history": ["bom-item"]}).encode(),
        headers={"content-type": "application/json"},
    )  # fmt: skip
    assert recommend_bom.status_code == 200, recommend_bom.text
    ingest = _error(client.post("/v1/items", json={"item_id": "x", "text": 5}), 422, "invalid_input")
    other = _error(client.post("/v1/recommend", json={"history": ["B00O47ILVA"], "k": "x"}), 422, "invalid_input")
    assert ingest["message"] == other["message"]
    (i,), (o,) = ingest["details"]["errors"], other["details"]["errors"]
    assert set(i) == set(o) == {"loc", "msg", "type"} and i["loc"][0] == o["loc"][0] == "body"
