"""Shadow mode (issue 13, part 4): a candidate bundle scored beside the serving one on a fraction of recommend
requests, overlap@k and latency per model as metrics; clients only see the serving bundle. Two real bundles of the
Scientific data, real Redis, ONNX Runtime, FAISS, open_clip (random-init tiny CLIP)."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from harness.launch import InProcessServer
from missrec_cli.main import app as cli
from service.shadow import search_one
from serving_core.bundle import read_manifest
from tests.service_helpers import make_app

KEY = "shadow-test-key"
AUTH = {"X-API-Key": KEY}
HISTORIES = [["B00O47ILVA", "B006ATU73A"], ["B0000223UV"], ["B00DRALJ28", "B0013BKDO8", "B00837ZGRY"]]


@pytest.fixture(scope="module")
def root(swap_root) -> Path:
    return swap_root


def _app(root, redis_url, prefix, tiny_clip, tmp, **extra):
    return make_app(root / "a", redis_url, prefix, tiny_clip, tmp, **({"api_key": KEY, "warmup": False} | extra))


def _wait(client, state: str, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        status = client.get("/v1/admin/shadow", headers=AUTH).json()
        if status["state"] == state:
            return status
        assert time.monotonic() < deadline, status
        time.sleep(0.05)


def _scored(client, n: int, timeout: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout
    while (status := client.get("/v1/admin/shadow", headers=AUTH).json())["scored"] < n:
        assert time.monotonic() < deadline, status
        time.sleep(0.02)
    return status


def _metric(text: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


def test_the_candidate_scores_requests_beside_the_serving_bundle(root, redis_url, key_prefix, tiny_clip, tmp_path):
    serving, candidate = read_manifest(root / "a").version, read_manifest(root / "b").version
    with TestClient(_app(root, redis_url, key_prefix, tiny_clip, tmp_path)) as c:
        r = c.put("/v1/admin/shadow", json={"bundle": "b", "fraction": 1.0}, headers=AUTH)
        assert r.status_code == 202 and r.json()["state"] == "loading", r.text
        status = _wait(c, "active")
        assert status["version"] == candidate and status["fraction"] == 1.0
        app_state = c.app.state.service
        shadow_snap, serving_snap = app_state.shadow.catalogue.current, app_state.catalogue.current
        expected = []
        for n, history in enumerate(HISTORIES, start=1):
            body = c.post("/v1/recommend", json={"history": history, "k": 10}).json()
            assert body["model_version"] == serving  # the client only ever sees the serving bundle
            ours = [i["item_id"] for i in body["items"]]
            assert ours == search_one(serving_snap, history, history, 10)
            theirs = search_one(shadow_snap, history, history, 10)
            expected.append(len(set(ours) & set(theirs)) / 10)
            _scored(c, n)  # one at a time: none is dropped
        status = c.get("/v1/admin/shadow", headers=AUTH).json()
        assert status["scored"] == 3 and status["mean_overlap"] == pytest.approx(np.mean(expected))
        assert set(status["mean_seconds"]) == {"serving", "candidate"} and min(status["mean_seconds"].values()) > 0
        metrics = c.get("/metrics").text
        assert _metric(metrics, 'missrec_shadow_requests_total{result="scored"}') == 3
        assert _metric(metrics, "missrec_shadow_overlap_sum") == pytest.approx(sum(expected))
        assert _metric(metrics, 'missrec_shadow_seconds_count{model="candidate"}') == 3
        assert _metric(metrics, "missrec_shadow_active") == 1
        assert c.delete("/v1/admin/shadow", headers=AUTH).status_code == 204
        assert c.get("/v1/admin/shadow", headers=AUTH).json()["state"] == "off"
        c.post("/v1/recommend", json={"history": HISTORIES[0], "k": 10})
        time.sleep(0.2)
        assert _metric(c.get("/metrics").text, 'missrec_shadow_requests_total{result="scored"}') == 3
        assert _metric(c.get("/metrics").text, "missrec_shadow_active") == 0


def test_the_candidate_follows_every_item_change(
    root, redis_url, key_prefix, tiny_clip, tmp_path, abo_dir, abo_products
):
    from serving_core.towers import load_towers

    product = abo_products[0]
    photo = product["images"][0].read_bytes()
    with TestClient(_app(root, redis_url, key_prefix, tiny_clip, tmp_path)) as c:
        before = c.post("/v1/items", data={"item_id": "shadow-before", "text": product["text"]}, files={"image": photo},
                        headers=AUTH)  # fmt: skip
        assert before.status_code == 201, before.text
        assert c.delete("/v1/items/B00O47ILVA", headers=AUTH).status_code == 204
        c.put("/v1/admin/shadow", json={"bundle": "b", "fraction": 1.0}, headers=AUTH)
        _wait(c, "active")
        after = c.post("/v1/items", data={"item_id": "shadow-after", "text": product["text"]}, files={"image": photo},
                       headers=AUTH)  # fmt: skip
        assert after.status_code == 201, after.text
        assert c.delete("/v1/items/shadow-before", headers=AUTH).status_code == 204
        snap = c.app.state.service.shadow.catalogue.current
        assert snap.row("shadow-before") is None and snap.row("B00O47ILVA") is None  # deleted before and after
        row = snap.row("shadow-after")
        assert row is not None
        record = c.app.state.service.catalogue.current.ingested["shadow-after"]
        feats = {m: np.frombuffer(record.arrays[f"feature_{m}"], dtype=np.float32)[None] for m in ("text", "image")}
        want = load_towers(root / "b", "cpu").item.encode(feats["text"], feats["image"])  # the candidate's tower
        np.testing.assert_allclose(snap.tokens[row], want["tokens"][0], rtol=1e-5, atol=1e-5)
        assert "shadow-after" in search_one(snap, ["shadow-after"], [], 50)


def test_sampling_follows_the_fraction(root, redis_url, key_prefix, tiny_clip, tmp_path):
    with TestClient(_app(root, redis_url, key_prefix, tiny_clip, tmp_path)) as c:
        c.put("/v1/admin/shadow", json={"bundle": "b", "fraction": 0.25}, headers=AUTH)
        _wait(c, "active")
        for i in range(240):
            c.post("/v1/recommend", json={"history": HISTORIES[i % 3], "k": 10})
        time.sleep(0.5)
        metrics = c.get("/metrics").text
    sampled = sum(_metric(metrics, f'missrec_shadow_requests_total{{result="{r}"}}') for r in ("scored", "dropped"))
    assert 30 <= sampled <= 90, sampled  # 60 expected; 3 sigma is about 20


def _some_thread_in(function: str, module: str) -> bool:
    """True when some thread runs ``function`` of ``module`` now (its frames, as the interpreter has them)."""
    import sys

    for top in sys._current_frames().values():
        frame = top
        while frame is not None:
            if frame.f_code.co_name == function and frame.f_code.co_filename.endswith(module):
                return True
            frame = frame.f_back
    return False


def _until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


def test_a_shadow_stopped_while_it_loads_follows_nothing(root, redis_url, key_prefix, tiny_clip, tmp_path):
    """Stopped while its candidate starts following the serving catalogue (the step is held there by taking the
    catalogue's lock): the cancelled load leaves no follower behind, which would be kept in step with every item
    change for as long as the replica runs (issue 22: 30 stop-while-loading cycles, +600 MiB, shadow "off")."""
    with TestClient(_app(root, redis_url, key_prefix, tiny_clip, tmp_path)) as c:
        serving = c.app.state.service.catalogue
        with serving._lock:  # the candidate's follow() waits here, in its worker thread
            assert c.put("/v1/admin/shadow", json={"bundle": "b", "fraction": 1.0}, headers=AUTH).status_code == 202
            _until(lambda: _some_thread_in("follow", "service/catalogue.py"), 60, "the load never reached follow()")
            assert c.delete("/v1/admin/shadow", headers=AUTH).status_code == 204
        _until(lambda: not _some_thread_in("follow", "service/catalogue.py"), 30, "follow() never ended")
        _until(lambda: not serving.followers, 10, "the stopped shadow's candidate still follows the catalogue")
        assert c.get("/v1/admin/shadow", headers=AUTH).json()["state"] == "off"


def test_bad_shadow_requests_are_refused_and_serving_is_untouched(root, redis_url, key_prefix, tiny_clip, tmp_path):
    broken = root / "broken"
    if not broken.exists():
        shutil.copytree(root / "b", broken)
        (broken / "user_tower.onnx").write_bytes(b"not a graph")
    with TestClient(_app(root, redis_url, key_prefix, tiny_clip, tmp_path, api_key=None)) as c:
        assert c.put("/v1/admin/shadow", json={"bundle": "b"}).status_code == 403
    with TestClient(_app(root, redis_url, key_prefix, tiny_clip, tmp_path / "2")) as c:
        assert c.put("/v1/admin/shadow", json={"bundle": "b"}, headers={"X-API-Key": "wrong"}).status_code == 401
        for body in ({"bundle": "b", "fraction": 0}, {"bundle": "b", "fraction": 1.5}, {"bundle": "/etc"},
                     {"bundle": "../" + root.name + "x"}, {"bundle": "b", "extra": 1}):  # fmt: skip
            r = c.put("/v1/admin/shadow", json=body, headers=AUTH)
            assert r.status_code == 422 and r.json()["error"]["message"], (body, r.text)
        assert c.get("/v1/admin/shadow", headers=AUTH).json()["state"] == "off"
        r = c.put("/v1/admin/shadow", json={"bundle": "broken", "fraction": 1.0}, headers=AUTH)
        assert r.status_code == 202
        failed = _wait(c, "failed")
        assert "broken" in failed["error"]
        body = c.post("/v1/recommend", json={"history": HISTORIES[0], "k": 5})
        assert body.status_code == 200 and body.json()["model_version"] == read_manifest(root / "a").version


def test_cli_shadow(root, redis_url, key_prefix, tiny_clip, tmp_path):
    with InProcessServer(_app(root, redis_url, key_prefix, tiny_clip, tmp_path)) as server:
        r = CliRunner().invoke(cli, ["shadow", "--url", server.url, "--bundle", "b", "--fraction", "0.5",
                                     "--api-key", KEY])  # fmt: skip
        assert r.exit_code == 0 and "active" in r.output and read_manifest(root / "b").version in r.output, r.output
        r = CliRunner().invoke(cli, ["shadow", "--url", server.url, "--stop", "--api-key", KEY])
        assert r.exit_code == 0 and "off" in r.output, r.output
