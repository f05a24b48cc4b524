"""Oracle tests: top_k over a flat index equals brute-force scoring of the whole table (fusion and inner product)."""

import faiss
import numpy as np
import pytest

from index_builder.build import index_vectors
from serving_core.bundle import INNER_PRODUCT, MISSREC_FUSION, Block, Fusion, Scorer, static_vectors
from serving_core.fusion import fusion_weights, item_scores, max_modality_gap, modality_sims
from serving_core.scoring import ItemScorer
from serving_core.topk import SearchOptions, is_exact_index, top_k

pytestmark = pytest.mark.oracle

N, D, CLUSTERS = 5000, 32, 40


def _unit(x):
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def _noise(rng, n, scale):
    return scale * rng.standard_normal((n, D)) / np.sqrt(D)  # norm ~ scale


@pytest.fixture(scope="module")
def catalog():
    """SYNTHETIC: 5k items in 40 clusters; each cluster has a text and an image direction, and users lean towards
    one of them, so the fused ranking differs from the static one (for large |alpha|); ID vectors random."""
    rng = np.random.default_rng(0)
    centers, text_dir, image_dir = (_unit(rng.standard_normal((CLUSTERS, D))) for _ in range(3))
    cluster = rng.integers(0, CLUSTERS, N)
    base = centers[cluster] + _noise(rng, N, 0.8)
    vectors = {
        "text": _unit(base + 0.8 * text_dir[cluster] + _noise(rng, N, 0.5)),
        "image": _unit(base + 0.8 * image_dir[cluster] + _noise(rng, N, 0.5)),
    }
    ids = _unit(rng.standard_normal((N, D)))
    uc, lean = rng.integers(0, CLUSTERS, 48), rng.random((48, 1))
    users = _unit(centers[uc] + 0.8 * (lean * text_dir[uc] + (1 - lean) * image_dir[uc]) + _noise(rng, 48, 0.8))
    return vectors, ids, users


def fused_topk(users, k, index, vectors, fusion, *, id_vectors=None, max_gap=2.0, exclude=None, deleted=None,
               explain=False, **options):  # fmt: skip
    """top_k with a MISSRec fusion scorer over these arrays."""
    scorer = Scorer(MISSREC_FUSION, fusion.modalities, fusion.alpha, fusion.tau, fusion.transductive)
    items = ItemScorer(scorer, vectors, id_vectors, max_gap)
    options.setdefault("exact_scan_below", 0)  # these tests are of the bounded search; STRATEGIES adds the scan
    opts = SearchOptions(**options)
    return top_k(users, k, index, items, exclude=exclude, deleted=deleted, explain=explain, options=opts)


# The three ways top_k can answer: one pass over a flat index, widening searches, the small-catalogue exact scan.
STRATEGIES = {
    "one_pass": {"one_pass": True},
    "widening": {"one_pass": False},
    "exact_scan": {"exact_scan_below": N + 1},
}


def _static(vectors, ids, fusion):
    scorer = Scorer(MISSREC_FUSION, fusion.modalities, fusion.alpha, fusion.tau, fusion.transductive)
    return static_vectors(scorer, vectors, ids if fusion.transductive else None)


def _flat(static):
    index = faiss.IndexFlatIP(static.shape[1])
    index.add(index_vectors(static))
    return index


def _setup(catalog, alpha, modalities=("text", "image"), transductive=False):
    vectors, ids, users = catalog
    fusion = Fusion(modalities, alpha, 0.07, transductive)
    vecs = {m: vectors[m] for m in modalities}
    id_vectors = ids if transductive else None
    static = _static(vecs, ids, fusion)
    return fusion, vecs, id_vectors, static, users


def brute_force(users, k, vectors, fusion, id_vectors=None, exclude=None, dead=None):
    """Oracle: score every row, drop row 0 / dead / excluded, sort by (score desc, id asc)."""
    scores = item_scores(users, vectors, fusion, id_vectors)
    out = []
    for b in range(users.shape[0]):
        ok = np.ones(scores.shape[1], bool)
        ok[0] = False
        if dead is not None:
            ok[: dead.shape[0]] &= ~dead
        if exclude is not None:
            ok[list(exclude[b])] = False
        rows = np.flatnonzero(ok)
        order = np.lexsort((rows, -scores[b, rows]))[:k]
        out.append((rows[order], scores[b, rows[order]]))
    return out


def assert_same(result, oracle):
    for b, (ids, scores) in enumerate(oracle):
        got_ids, got_scores = result.row(b)
        assert got_ids.shape == ids.shape, f"user {b}: {got_ids.shape[0]} results, brute force {ids.shape[0]}"
        np.testing.assert_allclose(got_scores, scores, atol=1e-5)
        # ids must agree except inside exact-score ties (float rounding can swap near-equal items)
        differ = got_ids != ids
        if differ.any():
            assert np.allclose(got_scores[differ], scores[differ], atol=1e-5)
            assert set(got_ids[np.abs(got_scores - got_scores[-1]) > 1e-5]) <= set(ids)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("alpha", [0.0, 0.4, 3.0, -3.0])
@pytest.mark.parametrize(
    ("modalities", "transductive"),
    [(("text", "image"), False), (("text", "image"), True), (("image",), False), (("text",), True)],
)
def test_exact_topk_equals_brute_force(catalog, alpha, modalities, transductive, strategy):
    fusion, vecs, id_vectors, static, users = _setup(catalog, alpha, modalities, transductive)
    index = _flat(static)
    res = fused_topk(users, 10, index, vecs, fusion, id_vectors=id_vectors, explain=True, **STRATEGIES[strategy])
    assert res.exact and res.ids.shape == (48, 10) and res.scores.dtype == np.float32
    assert_same(res, brute_force(users, 10, vecs, fusion, id_vectors))
    assert (np.diff(res.scores, axis=1) <= 0).all()
    sims = np.stack(modality_sims(users, vecs, fusion, res.ids), axis=-1)
    np.testing.assert_allclose(res.weights, fusion_weights(sims, alpha), atol=1e-6)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_ties_are_broken_by_lower_id(catalog, strategy):
    vectors, ids, users = catalog
    fusion = Fusion(("text", "image"), 0.4, 0.07, False)
    best = int(brute_force(users[:1], 1, vectors, fusion)[0][0][0])
    copies = [r for r in (7, 2500, 4999) if r != best][:2]
    vecs = {m: v.copy() for m, v in vectors.items()}
    for v in vecs.values():
        v[copies] = v[best]  # identical items: identical scores
    static = _static(vecs, ids, fusion)
    res = fused_topk(users[:1], 3, _flat(static), vecs, fusion, **STRATEGIES[strategy])
    assert res.row(0)[0].tolist() == sorted([best, *copies])
    # k = 2 cuts the three-way tie: the two lowest ids win, whichever strategy selected them
    cut = fused_topk(users[:1], 2, _flat(static), vecs, fusion, **STRATEGIES[strategy])
    assert cut.row(0)[0].tolist() == sorted([best, *copies])[:2]
    assert len(set(res.row(0)[1].tolist())) == 1


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_exclusions_force_widening(catalog, strategy):
    fusion, vecs, _, static, users = _setup(catalog, 0.4)
    index = _flat(static)
    oracle_plain = brute_force(users, 60, vecs, fusion)
    # exclude the 50 best items of each user plus a random set: the initial width cannot hold 10 valid items
    rng = np.random.default_rng(1)
    exclude = [set(ids[:50].tolist()) | set(rng.integers(1, N, 30).tolist()) for ids, _ in oracle_plain]
    exclude[0] = set()  # users in one batch widen independently
    res = fused_topk(users, 10, index, vecs, fusion, exclude=exclude, initial_width=32, **STRATEGIES[strategy])
    assert res.exact
    assert_same(res, brute_force(users, 10, vecs, fusion, exclude=exclude))
    assert not set(res.ids.ravel().tolist()) & {0}
    for b in range(1, len(users)):
        assert not set(res.row(b)[0].tolist()) & exclude[b]
    if strategy == "exact_scan":
        assert (res.candidates == N).all()  # every row scored for every user
    else:
        assert (res.candidates[1:] > 128).all() and res.candidates[0] < res.candidates[1:].min()


def test_without_widening_the_answer_is_wrong(catalog):
    """Widening is needed: capped at the initial width, the answer is wrong for some users; widened, it is exact."""
    fusion, vecs, _, static, users = _setup(catalog, 3.0)
    index = _flat(static)
    oracle = brute_force(users, 10, vecs, fusion)
    capped = fused_topk(users, 10, index, vecs, fusion, initial_width=16, max_candidates=16)
    assert not capped.exact and (capped.candidates == 16).all()
    wrong = [b for b, (ids, _) in enumerate(oracle) if set(capped.row(b)[0].tolist()) != set(ids.tolist())]
    assert len(wrong) >= 5, "the static top-16 held every fused top-10: the bound was not exercised"
    res = fused_topk(users, 10, index, vecs, fusion, initial_width=16, one_pass=False)
    assert res.exact and (res.candidates > 16).all()
    assert_same(res, oracle)


def test_widening_stops_when_the_bound_proves_it(catalog):
    """With the tight bound (measured max |t - v|), doubling stops before a full scan and the answer is exact."""
    fusion, vecs, _, static, users = _setup(catalog, 1.0)
    index = _flat(static)
    gap = max_modality_gap(vecs, fusion)
    oracle = brute_force(users, 10, vecs, fusion)
    res = fused_topk(users, 10, index, vecs, fusion, initial_width=16, growth=2, max_gap=gap, one_pass=False)
    assert res.exact
    assert_same(res, oracle)
    widened = (res.candidates > 16) & (res.candidates < N)
    assert widened.sum() >= 10, res.candidates
    assert set(np.unique(res.candidates[res.candidates < N]).tolist()) <= {16, 32, 64, 128, 256, 512, 1024}
    # the one-pass threshold selection re-scores exactly the rows the bound cannot rule out: no more than doubling
    one = fused_topk(users, 10, index, vecs, fusion, initial_width=16, max_gap=gap)
    assert one.exact and (one.candidates <= res.candidates).all() and (one.candidates > 16).any()
    assert_same(one, oracle)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_tombstones_and_k_beyond_valid_items(catalog, strategy):
    fusion, vecs, _, static, users = _setup(catalog, -3.0)
    index = _flat(static)
    rng = np.random.default_rng(2)
    dead = rng.random(N) < 0.3
    top = brute_force(users, 5, vecs, fusion)
    for ids, _ in top[:10]:
        dead[ids] = True  # delete some users' best items
    res = fused_topk(users, 10, index, vecs, fusion, **STRATEGIES[strategy], deleted=dead)
    assert_same(res, brute_force(users, 10, vecs, fusion, dead=dead))
    assert not dead[res.ids.ravel()].any()
    # a set of rows works like the mask
    res_set = fused_topk(
        users[:4], 10, index, vecs, fusion, **STRATEGIES[strategy], deleted=set(np.flatnonzero(dead).tolist())
    )
    np.testing.assert_array_equal(res_set.ids, res.ids[:4])
    # only 7 valid items left: every user gets exactly those 7, padded with -1 / -inf
    alive = rng.choice(np.arange(1, N), 7, replace=False)
    dead_most = np.ones(N, bool)
    dead_most[alive] = False
    res = fused_topk(users[:5], 20, index, vecs, fusion, **STRATEGIES[strategy], deleted=dead_most)
    assert (res.counts == 7).all() and res.exact
    assert set(res.ids[0, :7].tolist()) == set(alive.tolist())
    assert (res.ids[:, 7:] == -1).all() and np.isneginf(res.scores[:, 7:]).all()
    assert_same(res, brute_force(users[:5], 20, vecs, fusion, dead=dead_most))


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_growing_table_and_unindexed_tail(catalog, strategy):
    """Rows appended after the index was built (not yet in the index) are still found; then the index grows."""
    fusion, vecs, _, static, users = _setup(catalog, 0.4)
    index = _flat(static[:4000])
    oracle = brute_force(users, 10, vecs, fusion)
    assert_same(fused_topk(users, 10, index, vecs, fusion, **STRATEGIES[strategy]), oracle)
    index.add(static[4000:])
    res = fused_topk(users, 10, index, vecs, fusion, **STRATEGIES[strategy])
    assert_same(res, oracle)
    short = {m: v[:4000] for m, v in vecs.items()}
    with pytest.raises(ValueError, match="index holds"):
        fused_topk(users, 10, index, short, fusion)


def test_tight_bound_and_non_unit_users(catalog):
    fusion, vecs, _, static, users = _setup(catalog, 3.0)
    index = _flat(static)
    gap = max_modality_gap(vecs, fusion)
    loose = fused_topk(users, 10, index, vecs, fusion)
    tight = fused_topk(users, 10, index, vecs, fusion, max_gap=gap)
    assert_same(tight, brute_force(users, 10, vecs, fusion))
    assert tight.candidates.sum() <= loose.candidates.sum()
    scaled = fused_topk(users * 2.5, 10, index, vecs, fusion, max_gap=gap)
    assert_same(scaled, brute_force(users * 2.5, 10, vecs, fusion))


def test_no_index_is_brute_force_and_errors(catalog):
    fusion, vecs, _, _, users = _setup(catalog, 0.4)
    res = fused_topk(users[:3], 5, None, vecs, fusion)
    assert res.exact and (res.candidates == N).all()
    assert_same(res, brute_force(users[:3], 5, vecs, fusion))
    with pytest.raises(ValueError, match="k must be"):
        fused_topk(users, 0, None, vecs, fusion)
    with pytest.raises(ValueError, match="exclude has"):
        fused_topk(users, 5, None, vecs, fusion, exclude=[set()])


def test_hnsw_is_flagged_approximate_with_high_recall(catalog):
    fusion, vecs, _, static, users = _setup(catalog, 0.4)
    index = faiss.index_factory(D, "HNSW32", faiss.METRIC_INNER_PRODUCT)
    index.add(index_vectors(static))
    index.hnsw.efSearch = 64
    assert not is_exact_index(index) and is_exact_index(_flat(static))
    res = fused_topk(users, 10, index, vecs, fusion, max_candidates=512)
    assert not res.exact
    oracle = brute_force(users, 10, vecs, fusion)
    recall = np.mean([len(set(res.row(b)[0].tolist()) & set(ids.tolist())) / 10 for b, (ids, _) in enumerate(oracle)])
    assert recall >= 0.95


def test_inner_product_scorer_is_exact_with_exclusions_and_explains_by_blocks(catalog):
    """An inner_product bundle (e.g. MSM4SR: concatenated text | image vectors): the index is exact (bound 0),
    exclusions and tombstones still give exactly k results, and the block shares of each score sum to 1."""
    vectors, _, users = catalog
    x = np.concatenate([vectors["text"], vectors["image"]], axis=1) / np.sqrt(2)  # (N, 2D)
    u = np.concatenate([users, users[::-1]], axis=1) / np.sqrt(2)  # (B, 2D)
    scorer = Scorer(INNER_PRODUCT, ("text", "image"), blocks=(Block("text", 0, D), Block("image", D, 2 * D)))
    items = ItemScorer(scorer, {"item": x.astype(np.float32)})
    assert items.bound(1.0) == 0.0 and items.explained_by == ("text", "image")
    index = faiss.IndexFlatIP(2 * D)
    index.add(index_vectors(static_vectors(scorer, {"item": x.astype(np.float32)})))
    rng = np.random.default_rng(3)
    dead = rng.random(N) < 0.2
    exact = u @ x.T
    exclude = [set(np.argsort(-exact[b])[:40].tolist()) for b in range(u.shape[0])]
    res = top_k(u, 10, index, items, exclude=exclude, deleted=dead, explain=True)
    assert res.exact and (res.counts == 10).all()
    for b in range(u.shape[0]):
        ok = ~dead
        ok[0] = False
        ok[list(exclude[b])] = False
        rows = np.flatnonzero(ok)
        want = rows[np.lexsort((rows, -exact[b, rows]))[:10]]
        np.testing.assert_array_equal(res.row(b)[0], want)
        np.testing.assert_allclose(res.row(b)[1], exact[b, want], atol=1e-5)
    parts = np.stack(
        [(x[res.ids][..., :D] * u[:, None, :D]).sum(-1), (x[res.ids][..., D:] * u[:, None, D:]).sum(-1)], -1
    )
    np.testing.assert_allclose(res.weights, parts / parts.sum(-1, keepdims=True), atol=1e-4)
    np.testing.assert_allclose(res.weights.sum(-1), 1.0, atol=1e-5)


def test_rescore_time_is_measured(catalog):
    fusion, vecs, _, static, users = _setup(catalog, 0.4)
    res = fused_topk(users, 10, _flat(static), vecs, fusion)
    assert res.rescore_seconds > 0


def test_the_chunked_full_scan_and_the_one_chunk_scan_agree_with_brute_force(catalog, monkeypatch):
    """A table scanned in one chunk is selected in place (serving_core.scan); a larger one chunk by chunk with the
    running best merged: both give the brute-force answer, with exclusions, tombstones and a three-way tie."""
    vectors, ids, users = catalog
    fusion = Fusion(("text", "image"), 0.4, 0.07, False)
    best = int(brute_force(users[:1], 1, vectors, fusion)[0][0][0])
    vecs = {m: v.copy() for m, v in vectors.items()}
    copies = [r for r in (7, 4500, 4999) if r != best][:2]
    for v in vecs.values():
        v[copies] = v[best]  # identical items: a tie across the chunk boundary at 4096
    index = _flat(_static(vecs, ids, fusion))
    rng = np.random.default_rng(5)
    dead = rng.random(N) < 0.2
    dead[[best, *copies]] = False
    exclude = [set(rng.integers(1, N, 30).tolist()) - {best, *copies} for _ in range(users.shape[0])]
    oracle = brute_force(users, 2, vecs, fusion, exclude=exclude, dead=dead)
    scan = {**STRATEGIES["exact_scan"], "exclude": exclude, "deleted": dead}
    whole = fused_topk(users, 2, index, vecs, fusion, **scan)
    monkeypatch.setattr("serving_core.topk._SCAN_BUDGET", 1)  # chunks of 4096 rows: two for N = 5000
    chunked = fused_topk(users, 2, index, vecs, fusion, **scan)
    for res in (whole, chunked):
        assert res.exact
        assert_same(res, oracle)
    assert whole.row(0)[0].tolist() == sorted([best, *copies])[:2] == chunked.row(0)[0].tolist()
