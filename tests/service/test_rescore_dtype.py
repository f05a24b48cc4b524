"""MISSREC_RESCORE_DTYPE: honoured or refused at start-up; the float16 re-scoring serves the float32 top-k, ingested
rows included, and counts its rows in /metrics (the real Scientific bundle, its real ONNX towers)."""

from __future__ import annotations

import dataclasses
import shutil

import numpy as np
import pytest
from pydantic import ValidationError

from index_builder.build import build_index
from service.catalogue import Catalogue
from service.metrics import Metrics
from service.recommender import rank
from service.serving_model import ServingModel
from service.settings import Settings
from service.store import ItemRecord
from serving_core.bundle import BundleError, read_manifest
from serving_core.topk import top_k


def _load(bundle, dtype: str, **options) -> ServingModel:
    model = ServingModel.load(bundle, Settings(bundle=bundle, onnx_provider="cpu", rescore_dtype=dtype))
    return dataclasses.replace(model, options=dataclasses.replace(model.options, **options)) if options else model


def test_the_setting_is_honoured_or_refused(scientific_bundle, tmp_path):
    root = shutil.copytree(scientific_bundle, tmp_path / "bundle")
    described = read_manifest(root).rescore_vectors
    assert set(described) == {"text", "image"}  # build-index wrote the float16 copies, with their bounds
    assert all(0 < d["error"] < 1e-3 and d["dtype"] == "float16" for d in described.values())
    for dtype, half in (("auto", True), ("float16", True), ("float32", False)):
        assert _load(root, dtype).rescore_half is half
    build_index(root, "Flat", "cpu", progress=False, float16=False)  # an old-style bundle: no copies
    assert not read_manifest(root).rescore_vectors and not list((root / "items").glob("*.f16.npy"))
    assert _load(root, "auto").rescore_half is False
    with pytest.raises(BundleError, match="MISSREC_RESCORE_DTYPE=float16 but the bundle has no float16 copies"):
        _load(root, "float16")
    with pytest.raises(ValidationError):
        Settings(rescore_dtype="int8")


def test_float16_serves_the_float32_topk_with_ingested_rows(scientific_bundle):
    # exact_scan_below=0: the bounded search (not the small-catalogue scan) on the 1,586 real items
    half, full = _load(scientific_bundle, "auto", exact_scan_below=0), _load(scientific_bundle, "float32",
                                                                             exact_scan_below=0)  # fmt: skip
    d, rng = half.manifest.dims, np.random.default_rng(0)
    records = [
        ItemRecord(f"new-{i}", i + 1, bundle_version="another", arrays={
            f"feature_{m}": rng.standard_normal(d.feature(m)).astype(np.float32).tobytes() for m in ("text", "image")})
        for i in range(5)
    ]  # fmt: skip
    catalogues = Catalogue(half), Catalogue(full)
    for c in catalogues:
        c.apply(records)
        c.apply([ItemRecord(half.bundle.table.ids[5], 9, deleted=True)])
    s16, s32 = (c.current for c in catalogues)
    assert s32.half is None and s16.half["text"].shape[0] == s16.n == s32.n
    for name, stats in s16.half_stats.items():  # the bound covers the appended rows too
        assert stats["error"] >= half.manifest.rescore_vectors[name]["error"]
    live = np.flatnonzero(~s16.deleted)
    histories = [rng.choice(live, size=n) for n in (1, 3, 8, 20, 5, 2, 13, 30)]
    users = half.towers.user.encode(histories, s16.item_arrays())
    exclude = [set(h.tolist()) for h in histories]
    a = top_k(users, 10, s16.index, s16.scorer(), exclude=exclude, deleted=s16.hidden, options=half.options)
    b = top_k(users, 10, s32.index, s32.scorer(), exclude=exclude, deleted=s32.hidden, options=full.options)
    np.testing.assert_array_equal(a.ids, b.ids)
    np.testing.assert_array_equal(a.scores, b.scores)
    assert a.rows_float16.sum() > 0 and not b.rows_float16.any()
    metrics = Metrics()
    served = rank(s16, users, [10] * len(histories), exclude, metrics=metrics)
    assert [s.rows.tolist() for s in served] == [a.row(j)[0].tolist() for j in range(len(histories))]
    count = metrics.registry.get_sample_value
    assert count("missrec_rescore_rows_total", {"dtype": "float16"}) == a.rows_float16.sum()
    assert count("missrec_rescore_rows_total", {"dtype": "float32"}) == a.rows_float32.sum()
