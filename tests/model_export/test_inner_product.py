"""MSM4SR and MMSRec exported and served: ONNX parity at several lengths and batch sizes, the bundle's top-50 equal
to the PyTorch model's full ranking for 500 real Scientific test users, and the service end to end on a bundle of
each model (events -> recommend -> ingest a real ABO photo -> recommended -> delete), without service changes.

Bundles: one fine-tuning epoch on the REAL Scientific data (conftest ``seed_bundles``; MMSRec at hidden 64)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from clip_features.torch_encoder import ClipEncoder
from missrec.data.dataset import load_dataset
from missrec.models.checkpoint import attach_features, load_checkpoint, save_checkpoint
from missrec.recipes.mmsrec import build_mmsrec
from missrec.recipes.msm4sr import build_msm4sr
from model_export.bundle import export_bundle
from model_export.inner_product import check_user_parity
from model_export.mmsrec import MMSRecExport
from model_export.msm4sr import MSM4SRExport
from model_export.parity import ExportError, random_histories
from serving_core.bundle import INNER_PRODUCT, ITEM_VECTOR, read_bundle, verify_checksums
from serving_core.index import load_index
from serving_core.scoring import ItemScorer
from serving_core.topk import top_k
from serving_core.towers import ItemArrays, feature_input, load_towers, open_session
from tests.service_helpers import make_app


def _spec(model):
    """The model's family export (what it puts in its inner_product bundle)."""
    return (MSM4SRExport if type(model).__name__ == "MSM4SR" else MMSRecExport)(model)


KINDS = ("msm4sr", "msm4sr-transductive", "msm4sr-hybrid", "mmsrec")
N_USERS, K = 500, 50


@pytest.fixture(scope="module")
def ds(scientific_dir):
    return load_dataset(scientific_dir)


def _model(run, ds):
    ckpt = load_checkpoint(run / "checkpoint.pt")
    attach_features(ckpt.model, ds, ckpt.meta)
    return ckpt.model.eval()


@pytest.mark.parametrize("kind", KINDS)
def test_bundle_manifest_describes_an_inner_product_model(seed_bundles, kind):
    _, bundle = seed_bundles(kind)
    m = verify_checksums(bundle)
    assert m.model_kind == kind.split("-")[0] and m.version.startswith(m.model_kind + "-")
    assert m.scorer.kind == INNER_PRODUCT and m.modalities == ("text", "image") and m.num_interests == 0
    assert m.index is not None and m.index.factory == "Flat" and m.index.exact
    parity = m.export["parity"]
    assert set(parity) == {"user_max_abs_diff", "encode_max_abs_diff", "item_max_abs_diff"}
    assert max(parity.values()) <= 1e-4
    if kind == "mmsrec":  # one cosine: nothing to split; history = L - 1 items (one slot for [MASK])
        assert m.scorer.blocks == () and m.max_len == m.model["max_len"] - 1 and m.dims.hidden == 64
    else:  # cos_t + cos_v: the two halves explain the score
        d = m.model["hidden"]
        assert [(b.name, b.start, b.stop) for b in m.scorer.blocks] == [("text", 0, d), ("image", d, 2 * d)]
        assert m.dims.hidden == m.dims.token == 2 * d and m.max_len == m.model["max_len"]


@pytest.mark.parametrize("kind", KINDS)
def test_onnx_towers_match_pytorch_at_several_lengths_and_batch_sizes(seed_bundles, ds, kind):
    run, bundle = seed_bundles(kind)
    model = _model(run, ds)
    towers = load_towers(bundle, "cpu")
    rng = np.random.default_rng(7)
    for length in (1, 2, 5, 13, _spec(model).history_len):
        for batch in (1, 3, 32):
            items = random_histories(rng, batch, length, ds.num_items)
            lengths = (items > 0).sum(axis=1)
            with torch.no_grad():
                want = model.encode(torch.from_numpy(items), torch.from_numpy(lengths)).numpy()
            got = towers.user.encode([h[:n] for h, n in zip(items, lengths, strict=True)])
            assert np.abs(got - want).max() <= 1e-4, (length, batch)
    # longer histories than the model takes: the service truncates to the last max_len items, as the model does
    n = _spec(model).history_len
    long = rng.integers(1, ds.num_items, size=(4, n + 9))
    with torch.no_grad():
        want = model.encode(torch.from_numpy(long[:, -n:]), torch.full((4,), n)).numpy()
    assert np.abs(towers.user.encode(list(long)) - want).max() <= 1e-4
    # the item tower on real features of catalogue items reproduces the table (inductive: no ID part)
    rows = np.arange(1, 65)
    out = towers.item.encode(ds.features["text"][rows], ds.features["image"][rows])
    if kind not in ("msm4sr-transductive", "msm4sr-hybrid"):
        assert np.abs(out[ITEM_VECTOR] - towers.table.vectors[ITEM_VECTOR][rows]).max() <= 1e-4
        assert np.abs(out["tokens"] - towers.table.tokens[rows]).max() <= 1e-4
    else:  # the table rows carry the ID embeddings a new item does not have
        assert np.abs(out["tokens"] - towers.table.tokens[rows]).max() > 1e-3


@pytest.mark.parametrize("kind", KINDS)
def test_bundle_topk_equals_pytorch_full_ranking(seed_bundles, ds, kind):
    run, bundle = seed_bundles(kind)
    model = _model(run, ds)
    towers = load_towers(bundle, "cpu")
    index, info = load_index(bundle, towers.manifest, "cpu")
    users = np.sort(np.random.default_rng(0).choice(len(ds.test), size=N_USERS, replace=False))
    histories = [ds.test.histories[u, : ds.test.lengths[u]] for u in users]
    with torch.no_grad():
        scores = model.full_scores(
            torch.from_numpy(ds.test.histories[users]), torch.from_numpy(ds.test.lengths[users])
        ).numpy()
    for b, h in enumerate(histories):
        scores[b, h] = -np.inf  # exclude_seen, as served
    expected = np.argsort(-scores, axis=1, kind="stable")[:, :K]
    items = ItemScorer(towers.manifest.scorer, towers.table.vectors, None, info.max_gap)
    found = top_k(towers.user.encode(histories), K, index, items, exclude=[set(h.tolist()) for h in histories])
    assert found.exact and (found.counts == K).all()
    # equal lists, up to the order of items whose scores agree to float rounding (seen: ~1e-7 apart, both ways)
    ranked = np.sort(scores, axis=1)[:, ::-1][:, :K]
    served_by_torch = np.take_along_axis(scores, found.ids, axis=1)
    assert np.abs(served_by_torch - ranked).max() <= 1e-5
    assert np.abs(found.scores - ranked).max() <= 1e-4
    identical = sum(np.array_equal(found.ids[b], expected[b]) for b in range(N_USERS))
    assert identical >= N_USERS * 0.95, f"only {identical} of {N_USERS} top-{K} lists are identical"


@pytest.mark.parametrize("kind", ["msm4sr", "mmsrec"])
def test_service_end_to_end_on_a_bundle_of_each_model(
    seed_bundles, ds, kind, redis_url, key_prefix, tiny_clip, abo_dir, tmp_path, abo_products
):
    _, bundle = seed_bundles(kind)
    ids = ["", *ds.item_ids]
    user = 23
    rows = ds.test.histories[user, : ds.test.lengths[user]].tolist()
    towers = load_towers(bundle, "cpu")
    with TestClient(make_app(bundle, redis_url, key_prefix, tiny_clip, tmp_path)) as client:
        ready = client.get("/readyz").json()
        assert ready["status"] == "ok" and kind in ready["checks"]["bundle"], ready
        r = client.post(f"/v1/users/{ds.user_ids[user]}/events", json={"item_ids": [ids[i] for i in rows]})
        assert r.status_code == 200, r.text
        body = client.post("/v1/recommend", json={"user_id": ds.user_ids[user], "k": 20, "explain": True}).json()
        assert body["model_version"] == towers.manifest.version and body["exact"] is True
        u = towers.user.encode([np.asarray(rows)])[0]
        scores = towers.table.vectors[ITEM_VECTOR] @ u
        scores[[0, *rows]] = -np.inf
        want = np.lexsort((np.arange(scores.size), -scores))[:20]
        assert [i["item_id"] for i in body["items"]] == [ids[r] for r in want]
        np.testing.assert_allclose([i["score"] for i in body["items"]], scores[want], atol=1e-4)
        for item in body["items"]:
            if kind == "mmsrec":  # one cosine: no sides to weigh or split, but the history items behind it
                e = item["explanation"]
                assert e["text_weight"] is None and e["image_weight"] is None and e["score_split"] == []
                assert e["because"] and {b["item_id"] for b in e["because"]} <= {ids[r] for r in rows}
            else:  # each half's share of cos_t + cos_v
                e = item["explanation"]
                assert e["interest"] is None and e["text_weight"] + e["image_weight"] == pytest.approx(1.0, abs=1e-4)
        top = [i["item_id"] for i in body["items"]]
        again = client.post("/v1/recommend", json={"user_id": ds.user_ids[user], "k": 20, "exclude": top}).json()
        assert len(again["items"]) == 20 and not set(top) & {i["item_id"] for i in again["items"]}

        product = next(p for p in abo_products if len(p["images"]) >= 2)
        new_ids = [f"abo-{kind}-{i}" for i in range(2)]
        for item_id, image in zip(new_ids, product["images"], strict=False):
            r = client.post(
                "/v1/items", data={"item_id": item_id, "text": product["text"]}, files={"image": image.read_bytes()}
            )
            assert r.status_code == 201, r.text
        # served as the bundle's own item tower scores it, on the features open_clip gives for the same photo + text
        clip = ClipEncoder(*tiny_clip)
        feats = [clip.encode_item(product["text"], image.read_bytes()) for image in product["images"][:2]]
        new = towers.item.encode(*(np.stack([f[m] for f in feats]) for m in ("text", "image")))
        arrays = ItemArrays(np.concatenate([towers.table.tokens, new["tokens"]]), {})
        u = towers.user.encode([[arrays.num_items - 2]], arrays)[0]  # the history made of the first new item
        offline = np.concatenate([towers.table.vectors[ITEM_VECTOR], new[ITEM_VECTOR]]) @ u
        everything = {"history": new_ids[:1], "k": 1000, "exclude_seen": False}
        served = {i["item_id"]: i["score"] for i in client.post("/v1/recommend", json=everything).json()["items"]}
        for j, item_id in enumerate(new_ids):
            rank = int((offline[1:] > offline[-2 + j]).sum())
            assert (item_id in served) == (rank < 1000) and served.get(item_id, offline[-2 + j]) == pytest.approx(
                offline[-2 + j], abs=1e-4
            ), (item_id, rank)
        if kind == "msm4sr":  # recommended for itself and for its sibling (MMSRec: see docs/seed-towers.md)
            own = client.post("/v1/recommend", json={**everything, "k": 10}).json()
            assert set(new_ids) <= {i["item_id"] for i in own["items"]}, own
        assert client.get(f"/v1/items/{new_ids[1]}").json()["source"] == "ingested"
        assert client.delete(f"/v1/items/{new_ids[1]}").status_code == 204
        gone = client.post("/v1/recommend", json={"history": new_ids[:1], "k": 1000}).json()
        assert new_ids[1] not in [i["item_id"] for i in gone["items"]] and len(gone["items"]) == 1000


@pytest.mark.parametrize("build", [build_msm4sr, build_mmsrec])
def test_one_modality_model_exports_a_one_input_item_tower(build, ds, scientific_dir, tmp_path):
    model = build(ds, image_dim=0)
    save_checkpoint(tmp_path / "ckpt.pt", model)
    manifest = export_bundle(tmp_path / "ckpt.pt", scientific_dir, tmp_path / "bundle")
    assert manifest.modalities == ("text",) and set(manifest.dims.features) == {"text"}
    session = open_session(tmp_path / "bundle" / manifest.graphs["item"].file, "cpu")
    assert [i.name for i in session.get_inputs()] == [feature_input("text")]
    assert read_bundle(tmp_path / "bundle").table.tokens.shape[1] == _spec(model).token_dim


def test_parity_check_fails_when_the_graph_does_not_reproduce_the_model(seed_bundles, ds):
    run, bundle = seed_bundles("msm4sr")
    model = _model(run, ds)
    session = open_session(bundle / "user_tower.onnx", "cpu")
    tokens = read_bundle(bundle).table.tokens
    assert check_user_parity(_spec(model), session, tokens) <= 1e-4
    with torch.no_grad():
        model.encoder.position.weight.mul_(1.5)  # the exported graph no longer is this model
    with pytest.raises(ExportError, match="disagree on the user vector"):
        check_user_parity(_spec(model), session, tokens)
