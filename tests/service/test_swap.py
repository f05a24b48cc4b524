"""Zero-downtime bundle swaps (issue 13, part 3): POST /v1/admin/bundle and ``missrec swap`` point every replica at
another bundle. Real components: two bundles trained on the real Scientific data (other seeds, other widths), real
Redis, ONNX Runtime, FAISS, open_clip (random-init tiny CLIP), replicas behind real uvicorn servers."""

from __future__ import annotations

import re
import shutil
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import redis
from typer.testing import CliRunner

import service.metrics
from harness.launch import InProcessServer, bundle_ids
from missrec_cli.main import app as cli
from service.store import ItemRecord
from serving_core.bundle import read_manifest
from serving_core.towers import load_towers
from tests.service_helpers import make_app

KEY = "swap-test-key"
AUTH = {"X-API-Key": KEY}
CONVERGE_S = 5.0


@pytest.fixture(scope="module")
def root(swap_root) -> Path:
    return swap_root


@pytest.fixture(scope="module")
def versions(root) -> dict[str, str]:
    v = {name: read_manifest(root / name).version for name in ("a", "b")}
    assert v["a"] != v["b"]
    return v


def _app(root: Path, redis_url: str, prefix: str, tiny_clip, tmp: Path, **extra):
    return make_app(root / "a", redis_url, prefix, tiny_clip, tmp, **({"api_key": KEY, "warmup": False} | extra))


def _status(url: str) -> dict:
    r = httpx.get(f"{url}/v1/admin/bundle", headers=AUTH, timeout=10)
    assert r.status_code == 200, r.text
    return r.json()


def _converge(urls: list[str], version: str, timeout: float = 30.0) -> float:
    """Seconds until every replica is active on ``version`` (fails after ``timeout``)."""
    started = time.monotonic()
    while True:
        states = [_status(u) for u in urls]
        if all(s["state"] == "active" and s["active"]["version"] == version for s in states):
            return time.monotonic() - started
        if time.monotonic() - started > timeout:
            pytest.fail(f"not all on {version} after {timeout} s: {states}")
        time.sleep(0.05)


def _documented_bundle_metrics() -> list[str]:
    names = re.findall(r"^    (bundle_[a-z_]+)", service.metrics.__doc__ or "", flags=re.M)
    assert len(names) >= 5, service.metrics.__doc__
    return names


def _stored(redis_url: str, prefix: str, item_id: str) -> ItemRecord:
    with redis.Redis.from_url(redis_url) as r:
        return ItemRecord.from_hash(item_id, r.hgetall(f"{prefix}:{{items}}:item:{item_id}"))


def _offline(towers, record: ItemRecord) -> dict[str, np.ndarray]:
    """The bundle's item tower run here on the item's stored raw features."""
    feats = {m: np.frombuffer(record.arrays[f"feature_{m}"], dtype=np.float32)[None] for m in ("text", "image")}
    return towers.item.encode(feats["text"], feats["image"])


def _assert_served_with(server_app, towers, record: ItemRecord) -> None:
    """The replica serves ``record`` with exactly the vectors ``towers``' item tower gives its raw features."""
    snap = server_app.state.service.catalogue.current
    row = snap.row(record.item_id)
    assert row is not None, f"{record.item_id} is not served"
    want = _offline(towers, record)
    np.testing.assert_allclose(snap.tokens[row], want["tokens"][0], rtol=1e-5, atol=1e-5)
    for m in snap.vectors:
        np.testing.assert_allclose(snap.vectors[m][row], want[m][0], rtol=1e-5, atol=1e-5)
        assert snap.clusters[m][row] == want[f"{m}_cluster"][0]


def _ingest(url: str, item_id: str, text: str, image: Path | None = None) -> httpx.Response:
    if image is None:
        return httpx.post(f"{url}/v1/items", json={"item_id": item_id, "text": text}, headers=AUTH, timeout=30)
    files = {"image": (image.name, image.read_bytes(), "image/jpeg")}
    return httpx.post(f"{url}/v1/items", data={"item_id": item_id, "text": text}, files=files, headers=AUTH, timeout=30)


def test_admin_routes_need_an_api_key(root, redis_url, key_prefix, tiny_clip, tmp_path):
    from fastapi.testclient import TestClient

    with TestClient(_app(root, redis_url, key_prefix, tiny_clip, tmp_path, api_key=None)) as c:
        for r in (c.get("/v1/admin/bundle"), c.post("/v1/admin/bundle", json={"bundle": "b"})):
            assert r.status_code == 403, r.text
            assert r.json()["error"]["code"] == "admin_disabled" and "MISSREC_API_KEY" in r.json()["error"]["message"]
    with TestClient(_app(root, redis_url, key_prefix, tiny_clip, tmp_path / "2")) as c:
        for headers in ({}, {"X-API-Key": "wrong"}):
            for r in (c.get("/v1/admin/bundle", headers=headers), c.post("/v1/admin/bundle", json={"bundle": "b"})):
                assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized", r.text
        assert c.get("/v1/admin/bundle", headers=AUTH).json()["announced"] is None  # nothing was announced


def test_paths_outside_the_root_are_refused_before_any_load(
    root, scientific_bundle, redis_url, key_prefix, tiny_clip, tmp_path, caplog
):
    from fastapi.testclient import TestClient

    outside = tmp_path / "outside"
    shutil.copytree(scientific_bundle, outside)  # a valid bundle, but not under the root
    escape = root / f"escape-{key_prefix}"
    escape.symlink_to(outside, target_is_directory=True)
    try:
        with TestClient(_app(root, redis_url, key_prefix, tiny_clip, tmp_path)) as c:
            caplog.clear()
            caplog.set_level("INFO", logger="service.serving_model")
            for given in (str(outside), "../" + outside.name, "a/../../outside", escape.name, str(escape)):
                r = c.post("/v1/admin/bundle", json={"bundle": given}, headers=AUTH)
                assert r.status_code == 422 and r.json()["error"]["code"] == "bundle_outside_root", (given, r.text)
                assert str(root) in r.json()["error"]["message"]
            r = c.post("/v1/admin/bundle", json={"bundle": "no-such-bundle"}, headers=AUTH)
            assert r.status_code == 422 and r.json()["error"]["code"] == "bundle_not_found", r.text
            for body in ({"bundle": ""}, {"bundle": 3}, {}, {"bundle": "b", "extra": 1}):
                r = c.post("/v1/admin/bundle", json=body, headers=AUTH)
                assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_input", (body, r.text)
            assert not [rec for rec in caplog.records if "loaded bundle" in rec.getMessage()]  # nothing was loaded
            assert c.get("/v1/admin/bundle", headers=AUTH).json()["announced"] is None
            with redis.Redis.from_url(redis_url) as r:
                assert r.get(f"{key_prefix}:{{bundle}}:current") is None
    finally:
        escape.unlink()


def test_swap_reembeds_ingested_items_and_every_replica_converges(
    root, versions, redis_url, key_prefix, tiny_clip, abo_dir, tmp_path, abo_products
):
    photos = [p["images"][0] for p in abo_products[:2]]
    ids = bundle_ids(root / "a")
    towers = {name: load_towers(root / name, "cpu") for name in ("a", "b")}
    apps = [_app(root, redis_url, key_prefix, tiny_clip, tmp_path / f"r{i}") for i in (0, 1)]
    with InProcessServer(apps[0]) as a, InProcessServer(apps[1]) as b:
        # before the swap: ingested items (text, text + photo), a deleted bundle item, an ingested-then-deleted one
        before = {"pre-text": ("A cordless drill. Tools. Acme.", None), "pre-photo": ("A lamp.", photos[0])}
        for item_id, (text, photo) in before.items():
            assert _ingest(a.url, item_id, text, photo).status_code == 201
        assert _ingest(a.url, "pre-gone", "soon deleted").status_code == 201
        for gone in ("pre-gone", ids[1]):
            assert httpx.delete(f"{a.url}/v1/items/{gone}", headers=AUTH).status_code == 204

        # load during the swap: a sequential reader on b, writers on a (ingests and deletes)
        seen: list[tuple[int, str]] = []
        acked: dict[str, str] = {}
        deleted: list[str] = []
        stop = threading.Event()

        def read() -> None:
            with httpx.Client(base_url=b.url, timeout=30) as http:
                while not stop.is_set():
                    r = http.post("/v1/recommend", json={"history": [ids[5], ids[7]], "k": 10})
                    seen.append((r.status_code, r.json().get("model_version", r.text)))

        def write() -> None:
            n = 0
            while not stop.is_set():
                item_id = f"during-{n}"
                r = _ingest(a.url, item_id, f"item {n} written during the swap", photos[n % 2] if n % 3 == 0 else None)
                assert r.status_code == 201, r.text
                acked[item_id] = r.json()["item_id"]
                if n % 4 == 1:  # delete an acknowledged one
                    assert httpx.delete(f"{a.url}/v1/items/during-{n - 1}", headers=AUTH).status_code == 204
                    deleted.append(f"during-{n - 1}")
                n += 1

        threads = [threading.Thread(target=read), threading.Thread(target=write)]
        for t in threads:
            t.start()
        time.sleep(0.5)
        called = time.monotonic()
        r = httpx.post(f"{a.url}/v1/admin/bundle", json={"bundle": "b"}, headers=AUTH, timeout=60)
        assert r.status_code == 202, r.text
        assert r.json()["version"] == versions["b"] and r.json()["bundle"] == str(root / "b")
        generation = r.json()["generation"]
        took = _converge([a.url, b.url], versions["b"], timeout=CONVERGE_S)
        time.sleep(0.5)  # traffic on the new bundle
        stop.set()
        for t in threads:
            t.join(30)
        first_new = next(i for i, (_, v) in enumerate(seen) if v == versions["b"])
        print(f"both replicas on the new bundle {took:.2f} s after the 202 ({time.monotonic() - called:.2f} s call)")

        # requests never failed, and once one carried the new version, every later one did
        assert all(status == 200 for status, _ in seen), {s for s, _ in seen}
        versions_seen = [v for _, v in seen]
        assert set(versions_seen) == {versions["a"], versions["b"]}
        assert all(v == versions["b"] for v in versions_seen[first_new:])
        assert len(acked) >= 2, "no ingest happened during the swap"

        # every live ingested item (before and during the swap) is served with the NEW item tower's vectors
        live = [*before, *(i for i in acked if i not in deleted)]
        for server_app, url in ((apps[0], a.url), (apps[1], b.url)):
            for item_id in live:
                record = _stored(redis_url, key_prefix, item_id)
                _assert_served_with(server_app, towers["b"], record)
                info = httpx.get(f"{url}/v1/items/{item_id}").json()
                assert info["source"] == "ingested"
            for item_id in ("pre-gone", ids[1], *deleted):
                assert httpx.get(f"{url}/v1/items/{item_id}").status_code == 404
            status = _status(url)
            assert status["active"]["generation"] == generation and status["error"] is None
            metrics = httpx.get(f"{url}/metrics").text
            assert f'missrec_bundle_info{{version="{versions["b"]}"}} 1.0' in metrics
            assert f'missrec_bundle_info{{version="{versions["a"]}"}} 0.0' in metrics
            assert 'missrec_bundle_swaps_total{result="switched"} 1.0' in metrics
            assert "missrec_bundle_swap_seconds_count 1.0" in metrics
            for name in _documented_bundle_metrics():  # every documented swap metric moved (loading: back to 0)
                if name != "bundle_loading":
                    assert re.search(rf"^missrec_{name}(_count|_total)?(\{{[^}}]*\}})? [1-9]", metrics, re.M), name
        # and recommendable: an ingested item comes back for a history of itself, from the new model
        for url in (a.url, b.url):
            for item_id in before:
                r = httpx.post(f"{url}/v1/recommend", json={"history": [item_id], "k": 100, "exclude_seen": False})
                assert r.status_code == 200 and r.json()["model_version"] == versions["b"]
                assert item_id in [i["item_id"] for i in r.json()["items"]], item_id

        # a replica started now comes up on the announced bundle (not its MISSREC_BUNDLE) with the same vectors
        late = _app(root, redis_url, key_prefix, tiny_clip, tmp_path / "r2")
        with InProcessServer(late) as c:
            assert _status(c.url)["active"]["version"] == versions["b"]
            r = httpx.post(f"{c.url}/v1/recommend", json={"history": [ids[5]]})
            assert r.json()["model_version"] == versions["b"]
            for item_id in live:
                _assert_served_with(late, towers["b"], _stored(redis_url, key_prefix, item_id))

            # rollback: the same call with the previous bundle; all three converge, vectors of the old tower again
            r = httpx.post(f"{c.url}/v1/admin/bundle", json={"bundle": str(root / "a")}, headers=AUTH, timeout=60)
            assert r.status_code == 202 and r.json()["version"] == versions["a"], r.text
            took = _converge([a.url, b.url, c.url], versions["a"], timeout=CONVERGE_S)
            print(f"rollback: three replicas on the old bundle {took:.2f} s after the 202")
            for server_app in (apps[0], apps[1], late):
                for item_id in live:
                    _assert_served_with(server_app, towers["a"], _stored(redis_url, key_prefix, item_id))


@pytest.fixture(scope="module")
def other_width_bundle(root, tmp_path_factory) -> Path:
    """A real bundle (tiny MISSRec on SYNTHETIC data) whose item tower takes 24-d text / 40-d image features."""
    import torch

    from index_builder.build import build_index
    from missrec.models.checkpoint import save_checkpoint
    from missrec.training.loop import TrainOptions, fit
    from model_export.bundle import export_bundle
    from tests.helpers import tiny_dataset, tiny_missrec

    tmp = tmp_path_factory.mktemp("other-width")
    ds = tiny_dataset(tmp / "data")
    model = tiny_missrec(ds)
    fit(model, ds.train, ds.valid, TrainOptions(epochs=1, batch_size=256, progress=False))
    model.discover_interests(generator=torch.Generator().manual_seed(0))
    checkpoint = save_checkpoint(tmp / "run" / "checkpoint.pt", model, dataset={"fingerprint": ds.fingerprint})
    export_bundle(checkpoint, tmp / "data", root / "other-width", overwrite=True)
    build_index(root / "other-width", factory="Flat", device="cpu")
    return root / "other-width"


def test_bad_bundles_are_refused_and_the_old_one_keeps_serving(
    root, versions, other_width_bundle, redis_url, key_prefix, tiny_clip, tmp_path
):
    corrupt = root / f"corrupt-{key_prefix}"
    shutil.copytree(root / "b", corrupt)
    tower = corrupt / "item_tower.onnx"
    data = bytearray(tower.read_bytes())
    data[len(data) // 2] ^= 0x01
    tower.write_bytes(bytes(data))
    ids = bundle_ids(root / "a")
    try:
        a_app = _app(root, redis_url, key_prefix, tiny_clip, tmp_path / "a")
        # a replica whose own root holds only a/: it must refuse b when it is announced (and keep serving a)
        narrow = _app(root, redis_url, key_prefix, tiny_clip, tmp_path / "n", bundle_root=root / "a")
        with InProcessServer(a_app) as a, InProcessServer(narrow) as n:
            assert _ingest(a.url, "kept", "an ingested item").status_code == 201
            cases = {
                corrupt.name: ("invalid_bundle", "item_tower.onnx fails its checksum"),
                other_width_bundle.name: ("incompatible_bundle", "takes 24-d text features"),
            }
            for given, (code, words) in cases.items():
                r = httpx.post(f"{a.url}/v1/admin/bundle", json={"bundle": given}, headers=AUTH, timeout=60)
                assert r.status_code == 422 and r.json()["error"]["code"] == code, r.text
                assert words in r.json()["error"]["message"], r.text
            with redis.Redis.from_url(redis_url) as rc:
                assert rc.get(f"{key_prefix}:{{bundle}}:current") is None  # nothing announced
            for url in (a.url, n.url):
                assert _status(url)["state"] == "active" and _status(url)["active"]["version"] == versions["a"]

            r = httpx.post(f"{a.url}/v1/admin/bundle", json={"bundle": "b"}, headers=AUTH, timeout=60)
            assert r.status_code == 202, r.text
            _converge([a.url], versions["b"], timeout=CONVERGE_S)
            deadline = time.monotonic() + CONVERGE_S
            while (status := _status(n.url))["state"] != "failed" and time.monotonic() < deadline:
                time.sleep(0.05)
            assert status["state"] == "failed" and "outside this replica's bundle root" in status["error"], status
            assert status["active"]["version"] == versions["a"] and status["announced"]["version"] == versions["b"]
            r = httpx.post(f"{n.url}/v1/recommend", json={"history": [ids[3], "kept"]})
            assert r.status_code == 200 and r.json()["model_version"] == versions["a"]
            assert "swap failed" in httpx.get(f"{n.url}/readyz").json()["checks"]["bundle"]
            assert 'missrec_bundle_swaps_total{result="failed"} 1.0' in httpx.get(f"{n.url}/metrics").text
    finally:
        shutil.rmtree(corrupt)


def test_concurrent_swaps_end_on_the_last_announced(root, versions, redis_url, key_prefix, tiny_clip, tmp_path):
    apps = [_app(root, redis_url, key_prefix, tiny_clip, tmp_path / f"r{i}") for i in (0, 1)]
    with InProcessServer(apps[0]) as a, InProcessServer(apps[1]) as b:
        for attempt in range(3):
            answers: list[dict] = []

            def call(url: str, bundle: str, out: list[dict] = answers) -> None:
                r = httpx.post(f"{url}/v1/admin/bundle", json={"bundle": bundle}, headers=AUTH, timeout=60)
                assert r.status_code == 202, r.text
                out.append(r.json())

            threads = [threading.Thread(target=call, args=(u, n)) for u, n in ((a.url, "b"), (b.url, "a"))]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
            last = max(answers, key=lambda x: x["generation"])
            _converge([a.url, b.url], last["version"], timeout=CONVERGE_S)
            time.sleep(0.3)  # a stale load finishing late must not switch anyone away from it
            for url in (a.url, b.url):
                status = _status(url)
                assert status["active"]["generation"] == last["generation"], (attempt, status)
                assert status["active"]["version"] == last["version"] and status["state"] == "active"
        metrics = httpx.get(f"{a.url}/metrics").text
        print([line for line in metrics.splitlines() if line.startswith("missrec_bundle_swaps_total")])


def test_cli_swap_and_rollback(root, versions, redis_url, key_prefix, tiny_clip, tmp_path):
    runner = CliRunner()
    with InProcessServer(_app(root, redis_url, key_prefix, tiny_clip, tmp_path)) as s:
        r = runner.invoke(cli, ["swap", "--url", s.url, "--bundle", "b"], env={"MISSREC_API_KEY": KEY})
        assert r.exit_code == 0, r.output
        assert f"announced {versions['b']}" in r.output and f"serving {versions['b']}" in r.output
        assert _status(s.url)["active"]["version"] == versions["b"]
        r = runner.invoke(cli, ["swap", "--url", s.url, "--bundle", "a", "--api-key", KEY, "--no-wait"])
        assert r.exit_code == 0 and f"announced {versions['a']}" in r.output, r.output
        _converge([s.url], versions["a"], timeout=CONVERGE_S)
        r = runner.invoke(cli, ["swap", "--url", s.url, "--bundle", "/etc", "--api-key", KEY])
        assert r.exit_code == 2 and "bundle_outside_root" in r.output, r.output
        r = runner.invoke(cli, ["swap", "--url", s.url, "--bundle", "b", "--api-key", "wrong"])
        assert r.exit_code == 2 and "401 unauthorized" in r.output, r.output


def _announce(redis_url: str, prefix: str, path: Path, version: str) -> None:
    """An announcement as another replica's POST makes it (the same store call), without its checks' delay."""
    import asyncio

    import redis.asyncio as aredis

    from service.store import AnnouncementStore

    async def run() -> None:
        client = aredis.Redis.from_url(redis_url)
        try:
            await AnnouncementStore(client, prefix=prefix).announce_bundle(str(path), version, "test")
        finally:
            await client.aclose()

    asyncio.run(run())


def test_a_load_superseded_while_it_runs_is_dropped(root, versions, redis_url, key_prefix, tiny_clip, tmp_path):
    # a warm-up of 512-query batches makes the load of b take long enough to announce a while it runs
    server_app = _app(root, redis_url, key_prefix, tiny_clip, tmp_path, warmup=True, max_batch_size=512)
    with InProcessServer(server_app) as s:
        _announce(redis_url, key_prefix, root / "b", versions["b"])
        deadline = time.monotonic() + CONVERGE_S
        while (status := _status(s.url))["state"] != "loading" and time.monotonic() < deadline:
            time.sleep(0.005)
        assert status["loading"]["version"] == versions["b"], status
        _announce(redis_url, key_prefix, root / "a", versions["a"])  # while b loads: a wins
        assert "missrec_bundle_loading 1.0" in httpx.get(f"{s.url}/metrics").text
        _converge([s.url], versions["a"], timeout=CONVERGE_S)
        time.sleep(1.0)  # long enough for the b load to have finished
        status = _status(s.url)
        assert status["state"] == "active" and status["active"]["version"] == versions["a"], status
        assert status["active"]["generation"] == status["announced"]["generation"] == 2
        metrics = httpx.get(f"{s.url}/metrics").text
        assert 'missrec_bundle_swaps_total{result="superseded"} 1.0' in metrics
        assert 'result="switched"' not in metrics and f'version="{versions["b"]}"' not in metrics  # never served b


def test_a_replica_starting_later_serves_the_announced_bundle_or_refuses(
    root, versions, redis_url, key_prefix, tiny_clip, tmp_path
):
    from fastapi.testclient import TestClient

    from harness.launch import RedisServer
    from service.replication import StartupRefused

    # Redis down at start-up: unready (not serving MISSREC_BUNDLE) until it has read the announcement
    server = RedisServer(tmp_path / "redis").start()
    _announce(server.url, key_prefix, root / "b", versions["b"])
    server.kill()
    try:
        late = _app(root, server.url, key_prefix, tiny_clip, tmp_path / "late")
        with TestClient(late) as c:
            assert c.get("/readyz").status_code == 503
            assert c.post("/v1/recommend", json={"history": [bundle_ids(root / "a")[2]]}).status_code == 503
            server.start()
            deadline = time.monotonic() + 15
            while c.get("/readyz").status_code != 200 and time.monotonic() < deadline:
                time.sleep(0.05)
            r = c.post("/v1/recommend", json={"history": [bundle_ids(root / "a")[2]]})
            assert r.status_code == 200 and r.json()["model_version"] == versions["b"], r.text
    finally:
        server.stop()

    # the announced bundle broken since: refuse to start, saying which and what to do
    broken = root / f"broken-{key_prefix}"
    shutil.copytree(root / "b", broken)
    _announce(redis_url, key_prefix, broken, versions["b"])
    (broken / "items" / "popularity.npy").write_bytes(b"corrupted")
    try:
        app = _app(root, redis_url, key_prefix, tiny_clip, tmp_path / "broken")
        expected = r"refusing to start: the announced bundle .*popularity\.npy fails its checksum.*POST /v1/admin"
        with pytest.raises(StartupRefused, match=expected), TestClient(app):
            pass
    finally:
        shutil.rmtree(broken)


def test_the_admin_routes_are_in_the_openapi_schema():
    from service.app import create_app
    from service.settings import Settings

    paths = create_app(Settings(bundle=None)).openapi()["paths"]
    post, get = paths["/v1/admin/bundle"]["post"], paths["/v1/admin/bundle"]["get"]
    assert {"202", "401", "403", "422"} <= set(post["responses"]) and {"200", "401", "403"} <= set(get["responses"])
    assert post["responses"]["202"]["content"]["application/json"]["schema"]["$ref"].endswith("/BundleAnnouncement")
    assert any(p["name"].lower() == "x-api-key" for p in get["parameters"])


def test_a_query_resolved_before_a_switch_runs_on_its_own_model(root, versions):
    """Rows of one bundle mean nothing in another: a batch mixing queries resolved before and after a switch runs
    each on the model its rows come from, with the same results as alone."""
    from service.catalogue import Catalogue
    from service.metrics import Metrics
    from service.recommender import Query, recommend_batch
    from service.serving_model import ServingModel
    from service.settings import Settings

    settings = Settings(bundle=None, onnx_provider="cpu", faiss_device="cpu")
    catalogue = Catalogue(ServingModel.load(root / "a", settings))
    old = catalogue.current
    catalogue.switch(ServingModel.load(root / "b", settings), {})
    new = catalogue.current
    history = np.array([3, 8, 13], dtype=np.int64)
    queries = [Query(history=history, k=10, snapshot=old), Query(history=history, k=10, snapshot=new)]
    mixed = recommend_batch(catalogue.current, queries, Metrics())
    assert [r.model_version for r in mixed] == [versions["a"], versions["b"]]
    for q, r in zip(queries, mixed, strict=True):
        alone = recommend_batch(q.snapshot, [Query(history=history, k=10)], Metrics())[0]
        assert [i.item_id for i in r.items] == [i.item_id for i in alone.items]
        assert [i.score for i in r.items] == pytest.approx([i.score for i in alone.items], rel=1e-6)
    assert [i.item_id for i in mixed[0].items] != [i.item_id for i in mixed[1].items]  # the two models differ


def test_writes_acknowledged_while_a_replica_loads_are_served_after_its_switch(
    root, versions, redis_url, key_prefix, tiny_clip, tmp_path
):
    """Ingests and deletes answered while the new bundle loads (a slow warm-up keeps it loading): after the switch
    the ingested item is served with the new tower's vectors and the deleted ones stay deleted."""
    ids = bundle_ids(root / "a")
    server_app = _app(root, redis_url, key_prefix, tiny_clip, tmp_path, warmup=True, max_batch_size=512)
    with InProcessServer(server_app) as s:
        assert _ingest(s.url, "before", "ingested before the swap").status_code == 201
        _announce(redis_url, key_prefix, root / "b", versions["b"])
        deadline = time.monotonic() + CONVERGE_S
        while _status(s.url)["state"] != "loading" and time.monotonic() < deadline:
            time.sleep(0.005)
        assert _ingest(s.url, "mid-load", "ingested while the new bundle loads").status_code == 201
        assert httpx.delete(f"{s.url}/v1/items/before", headers=AUTH).status_code == 204
        assert httpx.delete(f"{s.url}/v1/items/{ids[9]}", headers=AUTH).status_code == 204
        assert _status(s.url)["state"] == "loading", "the load ended before the writes: nothing was proven"
        _converge([s.url], versions["b"], timeout=CONVERGE_S)
        _assert_served_with(server_app, load_towers(root / "b", "cpu"), _stored(redis_url, key_prefix, "mid-load"))
        for gone in ("before", ids[9]):
            assert httpx.get(f"{s.url}/v1/items/{gone}").status_code == 404
        r = httpx.post(f"{s.url}/v1/recommend", json={"history": ["mid-load"], "k": 100, "exclude_seen": False})
        assert r.json()["model_version"] == versions["b"]
        assert {"before", ids[9]}.isdisjoint(i["item_id"] for i in r.json()["items"])


def test_the_default_bundle_root_is_never_the_filesystem_root(tmp_path):
    """The container sets MISSREC_BUNDLE=/bundle: the directory holding it is /, and a swap could then name any
    directory of the machine. The default root is then the bundle directory itself; elsewhere its parent."""
    from service.settings import Settings

    assert Settings(bundle=Path("/bundle")).swap_root() == Path("/bundle")
    assert Settings(bundle=tmp_path / "a").swap_root() == tmp_path.resolve()
    assert Settings(bundle=Path("/bundle"), bundle_root=tmp_path).swap_root() == tmp_path.resolve()
