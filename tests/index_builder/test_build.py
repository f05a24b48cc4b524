"""build_index / load_index on a small bundle (item table only, no ONNX towers): files, manifest, params, recall."""

import faiss
import numpy as np
import pytest

from index_builder.build import build_from_vectors, build_index
from serving_core import index as index_mod
from serving_core.bundle import (
    FORMAT,
    FORMAT_VERSION,
    INDEX_FILE,
    MISSREC_FUSION,
    BundleError,
    BundleWriter,
    Dims,
    Graph,
    ItemTable,
    Manifest,
    Scorer,
    creation_info,
    read_manifest,
    static_vectors,
    verify_checksums,
)
from serving_core.index import DeviceError, resolve_device

pytestmark = pytest.mark.oracle

N, D, K = 800, 16, 6


def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def make_bundle(root, transductive=False, alpha=0.5):
    """SYNTHETIC bundle: 800 items in 6 clusters, text + image (+ ID) vectors, no ONNX files."""
    rng = np.random.default_rng(0)
    cluster = rng.integers(1, K + 1, N)
    cluster[0] = 0
    centers = _unit(rng.standard_normal((K + 1, D)))
    base = centers[cluster] + 0.3 * rng.standard_normal((N, D)).astype(np.float32)
    vectors = {m: _unit(base + 0.2 * rng.standard_normal((N, D))) for m in ("text", "image")}
    table = ItemTable(
        ids=[""] + [f"i{r}" for r in range(1, N)],
        tokens=(vectors["text"] + vectors["image"]).astype(np.float32),
        vectors=vectors,
        clusters={"text": cluster.astype(np.int64), "image": cluster.astype(np.int64)},
        popularity=rng.random(N).astype(np.float32),
        id_vectors=_unit(rng.standard_normal((N, D))) if transductive else None,
    )
    manifest = Manifest(
        format=FORMAT,
        format_version=FORMAT_VERSION,
        model_kind="missrec",
        model={"mode": "transductive" if transductive else "inductive"},
        dims=Dims(hidden=D, token=D, features={"text": 8, "image": 8}),
        scorer=Scorer(MISSREC_FUSION, ("text", "image"), alpha, 0.07, transductive),
        graphs={"user": Graph("user_tower.onnx", (), ()), "item": Graph("item_tower.onnx", (), ())},
        num_items=N,
        num_interests=K,
        max_len=50,
        created=creation_info("tests"),
    )
    writer = BundleWriter(root)
    writer.write_item_table(table)
    writer.write_centroids(np.vstack([np.zeros((1, D)), centers[1:]]))
    writer.finalize(manifest)
    return root, table


def load_index(root, device="cpu", params=None):
    return index_mod.load_index(root, read_manifest(root), device, params)


def test_flat_build_writes_index_and_refinalizes_manifest(tmp_path):
    root, table = make_bundle(tmp_path / "b")
    info = build_index(root, "Flat", "cpu", progress=False)
    assert (root / INDEX_FILE).is_file() and not (root / "index" / "index.json").exists()  # described once
    manifest = verify_checksums(root)  # the manifest lists (and matches) the new file
    assert INDEX_FILE in manifest.files and manifest.index == info
    assert info.exact and info.ntotal == N and info.metric == "inner_product" and info.details["recall_report"]["exact"]
    retrieval = info.details["retrieval"]
    assert retrieval["bound"] == pytest.approx(np.tanh(0.5))
    assert 0 < retrieval["tight_bound"] < retrieval["bound"] and 0 < info.max_gap < 2
    index, loaded = load_index(root, "cpu")
    assert loaded == info and index.ntotal == N
    # FAISS id = row; row 0 is a zero vector; the rest are the static vectors
    static = static_vectors(manifest.scorer, table.vectors, table.id_vectors)
    np.testing.assert_allclose(index.reconstruct(5), static[5], atol=1e-7)
    np.testing.assert_array_equal(index.reconstruct(0), 0.0)


@pytest.mark.parametrize(
    ("factory", "param"),
    [
        ("HNSW32", "efSearch"),
        ("IVF16,Flat", "nprobe"),
        ("IVF16,SQ8", "nprobe"),
        ("RR24,IVF16,SQ8", "nprobe"),  # rotated (inner products kept) and padded to a width SQ8's SIMD code takes
        ("IVF8,PQ8x4", "nprobe"),
    ],
)
def test_ann_factories_with_recall_report(tmp_path, factory, param):
    root, _ = make_bundle(tmp_path / "b", transductive=factory == "HNSW32")
    info = build_index(root, factory, "auto", recall_queries=50, progress=False)
    verify_checksums(root)
    assert info.factory == factory and not info.exact and info.details["built_on"] == "cpu"
    assert param in info.params
    rec = info.details["recall_report"]
    assert rec["source"] == "item-based pseudo-queries" and rec["queries"] == 50
    assert {"static_recall@10", "static_recall@100", "fused_recall@10", "mean_candidates"} <= set(rec)
    if "PQ" not in factory:
        assert rec["static_recall@10"] >= 0.9 and rec["fused_recall@10"] >= 0.9
    if factory.startswith("IVF"):
        assert info.details["train_points"] == N - 1
    index, _ = load_index(root, "cpu")
    assert index.ntotal == N


def test_search_params_are_settable_and_recorded(tmp_path):
    root, _ = make_bundle(tmp_path / "b")
    info = build_index(root, "IVF16,Flat", "cpu", params={"nprobe": 3}, recall_queries=20, progress=False)
    assert info.params == {"nprobe": 3}
    index, _ = load_index(root)
    assert faiss.extract_index_ivf(index).nprobe == 3
    index, _ = load_index(root, params={"nprobe": 7})
    assert faiss.extract_index_ivf(index).nprobe == 7
    info = build_index(root, "HNSW16", "cpu", params={"efSearch": 40}, recall_queries=20, progress=False)
    index, _ = load_index(root)  # a rebuild replaces the index and keeps the manifest valid
    verify_checksums(root)
    assert faiss.downcast_index(index).hnsw.efSearch == 40 and info.params == {"efSearch": 40}


def test_real_user_vectors_feed_the_recall_report(tmp_path):
    root, table = make_bundle(tmp_path / "b")
    users = _unit(table.vectors["text"][1:31] + 0.1)
    info = build_index(root, "HNSW32", "cpu", user_vectors=users, recall_queries=100, progress=False)
    report = info.details["recall_report"]
    assert report["source"] == "user vectors" and report["queries"] == 30


def test_device_errors_and_bad_factory(tmp_path):
    if faiss.get_num_gpus() > 0:
        pytest.skip("this machine has a FAISS GPU")
    with pytest.raises(DeviceError, match="device 'gpu' requested"):
        resolve_device("gpu")
    assert resolve_device("auto") == "cpu"
    with pytest.raises(DeviceError, match="one of"):
        resolve_device("tpu")
    root, _ = make_bundle(tmp_path / "b")
    with pytest.raises(DeviceError, match="use --device cpu"):
        build_index(root, "Flat", "gpu", progress=False)
    with pytest.raises(ValueError, match="index_factory"):
        build_from_vectors(np.zeros((10, D), np.float32), "NoSuchIndex", "cpu")
    assert not (root / INDEX_FILE).exists()  # nothing written on failure
    verify_checksums(root)


def test_load_without_index_and_tampered_bundle(tmp_path):
    root, _ = make_bundle(tmp_path / "b")
    with pytest.raises(BundleError, match="has no index"):
        load_index(root)
    (root / "items/text.npy").write_bytes((root / "items/image.npy").read_bytes())
    with pytest.raises(BundleError, match="checksum"):
        build_index(root, "Flat", "cpu", progress=False)


def test_a_pre_transformed_index_stays_on_the_cpu(monkeypatch):
    """RR304,IVF…,SQ8 and the like: FAISS would move only the inner index to a GPU (a CPU wrapper the service's GPU
    checks do not see), so 'auto' keeps it on the CPU and 'gpu' is refused (as if a GPU were present)."""
    index = faiss.index_factory(D, "RR24,IVF4,SQ8", faiss.METRIC_INNER_PRODUCT)
    monkeypatch.setattr(index_mod, "resolve_device", lambda device: "gpu")
    assert index_mod.to_device(index, "auto") is index
    with pytest.raises(DeviceError, match="CPU only"):
        index_mod.to_device(index, "gpu")
