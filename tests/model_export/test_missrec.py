"""ONNX export of the towers and the serving bundle: validation, parity with PyTorch at every shape, failure modes.

Tiny SYNTHETIC models trained for one epoch; the oracle is always the PyTorch model the bundle was exported from.
"""

import os
import shutil

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F

from missrec.models.checkpoint import save_checkpoint
from missrec.models.sasrec import SASRec, SASRecConfig
from missrec.training.loop import TrainOptions, fit
from model_export import bundle as export_module
from model_export.bundle import export_bundle
from model_export.missrec import UserTowerGraph, check_user_parity, export_user_tower
from model_export.onnx import EXPORTER, OPSET
from model_export.parity import ExportError, random_histories
from serving_core import towers as towers_mod
from serving_core.bundle import ITEM_TOWER, MISSREC_FUSION, USER_TOWER, BundleError, read_bundle, sha256_file
from serving_core.towers import (
    CPU,
    CUDA,
    ItemArrays,
    TowerError,
    choose_providers,
    interest_ids,
    load_towers,
    open_session,
)
from tests.helpers import tiny_dataset, tiny_missrec

ONE_EPOCH = TrainOptions(epochs=1, batch_size=256, progress=False)
ATOL = 1e-4


def _train_and_export(root, modalities=("text", "image"), mode="inductive", id_dropout=0.0, **data_kw):
    """Dataset, trained model (clusters refreshed so stored lookups = nearest centroid), checkpoint, bundle."""
    ds = tiny_dataset(root / "data", modalities=modalities, **data_kw)
    model = tiny_missrec(ds, mode=mode, id_dropout=id_dropout)
    fit(model, ds.train, ds.valid, ONE_EPOCH)
    model.discover_interests(generator=torch.Generator().manual_seed(0))
    model.eval()
    checkpoint = save_checkpoint(root / "run" / "checkpoint.pt", model, dataset={"fingerprint": ds.fingerprint})
    manifest = export_bundle(checkpoint, root / "data", root / "bundle")
    return ds, model, checkpoint, manifest, root / "bundle"


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    # histories up to 60 items: real rows reach max_len 50 and get truncated
    return _train_and_export(tmp_path_factory.mktemp("export"), max_seq_len=60)


@pytest.fixture(scope="module")
def towers(exported):
    return load_towers(exported[4], providers="cpu")


@torch.no_grad()
def _torch_feeds(model, items):
    tables = model.item_tables()
    ids = model.interest_ids(items)
    return {
        "tokens": tables.tokens[items],
        "lengths": (items > 0).sum(dim=1),
        "interests": model.centroids[ids],
        "interest_lengths": (ids > 0).sum(dim=1).clamp(min=1),
    }


# ----- the bundle -------------------------------------------------------------------------------------------------
def test_bundle_validates_and_records_the_export(exported):
    ds, model, checkpoint, manifest, root = exported
    bundle = read_bundle(root)
    loaded, table, centroids = bundle.manifest, bundle.table, bundle.centroids
    assert loaded.files == manifest.files and USER_TOWER in manifest.files and ITEM_TOWER in manifest.files
    assert manifest.export["opset"] == OPSET and manifest.export["exporter"] == EXPORTER
    parity = manifest.export["parity"]
    assert parity["user_max_abs_diff"] <= ATOL and parity["encode_max_abs_diff"] <= ATOL
    assert parity["item_max_abs_diff"] <= ATOL
    assert manifest.export["stored_cluster_is_nearest"] == 1.0  # clusters were refreshed after training
    assert manifest.dims.hidden == 32 and manifest.dims.token == 32
    assert manifest.dims.features == {"text": 24, "image": 40}
    s = manifest.scorer
    assert (s.kind, s.modalities, s.tau, s.transductive) == (MISSREC_FUSION, ("text", "image"), 0.07, False)
    assert s.alpha == pytest.approx(model.alpha.item()) and manifest.model_kind == "missrec"
    assert manifest.graphs["user"].inputs == ("tokens", "lengths", "interests", "interest_lengths")
    assert manifest.graphs["item"].outputs == ("tokens", "text", "image", "text_cluster", "image_cluster")
    assert manifest.num_items == ds.num_items and manifest.max_len == 50
    assert manifest.num_interests == model.centroids.shape[0] - 1
    assert manifest.created["dataset_fingerprint"] == ds.fingerprint
    assert manifest.created["checkpoint_sha256"] == sha256_file(checkpoint)
    np.testing.assert_array_equal(centroids, model.centroids.numpy())
    assert table.ids == ["", *ds.item_ids] and table.texts == ["", *ds.texts] and table.id_vectors is None
    np.testing.assert_allclose(table.tokens, model.item_tables().tokens.detach().numpy(), atol=1e-6)
    assert table.popularity.dtype == np.float32 and table.popularity[0] == 0 and table.popularity.sum() > 0
    for name in (USER_TOWER, ITEM_TOWER):
        onnx.checker.check_model(onnx.load(str(root / name)), full_check=True)
    assert not [p for p in root.parent.iterdir() if p.name.startswith(".")]  # no temp folders left behind
    umask = os.umask(0)
    os.umask(umask)
    assert {p.stat().st_mode & 0o777 for p in root.rglob("*") if p.is_file()} == {0o666 & ~umask}
    assert root.stat().st_mode & 0o777 == 0o777 & ~umask


def test_tampering_with_any_byte_is_detected(exported, tmp_path):
    root = exported[4]
    for i, rel in enumerate(sorted(read_bundle(root).manifest.files)):
        copy = shutil.copytree(root, tmp_path / str(i))
        data = bytearray((copy / rel).read_bytes())
        data[len(data) // 2] ^= 0x01
        (copy / rel).write_bytes(bytes(data))
        with pytest.raises(BundleError, match="checksum"):
            read_bundle(copy)


def test_editing_the_manifest_is_detected(exported, tmp_path):
    import json

    copy = shutil.copytree(exported[4], tmp_path / "edited")
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["scorer"]["alpha"] += 0.5  # a plausible hand edit: every file checksum still matches
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="manifest digest mismatch"):
        read_bundle(copy)


def test_bundle_files_are_readable_by_others(exported):
    import stat

    for path in [exported[4], *exported[4].rglob("*")]:
        assert path.stat().st_mode & stat.S_IROTH, f"{path} is not world-readable"


def test_refuses_to_overwrite_and_to_export_other_models(exported, tmp_path):
    ds, _, checkpoint, _, root = exported
    with pytest.raises(ExportError, match="already exists"):
        export_bundle(checkpoint, ds.path, root)
    sasrec = save_checkpoint(tmp_path / "sasrec.pt", SASRec(SASRecConfig(num_items=ds.num_items, hidden=8)))
    with pytest.raises(ExportError, match="holds a sasrec model, which has no item tower"):
        export_bundle(sasrec, ds.path, tmp_path / "bundle")
    assert not (tmp_path / "bundle").exists()


def test_overwrite_replaces_the_bundle_only_when_the_new_one_is_complete(exported, tmp_path, monkeypatch):
    ds, _, checkpoint, manifest, root = exported
    out = shutil.copytree(root, tmp_path / "bundle")
    (out / "stale.txt").write_text("from the old bundle")

    def failing(model, ds, tmp, created):
        (tmp / "user_tower.onnx").write_bytes(b"half")
        raise ExportError("parity")

    monkeypatch.setattr(export_module, "write_bundle", failing)
    with pytest.raises(ExportError):
        export_bundle(checkpoint, ds.path, out, overwrite=True)
    assert (out / "stale.txt").exists()  # the old bundle is intact
    assert (out / "manifest.json").read_bytes() == (root / "manifest.json").read_bytes()

    def complete(model, ds, tmp, created):
        (tmp / "new.txt").write_text("new")
        return manifest

    monkeypatch.setattr(export_module, "write_bundle", complete)
    export_bundle(checkpoint, ds.path, out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]  # no temp or old folders left


# ----- user tower -------------------------------------------------------------------------------------------------
def _worst_diff(session, model, shapes, seed=1):
    """Max |ORT - torch| of the user vector over (length, batch) shapes of random real-item histories."""
    rng = np.random.default_rng(seed)
    worst = 0.0
    for length, batch in shapes:
        items = torch.from_numpy(random_histories(rng, batch, length, model.cfg.num_items))
        feeds = _torch_feeds(model, items)
        with torch.no_grad():
            expected = model.user_tower(*feeds.values())[0].numpy()
        got = session.run(["user"], {k: v.numpy() for k, v in feeds.items()})[0]
        assert got.shape == (batch, model.cfg.hidden)
        worst = max(worst, float(np.abs(got - expected).max()))
    return worst


def test_user_tower_runs_at_every_length_and_batch_size(exported):
    """The nn.Transformer fixed-shape trap: one graph, every history length 1..50 and batch 1..64."""
    _, model, _, _, root = exported
    shapes = [(length, batch) for length in range(1, 51) for batch in (1, 5, 16)]
    shapes += [(length, batch) for length in (1, 50) for batch in range(1, 65)]
    assert _worst_diff(open_session(root / USER_TOWER, "cpu"), model, shapes) <= ATOL


def test_legacy_exporter_graph_is_dynamic_too(exported, tmp_path):
    """The documented comparison: the TorchScript exporter also keeps every length dynamic for our layers."""
    model = exported[1]
    export_user_tower(model, tmp_path / "user.onnx", exporter="torchscript")
    shapes = [(length, 3) for length in range(1, 51)]
    assert _worst_diff(open_session(tmp_path / "user.onnx", "cpu"), model, shapes) <= ATOL


def test_encode_on_id_histories_matches_the_model(exported, towers):
    ds, model, _, _, _ = exported
    rows = np.concatenate([np.arange(200), np.flatnonzero(ds.train.lengths == 50)[:20]])
    assert (ds.train.lengths[rows] == 50).any()
    histories, lengths = ds.train.histories[rows], ds.train.lengths[rows]
    with torch.no_grad():
        expected = model.encode(torch.from_numpy(histories), torch.from_numpy(lengths))[0].numpy()
    as_lists = [h[:n].tolist() for h, n in zip(histories, lengths, strict=True)]
    np.testing.assert_allclose(towers.user.encode(as_lists), expected, atol=ATOL)
    # numpy interest ids are exactly the model's
    clusters = [towers.table.clusters[m] for m in ("text", "image")]
    np.testing.assert_array_equal(interest_ids(histories, clusters), model.interest_ids(torch.from_numpy(histories)))
    # longer than max_len: the last 50 items count
    long = np.random.default_rng(2).integers(1, ds.num_items, size=70)
    with torch.no_grad():
        tail = torch.from_numpy(long[-50:])[None]
        np.testing.assert_allclose(
            towers.user.encode([long]), model.encode(tail, torch.tensor([50]))[0].numpy(), atol=ATOL
        )


def test_user_tower_rejects_bad_histories(towers):
    towers.user.warm_up(batch_size=4)  # max-shape batch runs
    with pytest.raises(TowerError, match="empty"):
        towers.user.encode([[1, 2], []])
    with pytest.raises(TowerError, match="item ids"):
        towers.user.encode([[1, towers.manifest.num_items]])
    with pytest.raises(TowerError, match="item ids"):
        towers.user.encode([[0, 3]])
    with pytest.raises(TowerError):
        towers.user.encode([])
    with pytest.raises(TowerError, match="integer"):
        towers.user.encode([["a", "b"]])


def test_cold_items_appended_to_the_arrays_encode_like_the_originals(exported, towers):
    """Re-ingest existing items through the item tower as new rows: histories using the copies encode the same."""
    ds, _, _, _, _ = exported
    user = towers.user
    original = user.items
    reborn = np.array([3, 17, 42])
    out = towers.item.encode(ds.features["text"][reborn], ds.features["image"][reborn])
    n = original.num_items
    grown = ItemArrays(
        tokens=np.concatenate([original.tokens, out["tokens"]]),
        clusters={m: np.concatenate([c, out[f"{m}_cluster"]]) for m, c in original.clusters.items()},
    )
    history = [5, 3, 9, 17, 42]
    before = user.encode([history])
    user.replace_items(grown)
    try:
        after = user.encode([[5, n, 9, n + 1, n + 2]])
        with pytest.raises(TowerError):
            user.encode([[n + 3]])
    finally:
        user.replace_items(original)
    np.testing.assert_allclose(after, before, atol=ATOL)


# ----- item tower -------------------------------------------------------------------------------------------------
def test_item_tower_matches_the_model(exported, towers):
    ds, model, _, _, _ = exported
    rows = np.arange(1, ds.num_items)
    out = towers.item.encode(ds.features["text"][rows], ds.features["image"][rows])
    with torch.no_grad():
        tables = model.item_tables()
    np.testing.assert_allclose(out["tokens"], tables.tokens[1:].numpy(), atol=ATOL)  # inductive: no ID part
    for m in ("text", "image"):
        np.testing.assert_allclose(out[m], tables.normed[m][1:].numpy(), atol=ATOL)
        np.testing.assert_array_equal(out[f"{m}_cluster"], getattr(model, f"{m}_cluster")[1:].numpy())
    # a missing modality is an all-zero row
    text_only = towers.item.encode(ds.features["text"][rows[:4]], None)
    zeros = towers.item.encode(ds.features["text"][rows[:4]], np.zeros((4, 40), np.float32))
    for key in text_only:
        np.testing.assert_array_equal(text_only[key], zeros[key])
    with pytest.raises(TowerError, match="40"):
        towers.item.encode(None, np.zeros((2, 41), np.float32))
    with pytest.raises(TowerError):
        towers.item.encode(None, None)
    with pytest.raises(TowerError, match="NaN"):
        towers.item.encode(np.full((1, 24), np.nan, np.float32), None)


# ----- other model variants ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("id_dropout", [0.0, 0.5])  # 0.5: the ID + content hybrid, trained with ID dropout
def test_transductive_model_exports_with_id_embeddings(tmp_path, id_dropout):
    ds, model, _, manifest, root = _train_and_export(
        tmp_path, mode="transductive", id_dropout=id_dropout, num_users=100
    )
    assert manifest.scorer.transductive is True
    # the same graphs: an item without an ID (the item tower's output, ingested after training) is its content
    t = load_towers(root, providers="cpu")
    ids = model.item_id.weight.detach()
    np.testing.assert_allclose(t.table.id_vectors, F.normalize(ids, dim=-1).numpy(), atol=1e-6)
    cold = t.item.encode(ds.features["text"][1:], ds.features["image"][1:])["tokens"]
    np.testing.assert_allclose(t.table.tokens[1:], cold + ids[1:].numpy(), atol=ATOL)  # table = tower + ID
    histories, lengths = ds.test.histories[:64], ds.test.lengths[:64]
    with torch.no_grad():
        expected = model.encode(torch.from_numpy(histories), torch.from_numpy(lengths))[0].numpy()
    np.testing.assert_allclose(
        t.user.encode([h[:n] for h, n in zip(histories, lengths, strict=True)]), expected, atol=ATOL
    )


def test_one_modality_model_exports(tmp_path):
    ds, model, _, manifest, root = _train_and_export(tmp_path, modalities=("text",), num_users=100)
    assert manifest.scorer.modalities == ("text",) and manifest.dims.feature("image") == 0
    assert not (root / "items" / "image.npy").exists()
    t = load_towers(root, providers="cpu")
    out = t.item.encode(ds.features["text"][1:6], None)
    assert set(out) == {"tokens", "text", "text_cluster"}
    np.testing.assert_array_equal(out["text_cluster"], model.text_cluster[1:6].numpy())
    with pytest.raises(TowerError, match="modalities"):
        t.item.encode(None, np.zeros((2, 40), np.float32))
    with torch.no_grad():
        expected = model.encode(torch.from_numpy(ds.test.histories[:8]), torch.from_numpy(ds.test.lengths[:8]))[0]
    got = t.user.encode([h[:n] for h, n in zip(ds.test.histories[:8], ds.test.lengths[:8], strict=True)])
    np.testing.assert_allclose(got, expected.numpy(), atol=ATOL)


# ----- the parity check can fail ----------------------------------------------------------------------------------
def test_parity_check_fails_on_a_different_model(exported):
    ds, _, _, _, root = exported
    session = open_session(root / USER_TOWER, "cpu")
    other = tiny_missrec(ds, seed=7).eval()
    other.discover_interests(generator=torch.Generator().manual_seed(0))
    with pytest.raises(ExportError, match="disagree on the user vector"):
        check_user_parity(other, session)


def test_export_of_a_broken_graph_fails_and_leaves_nothing(exported, tmp_path, monkeypatch):
    """A graph that drifts from the model by ~1e-3 (as a mistranslated op would) must stop the export."""
    ds, _, checkpoint, _, _ = exported
    forward = UserTowerGraph.forward

    def drifted(self, *args, **kwargs):
        return F.normalize(forward(self, *args, **kwargs) + 1e-3, dim=-1)

    monkeypatch.setattr(UserTowerGraph, "forward", drifted)
    with pytest.raises(ExportError, match="user vector"):
        export_bundle(checkpoint, ds.path, tmp_path / "bundle")
    assert list(tmp_path.iterdir()) == []


# ----- providers --------------------------------------------------------------------------------------------------
def test_provider_choice(monkeypatch):
    import onnxruntime as ort

    if CUDA not in ort.get_available_providers():  # this machine: CPU only
        assert choose_providers("auto") == [CPU]
        with pytest.raises(RuntimeError, match="CUDAExecutionProvider was requested"):
            choose_providers("cuda")
    assert choose_providers("cpu") == [CPU]
    monkeypatch.setattr(towers_mod.ort, "get_available_providers", lambda: [CUDA, CPU])
    assert choose_providers("auto") == [CUDA, CPU] == choose_providers("cuda")
    assert choose_providers("cpu") == [CPU]
    with pytest.raises(ValueError, match="provider"):
        choose_providers("tpu")


def test_export_carries_the_attr_file_into_the_bundle(exported, tmp_path):
    """<Name>.attr in the data folder: its schema in the manifest, its values per row in items/attributes.jsonl."""
    import json

    ds, _, checkpoint, _, _ = exported
    data = tmp_path / "data"
    shutil.copytree(checkpoint.parent.parent / "data", data)
    ids = list(ds.item_ids)
    with (data / f"{ds.name}.attr").open("w") as f:
        for n, item in enumerate(ids):
            f.write(json.dumps({"item_id": item, "attributes": {"shelf": f"s{n % 3}", "price": n}}) + "\n")
    manifest = export_bundle(checkpoint, data, tmp_path / "bundle")
    assert manifest.attributes == {"price": "number", "shelf": "string"}
    rows = [json.loads(line) for line in (tmp_path / "bundle/items/attributes.jsonl").read_text().splitlines()]
    table_ids = read_bundle(tmp_path / "bundle").table.ids
    assert rows[0] == {} and len(rows) == len(table_ids)
    assert all(
        rows[r] == {"shelf": f"s{ids.index(i) % 3}", "price": float(ids.index(i))} for r, i in enumerate(table_ids) if r
    )
    (data / f"{ds.name}.attr").write_text(
        '{"item_id": "x", "attributes": {"price": "cheap"}}\n{"item_id": "y", "attributes": {"price": 3}}\n'
    )
    with pytest.raises(ExportError, match="price"):
        export_bundle(checkpoint, data, tmp_path / "bundle2")
    assert not (tmp_path / "bundle2").exists()
