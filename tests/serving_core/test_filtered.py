"""Oracle tests: the filtered top-k equals brute force over the allowed live rows, on every search strategy."""

import faiss
import numpy as np
import pytest

from serving_core.bundle import MISSREC_FUSION, Scorer
from serving_core.filtered import filtered_top_k, selector_params
from serving_core.scoring import ItemScorer
from serving_core.topk import SearchOptions
from tests.serving_core.test_topk import _flat, _setup, assert_same, brute_force, catalog  # noqa: F401

pytestmark = pytest.mark.oracle

# fraction of rows a filter allows: below k matches, < 1 %, a few %, > 50 %
FRACTIONS = [0.0012, 0.008, 0.05, 0.3, 0.6]


def _run(users, k, index, vecs, fusion, allowed, **kw):
    scorer = Scorer(MISSREC_FUSION, fusion.modalities, fusion.alpha, fusion.tau, fusion.transductive)
    opts = SearchOptions(**kw.pop("options", {"exact_scan_below": 0}))
    return filtered_top_k(users, k, index, ItemScorer(scorer, vecs), allowed=allowed, options=opts, **kw)


@pytest.mark.parametrize("fraction", FRACTIONS)
@pytest.mark.parametrize("strategy", ["one_pass", "widening", "hnsw", "none"])
def test_filtered_topk_equals_brute_force_over_allowed_rows(catalog, fraction, strategy):  # noqa: F811
    fusion, vecs, _, static, users = _setup(catalog, 3.0)
    n = static.shape[0]
    rng = np.random.default_rng(int(fraction * 1e4))
    allowed = rng.random(n) < fraction
    dead = rng.random(n) < 0.05
    exclude = [set(rng.choice(n, 20).tolist()) for _ in range(users.shape[0])]
    options = {"exact_scan_below": 0, "one_pass": strategy == "one_pass"}
    index = _flat(static)
    if strategy == "hnsw":
        index = faiss.IndexHNSWFlat(static.shape[1], 16, faiss.METRIC_INNER_PRODUCT)
        index.add(static)
        options["exact_index"] = False
    elif strategy == "none":
        index = None
    res = _run(users, 10, index, vecs, fusion, allowed, exclude=exclude, deleted=dead, options=options)
    oracle = brute_force(users, 10, vecs, fusion, exclude=exclude, dead=dead | ~allowed)
    assert [ids.shape[0] for ids, _ in oracle] == res.counts.tolist()  # exactly min(k, valid rows), always
    for b in range(users.shape[0]):
        got = res.row(b)[0]
        assert allowed[got].all() and not dead[got].any() and not set(got.tolist()) & exclude[b]
    if strategy != "hnsw" or fraction <= 0.02:  # HNSW is approximate unless the exact scan answered
        assert res.exact
    if res.exact:
        assert_same(res, oracle)


def test_selector_params_limit_what_faiss_returns(catalog):  # noqa: F811
    _, _, _, static, users = _setup(catalog, 0.4)
    ok = np.zeros(static.shape[0], dtype=bool)
    ok[::7] = True
    index = _flat(static)
    hnsw = faiss.IndexHNSWFlat(static.shape[1], 16, faiss.METRIC_INNER_PRODUCT)
    hnsw.add(static)
    ivf = faiss.index_factory(static.shape[1], "IVF16,Flat", faiss.METRIC_INNER_PRODUCT)
    ivf.train(static)
    ivf.add(static)
    for idx in (index, hnsw, ivf):
        _, found = idx.search(users, 20, params=selector_params(idx, ok))
        assert (found[found >= 0] % 7 == 0).all()
        assert (found >= 0).sum() > 0
