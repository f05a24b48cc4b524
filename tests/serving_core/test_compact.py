"""The float16 re-scoring (serving_core.compact): its bound holds, and top_k returns exactly the float32 results.

Real FAISS indexes and real arrays (SYNTHETIC vectors); "the float32 path" is top_k over the same scorer without the
float16 copies, brute force scores every row.
"""

from pathlib import Path

import faiss
import numpy as np
import pytest

from index_builder.build import index_vectors
from serving_core import compact
from serving_core.bundle import INNER_PRODUCT, ITEM_VECTOR, MISSREC_FUSION, Scorer, static_vectors
from serving_core.fusion import item_scores
from serving_core.scoring import ItemScorer, measured_max_gap
from serving_core.topk import SearchOptions, top_k

N, D, K = 20_000, 128, 10
CASES = {  # (modalities, transductive, alpha)
    "fused": (("text", "image"), False, 3.0),
    "fused_negative_alpha": (("text", "image"), False, -2.0),
    "transductive": (("text", "image"), True, 1.5),
    "one_modality": (("text",), False, 0.0),
}


def _unit(x):
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def tables():
    rng = np.random.default_rng(7)
    centers = _unit(rng.standard_normal((50, D)))
    c = rng.integers(0, 50, N)
    text = _unit(centers[c] + 0.9 * rng.standard_normal((N, D)) / np.sqrt(D))
    image = _unit(centers[c] + 0.9 * rng.standard_normal((N, D)) / np.sqrt(D))
    ids = _unit(rng.standard_normal((N, D)))
    users = _unit(centers[rng.integers(0, 50, 24)] + 0.7 * rng.standard_normal((24, D)) / np.sqrt(D))
    return {"text": text, "image": image, "id_vectors": ids}, users


def _scorer(tables, case, half=True):
    modalities, transductive, alpha = CASES[case]
    scorer = Scorer(MISSREC_FUSION, modalities, alpha, 0.07, transductive)
    vectors = {m: tables[m] for m in modalities}
    ids = tables["id_vectors"] if transductive else None
    gap = measured_max_gap(scorer, vectors)
    if not half:
        return ItemScorer(scorer, vectors, ids, gap)
    names = [*modalities, *(["id_vectors"] if transductive else [])]
    made = {n: compact.to_half(tables[n]) for n in names}
    stats = {n: {"error": e, "max_norm": m} for n, (_, e, m) in made.items()}
    return ItemScorer(scorer, vectors, ids, gap, {n: h for n, (h, _, _) in made.items()}, stats)


def _index(items, factory="Flat"):
    static = index_vectors(static_vectors(items.scorer, dict(items.vectors), items.id_vectors))
    index = faiss.index_factory(static.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
    if not index.is_trained:
        index.train(static)
    index.add(static)
    return index


def _search(users, items, index, exclude=None, deleted=None, **options):
    options.setdefault("exact_scan_below", 0)
    return top_k(users, K, index, items, exclude=exclude, deleted=deleted, options=SearchOptions(**options))


def _assert_identical(got, want):
    assert np.array_equal(got.ids, want.ids)
    assert np.array_equal(got.scores, want.scores)  # bit for bit: the same float32 kernel scored them
    assert np.array_equal(got.user_exact, want.user_exact)


@pytest.mark.parametrize("case", CASES)
def test_the_bound_holds_on_random_data(tables, case):
    items = _scorer(tables[0], case)
    rng = np.random.default_rng(1)
    _, users = tables
    for scale in (0.3, 1.0, 4.0):  # user vectors of other norms than 1
        u = (users * np.float32(scale)).astype(np.float32)
        rows = rng.integers(1, N, (u.shape[0], 2000))
        approx, bound = items.approx(u, rows)
        err = np.abs(approx.astype(np.float64) - items.exact(u, rows)).max(1)
        assert (err <= bound).all(), (err / bound).max()
        assert (bound < 3e-3 * scale + 1e-5).all()  # a bound that is not vacuous


def test_the_bound_holds_for_inner_product(tables):
    x, users = tables[0]["text"] * np.float32(0.8), tables[1]
    h, e, m = compact.to_half(x)
    items = ItemScorer(Scorer(INNER_PRODUCT, ("text",)), {ITEM_VECTOR: x}, None, 2.0, {ITEM_VECTOR: h},
                       {ITEM_VECTOR: {"error": e, "max_norm": m}})  # fmt: skip
    rows = np.random.default_rng(2).integers(1, N, (users.shape[0], 3000))
    approx, bound = items.approx(users, rows)
    assert (np.abs(approx.astype(np.float64) - items.exact(users, rows)).max(1) <= bound).all()
    got = _search(users, items, _index(items))
    want = _search(users, ItemScorer(items.scorer, items.vectors), _index(items))
    _assert_identical(got, want)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("strategy", [{"one_pass": True}, {"one_pass": False}])
def test_topk_is_that_of_float32_and_rechecks_few(tables, case, strategy):
    items, plain = _scorer(tables[0], case), _scorer(tables[0], case, half=False)
    _, users = tables
    index = _index(items)
    rng = np.random.default_rng(3)
    exclude = [rng.integers(1, N, 20) for _ in range(users.shape[0])]
    deleted = rng.random(N) < 0.05
    got = _search(users, items, index, exclude=exclude, deleted=deleted, **strategy)
    want = _search(users, plain, index, exclude=exclude, deleted=deleted, **strategy)
    _assert_identical(got, want)
    assert got.exact
    assert (got.rows_float16 > 0).all() and not want.rows_float16.any()
    assert (got.rows_float32 <= want.rows_float32).all() and got.rows_float32.sum() < want.rows_float32.sum()


def test_ann_widening_with_a_cap_matches_float32(tables):
    """The service's path: an IVF index, one search of the whole cap; the same candidates give the same top-k."""
    items, plain = _scorer(tables[0], "fused"), _scorer(tables[0], "fused", half=False)
    index = _index(items, "IVF64,Flat")
    faiss.extract_index_ivf(index).nprobe = 4
    opts = {"max_candidates": 256, "initial_width": 256, "exact_index": False}
    got = _search(tables[1], items, index, **opts)
    _assert_identical(got, _search(tables[1], plain, index, **opts))
    assert (got.rows_float16 == 256).all() and (got.rows_float32 < 256 / 4).all()  # few rows read in float32


def _near_ties(tables, case, many=300, spread=5e-4):
    """SYNTHETIC adversarial rows: ``many`` copies of one user's best item, each nudged so that their exact scores
    spread over ``spread`` around the k-th place (well inside the float16 error, well above float32 rounding)."""
    t = {n: a.copy() for n, a in tables[0].items()}
    u = tables[1][:1]
    items = _scorer({**t}, case, half=False)
    best = int(np.argmax(items.exact(u)[0, 1:])) + 1
    rng = np.random.default_rng(5)
    rows = rng.choice(np.arange(1, N), many, replace=False)
    for table in t.values():
        noise = rng.standard_normal((many, D)).astype(np.float32)
        noise -= (noise @ u[0])[:, None] * u[0] / np.float32(u[0] @ u[0])  # no effect on the score directly
        offset = rng.uniform(-spread, spread, (many, 1)).astype(np.float32) * u[0]
        table[rows] = _unit(table[best] + offset + np.float32(1e-3) * noise / np.sqrt(D))
    return t, u, rows


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("one_pass", [True, False])
def test_adversarial_near_ties_equal_brute_force(tables, case, one_pass):
    t, u, _ = _near_ties(tables, case)
    items, plain = _scorer(t, case), _scorer(t, case, half=False)
    index = _index(items)
    got = _search(u, items, index, one_pass=one_pass)
    _assert_identical(got, _search(u, plain, index, one_pass=one_pass))
    # brute force (a matrix product over every row): the same ids wherever its scores are apart by > 1e-6
    brute = item_scores(u, plain.vectors, plain.scorer.fusion, plain.id_vectors)[0]
    brute[0] = -np.inf
    order = np.lexsort((np.arange(N), -brute))[:K]
    np.testing.assert_allclose(got.scores[0], brute[order], atol=2e-6)
    apart = np.abs(np.diff(np.sort(brute[order])[::-1])) > 2e-6
    assert apart.sum() >= K // 2  # the check has teeth
    same = got.ids[0] == order
    assert same[: np.argmin(np.r_[apart, False])].all()  # up to the first place closer than 2e-6 to the next
    assert set(got.ids[0]) == set(order) or np.abs(got.scores[0, -1] - brute[order][-1]) < 2e-6
    # the near ties were re-checked in float32: many more rows than on ordinary data
    assert got.rows_float32[0] >= K + 5


@pytest.mark.parametrize("case", CASES)
def test_float16_alone_would_misorder_the_near_ties(tables, case):
    """Without the float32 re-check (ranking by the float16 scores) these rows come out in another order: the
    equality above holds because of the re-check, not because float16 happens to be enough here."""
    t, u, rows = _near_ties(tables, case)
    items = _scorer(t, case)
    cand = np.concatenate([[0], rows])[None]
    approx, _ = items.approx(u, cand)
    exact = items.exact(u, cand)
    by_approx = cand[0][np.lexsort((cand[0], -approx[0]))][:K]
    by_exact = cand[0][np.lexsort((cand[0], -exact[0]))][:K]
    assert not np.array_equal(by_approx, by_exact)
    assert np.isin(by_exact, rows).all()  # every best row is one of the near ties here
    assert (np.abs(approx[0] - exact[0]) > 1e-5).sum() > 10  # float16 moves them by more than their gaps


def _mapped_kib(path):
    """Resident KiB of this process's mappings of ``path`` (/proc/self/smaps)."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()
        if head and "-" in head[0] and ":" not in head[0]:
            inside = len(head) >= 6 and head[5] == str(path)
        elif inside and line.startswith("Rss:"):
            total += int(head[1])
    return total


def test_rechecked_rows_are_read_without_mapping_pages(tmp_path):
    """read_rows of a memory-mapped table: the same values as a gather, through pread (no page of the file becomes
    resident in this process), for the table, a view of its first rows and a RowStack with appended rows."""
    from serving_core.rows import RowStack

    path = tmp_path / "vectors.npy"
    x = np.random.default_rng(4).standard_normal((30_000, 300)).astype(np.float32)
    np.save(path, x)
    mapped = np.load(path, mmap_mode="r")
    rows = np.random.default_rng(5).integers(0, 30_000, (4, 50))
    np.testing.assert_array_equal(compact.read_rows(mapped, rows), x[rows])
    np.testing.assert_array_equal(compact.read_rows(mapped[:20_000], rows % 20_000), x[rows % 20_000])
    stack = RowStack(mapped, np.ones((3, 300), np.float32))
    both = np.array([[5, 30_001, 29_999, 30_002]])
    np.testing.assert_array_equal(compact.read_rows(stack, both), np.concatenate([x, stack.added])[both])
    assert _mapped_kib(path) == 0  # pread: nothing mapped
    _ = mapped[rows].sum()  # the plain gather maps pages (and the kernel's fault-around their neighbours)
    assert _mapped_kib(path) > 0


def test_the_float16_conversion_is_exact_for_every_finite_value():
    bits = np.arange(1 << 16, dtype=np.uint16).view(np.float16)
    finite = bits[np.isfinite(bits)].reshape(-1, 8)
    np.testing.assert_array_equal(compact.to_float32(finite), finite.astype(np.float32))
    assert compact.to_float32(finite[:0]).shape == (0, 8)
