"""The model lifecycle on REAL Scientific data: events and ingests written through the API -> ``missrec snapshot``
(plain Redis and Redis Cluster) -> train -> export -> ``missrec evaluate-bundle`` through the serving path."""

from __future__ import annotations

import asyncio
import json

import httpx
import numpy as np
import pytest
import redis
from fastapi.testclient import TestClient
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from typer.testing import CliRunner

from lifecycle.evaluate import evaluate_bundles, score_bundle
from lifecycle.snapshot import SNAPSHOT_FILE, SnapshotError, old_sequences, take_snapshot
from missrec.data.dataset import load_dataset, split_leave_one_out
from missrec_cli.main import app as cli
from service.store import HistoryStore, ItemStore
from tests.service_helpers import make_app

N_USERS = 40
T0 = 1_700_000_000.0


@pytest.fixture(scope="module")
def ds(scientific_dir):
    return load_dataset(scientific_dir)


def _deploy(client, ds, abo_products, redis_url, prefix, cluster=False):
    """Write a deployment's worth of traffic through the API; returns what the snapshot must contain."""
    products = [p for p in abo_products if p["images"]][:3]
    new = [f"abo-life-{i}" for i in range(3)]
    for item_id, product in zip(new, products, strict=True):
        image = product["images"][0].read_bytes()
        r = client.post("/v1/items", data={"item_id": item_id, "text": product["text"]}, files={"image": image})
        assert r.status_code == 201, r.text
    gone = ds.item_ids[ds.test.targets[0] - 1]  # a bundle item user 0 interacted with, deleted below
    sequences: dict[str, list[str]] = {}
    for u in range(N_USERS):
        seq = [ds.item_ids[i - 1] for i in ds.test.histories[u, : ds.test.lengths[u]]]
        seq += [ds.item_ids[ds.test.targets[u] - 1]] + ([new[u % 3]] if u % 4 == 0 else [])
        stamps = [T0 + 60 * j for j in range(len(seq))]
        half = len(seq) // 2  # the newer half first: the snapshot orders by timestamp, not by arrival
        for items, ts in ((seq[half:], stamps[half:]), (seq[:half], stamps[:half])):
            if items:
                r = client.post(f"/v1/users/{ds.user_ids[u]}/events", json={"item_ids": items, "timestamps": ts})
                assert r.status_code == 200, r.text
        sequences[ds.user_ids[u]] = [i for i in seq if i not in (gone, new[2])]
    assert client.delete(f"/v1/items/{new[2]}").status_code == 204
    assert client.delete(f"/v1/items/{gone}").status_code == 204

    # an event on an id no catalogue holds now (e.g. recorded under an older bundle): the API refuses such ids,
    # so it is written through the service's own store
    async def stray_event() -> None:
        conn = (RedisCluster if cluster else Redis).from_url(redis_url)
        await HistoryStore(conn, prefix).append_events(ds.user_ids[1], ["from-an-older-bundle"], [T0 + 1e6])
        await conn.aclose()

    asyncio.run(stray_event())
    return {"new": new, "deleted_bundle_item": gone, "sequences": sequences}


@pytest.fixture(scope="module")
def deployment(scientific_bundle, ds, redis_url, tiny_clip, abo_products, tmp_path_factory):
    import uuid

    from tests.helpers import drop_redis_keys

    prefix = f"missrec-test-life-{uuid.uuid4().hex[:8]}"
    tmp = tmp_path_factory.mktemp("life")
    with TestClient(make_app(scientific_bundle, redis_url, prefix, tiny_clip, tmp)) as client:
        written = _deploy(client, ds, abo_products, redis_url, prefix)
    yield prefix, written
    drop_redis_keys(redis_url, prefix)


@pytest.fixture(scope="module")
def snapshot(deployment, redis_url, scientific_bundle, scientific_dir, tmp_path_factory):
    prefix, _ = deployment
    return take_snapshot(
        redis_url, scientific_bundle, scientific_dir, tmp_path_factory.mktemp("snap") / "s", prefix=prefix
    )


def test_old_sequences_rebuild_the_leave_one_out_rows_exactly(ds):
    seqs = old_sequences(ds)
    assert len(seqs) == len(ds.user_ids)
    index = ds.item_index()
    splits = split_leave_one_out([[index[i] - 1 for i in seqs[u]] for u in ds.user_ids], ds.max_len)
    for name in ("train", "valid", "test"):
        rows = ds.split(name)
        assert len(splits[name]) == len(rows)
        for r, (_, history, target) in enumerate(splits[name][:3000]):
            assert history == (rows.histories[r, : rows.lengths[r]] - 1).tolist() and target == rows.targets[r] - 1


def test_snapshot_holds_every_history_in_time_order_and_every_live_item(snapshot, deployment, ds, redis_url):
    prefix, written = deployment
    snap = snapshot.dataset
    new, gone = written["new"], written["deleted_bundle_item"]
    # items: the bundle's minus the deleted one, then the live ingested ones; deleted ones left out
    assert snap.item_ids == tuple(i for i in ds.item_ids if i != gone) + tuple(new[:2])
    for item_id in (ds.item_ids[0], ds.item_ids[100]):
        row, old = snap.item_ids.index(item_id) + 1, ds.item_ids.index(item_id) + 1
        for m in ds.modalities:
            assert np.array_equal(snap.features[m][row], ds.features[m][old])  # the bundle's frozen features
    client = redis.Redis.from_url(redis_url)
    stored = client.hgetall(ItemStore(client, prefix).item_prefix + new[0])  # type: ignore[arg-type]
    for m in ds.modalities:  # an ingested item: the raw CLIP features the service stored at ingest
        raw = np.frombuffer(stored[f"a:feature_{m}".encode()], dtype=np.float32)
        assert np.array_equal(snap.features[m][snap.item_ids.index(new[0]) + 1], raw) and np.abs(raw).sum() > 0
    assert snap.texts[snap.item_ids.index(new[0])]
    # histories: real user ids, chronological, deleted and unknown items dropped
    got = old_sequences(snap)
    assert got == written["sequences"]
    counts = snapshot.manifest["counts"]
    assert (
        counts["users_written"] == N_USERS and counts["ingested_items"] == 2 and counts["deleted_items_left_out"] == 2
    )
    assert counts["events_on_unknown_items"] == 1
    assert counts["events_on_deleted_items"] >= 1 + sum(1 for u in range(0, N_USERS, 4) if u % 3 == 2)
    m = json.loads((snapshot.out / SNAPSHOT_FILE).read_text())
    assert m["bundle"]["model_kind"] == "missrec" and m["dataset"]["fingerprint"] == snap.fingerprint


def test_snapshot_is_deterministic(snapshot, deployment, redis_url, scientific_bundle, scientific_dir, tmp_path):
    again = take_snapshot(redis_url, scientific_bundle, scientific_dir, tmp_path / "again", prefix=deployment[0])
    files = sorted(p.name for p in snapshot.out.iterdir())
    assert files == sorted(p.name for p in again.out.iterdir())
    for name in files:
        if name != SNAPSHOT_FILE:
            assert (snapshot.out / name).read_bytes() == (again.out / name).read_bytes(), name
    drop = lambda m: {k: v for k, v in m.items() if k not in {"created_at", "seconds"}}  # noqa: E731
    assert drop(snapshot.manifest) == drop(again.manifest)


def test_merge_keeps_history_that_aged_out_without_doubling_the_overlap(
    deployment, ds, redis_url, scientific_bundle, scientific_dir, tmp_path
):
    prefix, written = deployment
    merged = take_snapshot(
        redis_url, scientific_bundle, scientific_dir, tmp_path / "m", prefix=prefix, merge=scientific_dir
    )
    seqs, old = old_sequences(merged.dataset), old_sequences(ds)
    gone, new = written["deleted_bundle_item"], written["new"]
    for u in range(N_USERS):  # Redis holds the tail of the old sequence (+ extras): the overlap is not repeated
        user = ds.user_ids[u]
        live_old = [i for i in old[user] if i != gone]
        extra = [new[u % 3]] if u % 4 == 0 and u % 3 != 2 else []
        assert seqs[user] == live_old + extra, user
    others = [u for u in ds.user_ids[N_USERS:] if gone not in old[u]][:50]
    assert all(seqs[u] == old[u] for u in others)  # users only the old dataset has keep their whole history
    assert merged.manifest["counts"]["users_merged"] == N_USERS


def test_snapshot_refuses_a_dataset_that_is_not_the_bundles(deployment, redis_url, scientific_bundle, tmp_path):
    from missrec.data.synthetic import generate_synthetic

    other = tmp_path / "synthetic"
    generate_synthetic(other, num_users=50, num_items=40, seed=0)
    with pytest.raises(SnapshotError, match="is not the dataset bundle"):
        take_snapshot(redis_url, scientific_bundle, other, tmp_path / "x", prefix=deployment[0])
    assert not (tmp_path / "x").exists()
    r = CliRunner().invoke(
        cli, ["snapshot", "--redis", redis_url, "--prefix", deployment[0], "--bundle", str(scientific_bundle),
              "--data", str(other), "--out", str(tmp_path / "x")],
    )  # fmt: skip
    assert r.exit_code == 2 and "is not the dataset bundle" in r.output


def test_snapshot_against_redis_cluster(
    redis_cluster, scientific_bundle, scientific_dir, ds, tiny_clip, abo_products, tmp_path
):
    with TestClient(
        make_app(scientific_bundle, redis_cluster, "missrec-life-cluster", tiny_clip, tmp_path, redis_cluster=True)
    ) as client:
        written = _deploy(client, ds, abo_products, redis_cluster, "missrec-life-cluster", cluster=True)
    r = CliRunner().invoke(
        cli, ["snapshot", "--redis", redis_cluster, "--cluster", "--prefix", "missrec-life-cluster", "--bundle",
              str(scientific_bundle), "--data", str(scientific_dir), "--out", str(tmp_path / "c")],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    snap = load_dataset(tmp_path / "c")
    assert old_sequences(snap) == written["sequences"]  # every user, whichever node holds its slot
    assert set(written["new"][:2]) <= set(snap.item_ids)


def test_snapshot_train_evaluate_and_swap_end_to_end(snapshot, scientific_bundle, redis_url, deployment, tiny_clip,
                                                      tmp_path):  # fmt: skip
    """The retrain loop on what the service saw: snapshot -> train -> export -> evaluate-bundle -> swap."""
    import shutil

    from harness.launch import InProcessServer
    from index_builder.build import build_index
    from missrec.recipes.missrec import train_missrec
    from missrec.training.loop import TrainOptions
    from missrec.training.run import save_run
    from model_export.bundle import export_bundle
    from serving_core.bundle import read_bundle, read_manifest

    root = tmp_path / "bundles"
    shutil.copytree(scientific_bundle, root / "current")
    snap = snapshot.dataset
    run = train_missrec(snap, TrainOptions(epochs=1, progress=False), "inductive")
    save_run(run, snap, tmp_path / "run")
    export_bundle(tmp_path / "run" / "checkpoint.pt", snapshot.out, root / "next")
    build_index(root / "next", "Flat", "cpu", progress=False)
    ids = json.loads((root / "next" / "items" / "ids.json").read_text())
    assert "abo-life-0" in ids and "abo-life-2" not in ids  # ingested items are ordinary bundle items; deleted: gone
    # evaluate-bundle through the serving path: the current bundle embeds the items it lacks, as the service does
    current = score_bundle(root / "current", snap)
    assert current.ingested == 2 and current.deleted == 1
    cmp = evaluate_bundles(root / "next", root / "current", snapshot.out)
    assert cmp.new.ingested == 0 and cmp.users == N_USERS
    assert cmp.interval.low <= cmp.interval.mean_diff <= cmp.interval.high
    same = evaluate_bundles(root / "current", root / "current", snapshot.out)
    assert same.interval.mean_diff == 0.0 and same.verdict == "not distinguishable"
    r = CliRunner().invoke(
        cli, ["evaluate-bundle", "--bundle", str(root / "current"), "--against", str(root / "current"), "--data",
              str(snapshot.out), "--require-better", "--out", str(tmp_path / "cmp.json")],
    )  # fmt: skip
    assert r.exit_code == 1 and "not distinguishable" in r.output and "refused" in r.output
    assert json.loads((tmp_path / "cmp.json").read_text())["verdict"] == "not distinguishable"
    # swap: the deployment's own Redis (its items and histories), API key set, the bundles under one root
    prefix, _ = deployment
    new_version = read_manifest(root / "next").version
    app = make_app(root / "current", redis_url, prefix, tiny_clip, tmp_path / "svc", api_key="life-key", warmup=False)
    with InProcessServer(app) as server:
        swap = ["swap", "--url", server.url, "--bundle", str(root / "next"), "--api-key", "life-key"]
        refused = CliRunner().invoke(cli, [*swap, "--require-better", "--against", str(root / "next"), "--data",
                                           str(snapshot.out)])  # fmt: skip
        assert refused.exit_code == 1 and "not announced" in refused.output, refused.output  # not ahead of itself
        r = CliRunner().invoke(cli, swap)
        assert r.exit_code == 0 and new_version in r.output, r.output
        body = httpx.post(f"{server.url}/v1/recommend", json={"user_id": snap.user_ids[0], "k": 10}).json()
        assert body["model_version"] == new_version
        assert httpx.get(f"{server.url}/v1/items/abo-life-2").status_code == 404  # deleted stays deleted
        # the item now ships in the bundle too; its Redis record (the same raw features) is re-embedded by the new
        # item tower, which gives exactly the bundle's own row
        served = app.state.service.catalogue.current
        table = read_bundle(root / "next").table
        np.testing.assert_allclose(
            served.tokens[served.row("abo-life-0")], table.tokens[ids.index("abo-life-0")], rtol=1e-5, atol=1e-5
        )


def test_snapshot_keeps_line_breaks_caps_each_user_and_skips_bad_records(
    ds, scientific_bundle, scientific_dir, redis_url, key_prefix, tiny_clip, abo_products, tmp_path
):
    """An item text with line breaks is read back exactly (the line-oriented .text would shift texts onto other
    items); a user costs at most ``max_user_events`` events; malformed Redis contents are skipped and counted, and
    the command says so in one line instead of a traceback."""
    product = next(p for p in abo_products if p["images"])
    text = "  first line\nsecond line\r\nthird\rfourth\t end  "
    with TestClient(make_app(scientific_bundle, redis_url, key_prefix, tiny_clip, tmp_path)) as c:
        image = product["images"][0].read_bytes()
        r = c.post("/v1/items", data={"item_id": "multi-line", "text": text}, files={"image": image})
        assert r.status_code == 201, r.text
        for u in range(3):
            seq = [ds.item_ids[u], ds.item_ids[u + 10], "multi-line", ds.item_ids[u + 20]] + [ds.item_ids[u + 30]] * (
                u == 0
            )
            stamps = [T0 + 60 * j for j in range(len(seq))]
            r = c.post(f"/v1/users/u-{u}/events", json={"item_ids": seq, "timestamps": stamps})
            assert r.status_code == 200, r.text
    client = redis.Redis.from_url(redis_url)
    store = ItemStore(client, key_prefix)  # type: ignore[arg-type]
    stored = client.hget(store.item_prefix + "multi-line", "text").decode()
    assert "\n" in stored
    client.hset(f"{key_prefix}:u:{{bad1}}:hist", "not", "a list")
    client.rpush(f"{key_prefix}:u:{{bad2}}:hist", b"not-a-time\x1f" + ds.item_ids[0].encode())
    client.rpush(f"{key_prefix}:u:{{bad3}}:hist", b"\xff\xfe")
    client.zadd(store.ids_key, {"broken-item": 10**9})
    client.hset(store.item_prefix + "broken-item", mapping={"version": "not-a-number"})

    snap = take_snapshot(
        redis_url, scientific_bundle, scientific_dir, tmp_path / "snap", prefix=key_prefix, max_user_events=4
    )
    texts = dict(zip(snap.dataset.item_ids, snap.dataset.texts, strict=True))
    assert texts["multi-line"] == stored
    assert texts[ds.item_ids[5]] == ds.texts[5]  # the other items keep their own texts
    counts = snap.manifest["counts"]
    assert counts["bad_records"] == 4 and len(snap.manifest["bad_records"]) == 4
    assert counts["users_written"] == 3 and counts["events_beyond_cap"] == 1
    r = CliRunner().invoke(
        cli,
        ["snapshot", "--redis", redis_url, "--bundle", str(scientific_bundle), "--data", str(scientific_dir),
         "--out", str(tmp_path / "cli"), "--prefix", key_prefix],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "skipped 4 malformed Redis records" in r.stdout.replace("\n", " ")
