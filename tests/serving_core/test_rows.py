"""Item arrays that are never copied: a memory-mapped bundle table stays the one the snapshots read after any number
of appends (RowStack: the mapped rows, then the appended ones), scores are those of an in-memory load, and the
process's anonymous memory does not grow by the table's size when items are appended."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from service.catalogue import Catalogue
from service.serving_model import ServingModel
from service.settings import Settings
from service.store import ItemRecord
from serving_core.bundle import _drop_resident
from serving_core.rows import RowStack, Segment, dot_rows
from serving_core.scoring import ItemScorer
from serving_core.topk import top_k


def _status_kb(field: str) -> int | None:
    """A field of /proc/self/status in kB (RssAnon, RssFile), None where there is no /proc."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


# ----- RowStack -----------------------------------------------------------------------------------------------
def _stack(rng, base_rows=7, added_rows=4, width=3):
    base = rng.standard_normal((base_rows, width)).astype(np.float32)
    added = rng.standard_normal((added_rows, width)).astype(np.float32)
    return RowStack(base, added), np.concatenate([base, added])


def test_rowstack_reads_like_the_concatenated_array():
    rng = np.random.default_rng(0)
    stack, whole = _stack(rng)
    assert (stack.shape, stack.dtype, stack.ndim, len(stack)) == (whole.shape, whole.dtype, 2, 11)
    rows = rng.integers(-11, 11, size=(5, 6))
    np.testing.assert_array_equal(stack[rows], whole[rows])  # gathers, negative rows included
    for r in (0, 6, 7, 10, -1, -11):
        np.testing.assert_array_equal(stack[r], whole[r])
    for key in (slice(2, 5), slice(7, 11), slice(3, 9), slice(None), slice(0, 0), slice(1, 10, 3), slice(5, 100)):
        np.testing.assert_array_equal(np.asarray(stack[key]), whole[key])
    assert isinstance(stack[2:5], np.ndarray) and np.shares_memory(stack[2:5], stack.base)  # one part: a view
    assert isinstance(stack[8:10], np.ndarray) and np.shares_memory(stack[8:10], stack.added)
    assert isinstance(stack[3:9], RowStack) and stack[3:9].base_rows == 4
    mask = rng.random(11) < 0.5
    np.testing.assert_array_equal(stack[mask], whole[mask])
    np.testing.assert_array_equal(stack[[1, 9], 2], whole[[1, 9], 2])
    np.testing.assert_array_equal(stack[np.array([], dtype=np.int64)], whole[np.array([], dtype=np.int64)])
    users = rng.standard_normal((2, 3)).astype(np.float32)
    np.testing.assert_allclose(dot_rows(users, stack), users @ whole.T, rtol=1e-6)
    np.testing.assert_allclose(dot_rows(users, stack[3:9]), users @ whole[3:9].T, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(stack), whole)
    for bad in (11, -12, [0, 11]):
        with pytest.raises(IndexError):
            stack[bad]
    for ufunc_call in (lambda: np.isfinite(stack), lambda: users @ stack, lambda: stack * 2.0):
        with pytest.raises(TypeError):  # no silent copy of a whole (memory-mapped) table through a ufunc
            ufunc_call()
    with pytest.raises(ValueError):
        RowStack(stack.base, np.zeros((1, 4), np.float32))


def test_rowstack_clusters_and_scores_through_the_readers():
    """The user tower's interest ids and the fusion scores read a RowStack like the concatenated arrays."""
    from serving_core.bundle import Fusion
    from serving_core.fusion import explanation_weights, item_scores
    from serving_core.towers import interest_ids

    rng = np.random.default_rng(1)
    base_c, added_c = rng.integers(1, 9, 20).astype(np.int64), rng.integers(1, 9, 5).astype(np.int64)
    items = rng.integers(1, 25, (3, 6))
    np.testing.assert_array_equal(
        interest_ids(items, [RowStack(base_c, added_c)]), interest_ids(items, [np.concatenate([base_c, added_c])])
    )
    fusion = Fusion(("text", "image"), 3.0, 0.07, False)
    stacks = {m: _stack(rng, 20, 5, 8) for m in fusion.modalities}
    users = rng.standard_normal((3, 8)).astype(np.float32)
    split, whole = {m: s for m, (s, _) in stacks.items()}, {m: w for m, (_, w) in stacks.items()}
    np.testing.assert_allclose(item_scores(users, split, fusion), item_scores(users, whole, fusion), rtol=1e-6)
    np.testing.assert_allclose(
        item_scores(users, split, fusion, items=items), item_scores(users, whole, fusion, items=items), rtol=1e-6
    )
    np.testing.assert_allclose(
        explanation_weights(users, split, fusion, items), explanation_weights(users, whole, fusion, items), rtol=1e-6
    )


# ----- Segment ------------------------------------------------------------------------------------------------
def _mapped(tmp_path: Path, rows: int, width: int, seed: int = 0) -> np.ndarray:
    arr = np.random.default_rng(seed).standard_normal((rows, width)).astype(np.float32)
    np.save(tmp_path / "table.npy", arr)
    return np.load(tmp_path / "table.npy", mmap_mode="r")


def test_segment_never_copies_its_initial_array_and_old_views_stay(tmp_path):
    base = _mapped(tmp_path, 50, 4)
    seg = Segment(base)
    assert seg.view() is base and np.shares_memory(seg.view(10), base)
    reference = [np.asarray(base)]
    views = []
    rng = np.random.default_rng(2)
    for i in range(200):  # many appends: the added buffer grows (and is copied) several times
        rows = rng.standard_normal((1 + i % 3, 4)).astype(np.float32)
        seg.append(rows)
        reference.append(rows)
        views.append((seg.n, seg.view(), np.concatenate(reference)))
        assert seg.view().base is base  # the mapped rows are the bundle's, whatever the appends
    for n, view, expected in views:  # every earlier view still reads what it read when it was taken
        assert view.shape[0] == n
        np.testing.assert_array_equal(np.asarray(view), expected)
    np.testing.assert_array_equal(seg.rows(40, 60), np.concatenate(reference)[40:60])
    np.testing.assert_array_equal(seg.rows(55, 70), np.concatenate(reference)[55:70])
    assert np.shares_memory(seg.rows(10, 20), base)


@pytest.mark.skipif(_status_kb("RssAnon") is None, reason="needs /proc/self/status (Linux)")
def test_appending_to_a_mapped_table_does_not_grow_anonymous_memory_by_its_size(tmp_path):
    """64 MB table mapped read-only: gathering rows and appending 1,000 rows leaves the anonymous RSS within a few
    MB (the old segment copied the table into a twice-as-large buffer on the first append: +64 MB)."""
    rows, width = 65536, 256  # 64 MiB of float32
    base = _mapped(tmp_path, rows, width)
    seg = Segment(base)
    rng = np.random.default_rng(3)
    new = rng.standard_normal((1000, width)).astype(np.float32)
    before = _status_kb("RssAnon")
    for i in range(0, 1000, 10):
        seg.append(new[i : i + 10])
        got = seg.view()[rng.integers(0, seg.n, 64)]
    grown_mb = (_status_kb("RssAnon") - before) / 1024
    assert got.shape == (64, width) and seg.view().base is base
    np.testing.assert_array_equal(np.asarray(seg.view()[rows:]), new)
    assert grown_mb < 16, f"anonymous memory grew by {grown_mb:.1f} MB for a 64 MB table"


@pytest.mark.skipif(_status_kb("RssFile") is None, reason="needs /proc/self/status (Linux)")
def test_validation_reads_leave_no_mapped_pages_resident(tmp_path):
    """What read_item_table's checks read of a mapped array (every page) is dropped from the process afterwards."""
    base = _mapped(tmp_path, 65536, 256)
    assert np.isfinite(base).all()  # touches all 64 MB
    touched = _status_kb("RssFile")
    _drop_resident(base)
    dropped_mb = (touched - _status_kb("RssFile")) / 1024
    assert dropped_mb > 48, f"only {dropped_mb:.1f} MB of the 64 MB mapped table left the RSS"
    assert float(base[100, 3]) == float(np.load(tmp_path / "table.npy")[100, 3])  # still readable


# ----- the catalogue over a mapped bundle -------------------------------------------------------------------------
def _records(model: ServingModel, count: int, seed: int) -> list[ItemRecord]:
    d, rng = model.manifest.dims, np.random.default_rng(seed)
    return [
        ItemRecord(
            item_id=f"cold-{i}",
            version=0,
            text=f"cold item {i}",
            bundle_version="another-bundle",  # re-encoded from raw features by this bundle's item tower
            arrays={
                f"feature_{m}": rng.standard_normal(d.feature(m)).astype(np.float32).tobytes()
                for m in model.manifest.modalities
            },
        )
        for i in range(count)
    ]


def _drive(catalogue: Catalogue, records: list[ItemRecord], bundle_ids: list[str]) -> None:
    """Many writes: ingests in small batches, deletes of bundle and ingested ids, re-ingests (new rows)."""
    version = 0
    for start in range(0, len(records), 7):
        batch = []
        for r in records[start : start + 7]:
            version += 1
            batch.append(replace(r, version=version))
        catalogue.apply(batch)
        version += 1
        gone = bundle_ids[start + 1] if start % 2 else records[start].item_id
        catalogue.apply([ItemRecord(item_id=gone, version=version, deleted=True)])
    version += 1
    again = records[3]
    catalogue.apply([replace(again, version=version)])


def test_catalogue_over_a_mapped_bundle_serves_like_an_in_memory_one(scientific_bundle):
    """Ingests, deletes and re-ingests over the memory-mapped bundle: the snapshot arrays keep the mapped bundle
    arrays (no copy), and recommendations and scores equal those over the same bundle read into memory."""
    mapped = ServingModel.load(scientific_bundle, Settings(bundle=scientific_bundle, onnx_provider="cpu"))
    loaded = ServingModel.load(
        scientific_bundle, Settings(bundle=scientific_bundle, onnx_provider="cpu", mmap_items=False)
    )
    table = mapped.bundle.table
    assert isinstance(table.tokens, np.memmap) and all(isinstance(v, np.memmap) for v in table.vectors.values())
    assert not isinstance(loaded.bundle.table.tokens, np.memmap)
    records = _records(mapped, 60, seed=4)
    cats = {}
    for name, model in (("mapped", mapped), ("loaded", loaded)):
        cat = Catalogue(model, compact_rows=25)  # the index is folded once or twice on the way
        _drive(cat, records, table.ids)
        cats[name] = cat.current
    snap, ref = cats["mapped"], cats["loaded"]
    n_bundle = table.num_items
    assert snap.n == ref.n == n_bundle + 61
    assert isinstance(snap.tokens, RowStack) and snap.tokens.base is table.tokens
    for m, v in snap.vectors.items():
        assert isinstance(v, RowStack) and v.base is table.vectors[m] and np.shares_memory(v.base, table.vectors[m])
        np.testing.assert_array_equal(np.asarray(v), np.asarray(ref.vectors[m]))
    np.testing.assert_array_equal(np.asarray(snap.tokens), np.asarray(ref.tokens))
    np.testing.assert_array_equal(snap.deleted, ref.deleted)
    assert snap.overlay == ref.overlay and snap.row("cold-3") == snap.n - 1 and snap.row("cold-0") is None
    assert snap.row(table.ids[8]) is None and snap.row(table.ids[9]) == 9

    rng = np.random.default_rng(5)
    histories = [rng.integers(1, snap.n, size=int(rng.integers(1, 20))) for _ in range(24)]
    histories = [h[~snap.deleted[h]] for h in histories]
    histories = [h if h.size else np.array([snap.n - 1]) for h in histories]
    users = mapped.towers.user.encode(histories, snap.item_arrays())
    np.testing.assert_array_equal(users, loaded.towers.user.encode(histories, ref.item_arrays()))
    got = top_k(users, 10, snap.index, snap.scorer(), deleted=snap.deleted, explain=True, options=mapped.options)
    want = top_k(users, 10, ref.index, ref.scorer(), deleted=ref.deleted, explain=True, options=loaded.options)
    np.testing.assert_array_equal(got.ids, want.ids)
    np.testing.assert_array_equal(got.scores, want.scores)
    np.testing.assert_array_equal(got.weights, want.weights)
    scorer = snap.scorer()
    plain = ItemScorer(scorer.scorer, {m: np.asarray(v) for m, v in snap.vectors.items()}, None, scorer.max_gap)
    one_array = top_k(users, 10, snap.index, plain, deleted=snap.deleted, explain=True, options=mapped.options)
    np.testing.assert_array_equal(one_array.ids, got.ids)  # the same as over one ndarray of all rows
    # a small table is scored by one matrix product per part (the exact scan): BLAS may round the two shapes'
    # products differently in the last bit
    np.testing.assert_allclose(one_array.scores, got.scores, rtol=0, atol=1e-6)
    brute = top_k(users, 10, None, scorer, deleted=snap.deleted)  # full scan over both parts
    np.testing.assert_array_equal(brute.ids, got.ids)
    np.testing.assert_allclose(brute.scores, got.scores, atol=1e-6)
    assert got.exact and not snap.deleted[got.ids].any()
    assert snap.item_info("cold-3")["source"] == "ingested"
    assert snap.item_info("cold-3")["text_cluster"] == ref.item_info("cold-3")["text_cluster"]

    from service.metrics import Metrics
    from service.recommender import similar

    for item in ("cold-3", table.ids[9]):  # "items like this one": an ingested row's and a bundle row's vectors
        mine = similar(snap, snap.row(item), 10, True, Metrics())
        theirs = similar(ref, ref.row(item), 10, True, Metrics())
        assert [(r.item_id, r.score, r.explanation) for r in mine.items] == [
            (r.item_id, r.score, r.explanation) for r in theirs.items
        ]
        assert len(mine.items) == 10 and item not in {r.item_id for r in mine.items}


def test_a_compact_rotated_sq8_index_is_served_with_exact_scores_and_folds_ingested_rows(scientific_bundle, tmp_path):
    """RR304,IVF16,SQ8 (a random rotation padding 300-d to 304-d, which keeps inner products, then 8-bit static
    vectors: a quarter of IVF-Flat's memory) through build-index and the service: the index only picks the 64
    candidates; every returned score is the exact fused score of the float32 vectors, ingested rows
    included (and folded into a copy of the SQ8 index)."""
    import shutil

    from index_builder.build import build_index
    from serving_core.fusion import item_scores

    root = tmp_path / "sq8"
    shutil.copytree(scientific_bundle, root)
    info = build_index(root, "RR304,IVF16,SQ8", "cpu", progress=False)
    assert not info.exact and info.factory == "RR304,IVF16,SQ8"
    settings = Settings(bundle=root, onnx_provider="cpu", index_params={"nprobe": 16}, max_candidates=64)
    model = ServingModel.load(root, settings)  # a cap below a quarter of the rows: no full scans, the index's path
    assert model.options.exact_index is False and model.options.initial_width == 64
    catalogue = Catalogue(model, compact_rows=10)
    _drive(catalogue, _records(model, 30, seed=6), model.bundle.table.ids)
    snap = catalogue.current
    assert snap.index_rows > model.bundle.table.num_items and snap.index.ntotal == snap.index_rows  # folded
    rng = np.random.default_rng(7)
    histories = [rng.integers(1, model.bundle.table.num_items, size=8) for _ in range(16)]
    users = model.towers.user.encode(histories, snap.item_arrays())
    # this small table would be scanned in full (exact, below EXACT_SCAN_BELOW rows): make the index pick
    search = replace(model.options, exact_scan_below=0)
    got = top_k(users, 10, snap.index, snap.scorer(), deleted=snap.deleted, options=search)
    exact = item_scores(users, snap.vectors, model.manifest.scorer.fusion, None, got.ids)
    np.testing.assert_allclose(got.scores, exact, atol=1e-6)  # the exact scores of the returned items, not SQ8's
    brute = top_k(users, 10, None, snap.scorer(), deleted=snap.deleted)
    recall = np.mean([np.intersect1d(got.row(b)[0], brute.row(b)[0]).size / 10 for b in range(16)])
    print(f"recall@10 {recall:.3f}")
    assert recall >= 0.9 and not got.user_exact.any()  # nprobe = nlist: only the 8-bit ranking can miss
