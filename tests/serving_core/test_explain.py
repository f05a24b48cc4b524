"""Explanations: the score split sums to the exact score for every scorer kind; "because of" is faithful (the real
Scientific bundle under ONNX Runtime: each contribution is the score drop of leaving that item out, checked one
history at a time, and the top one is the removal that lowers the score most)."""

from __future__ import annotations

import numpy as np
import pytest

from serving_core.bundle import INNER_PRODUCT, MISSREC_FUSION, Block, Scorer
from serving_core.explain import leave_one_out, variants
from serving_core.scoring import ItemScorer
from serving_core.topk import top_k


def _unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.oracle
@pytest.mark.parametrize(
    ("modalities", "transductive"), [(("text", "image"), False), (("text", "image"), True), (("text",), False)]
)
def test_the_missrec_split_sums_to_the_exact_score(modalities, transductive):
    rng = np.random.default_rng(0)
    vectors = {m: _unit(rng, 50, 16) for m in modalities}
    ids = _unit(rng, 50, 16) if transductive else None
    scorer = ItemScorer(Scorer(MISSREC_FUSION, modalities, 1.7, 0.07, transductive), vectors, ids)
    users, rows = _unit(rng, 3, 16), rng.integers(1, 50, size=(3, 7))
    parts = scorer.split(users, rows)
    assert parts.shape == (3, 7, len(scorer.split_by))
    assert scorer.split_by == modalities + (("id",) if transductive else ())
    np.testing.assert_allclose(parts.sum(-1), scorer.exact(users, rows), atol=1e-6)
    if len(modalities) == 2:  # the split is not the fusion weight
        assert not np.allclose(parts[..., 0] / parts.sum(-1), scorer.explain(users, rows)[..., 0], atol=1e-2)


@pytest.mark.oracle
def test_the_inner_product_split_is_the_block_inner_products():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((30, 8)).astype(np.float32)
    blocks = (Block("text", 0, 4), Block("image", 4, 8))
    scorer = ItemScorer(Scorer(INNER_PRODUCT, ("text", "image"), blocks=blocks), {"item": x})
    users, rows = rng.standard_normal((2, 8)).astype(np.float32), rng.integers(1, 30, size=(2, 5))
    parts = scorer.split(users, rows)
    np.testing.assert_allclose(parts.sum(-1), scorer.exact(users, rows), atol=1e-5)
    np.testing.assert_allclose(parts[..., 0], (x[rows][..., :4] * users[:, None, :4]).sum(-1), atol=1e-5)
    assert ItemScorer(Scorer(INNER_PRODUCT, ("text",)), {"item": x}).split(users, rows) is None


@pytest.mark.oracle
def test_variants_leave_out_each_item_the_tower_reads():
    positions, vs = variants(np.array([5, 6, 7, 8, 9]), max_len=3)
    assert positions.tolist() == [2, 3, 4]  # the window: the last 3
    # leaving one out lets the next older item (6) in, as the tower would read it
    assert [v.tolist() for v in vs] == [[6, 8, 9], [6, 7, 9], [6, 7, 8]]
    positions, vs = variants(np.array([4, 2]), max_len=50)
    assert positions.tolist() == [0, 1] and [v.tolist() for v in vs] == [[2], [4]]
    assert variants(np.array([3]), max_len=50)[1] == []


def test_because_is_faithful_on_real_users(scientific_bundle, scientific_dir):
    from missrec.data.dataset import load_dataset
    from serving_core.towers import load_towers

    towers = load_towers(scientific_bundle, providers="cpu")
    scorer = ItemScorer(towers.manifest.scorer, towers.table.vectors, towers.table.id_vectors)
    ds = load_dataset(scientific_dir)
    users = [u for u in range(ds.test.lengths.shape[0]) if ds.test.lengths[u] >= 4][:5]
    histories = [ds.test.histories[u, : ds.test.lengths[u]].astype(np.int64) for u in users]
    found = top_k(towers.user.encode(histories), 5, None, scorer, exclude=histories)
    rows = [found.row(b)[0] for b in range(len(users))]
    scores = [found.row(b)[1] for b in range(len(users))]
    loo = leave_one_out(towers.user, scorer, histories, rows, scores)
    for h, r, s, got in zip(histories, rows, scores, loo, strict=True):
        # the same drops, one variant at a time, nothing batched
        alone = np.stack([scorer.exact(towers.user.encode([np.delete(h, p)]), r[None, :])[0] for p in range(h.size)])
        drops = s[None, :] - alone  # (L, C)
        assert got.positions.tolist() == list(range(h.size))
        np.testing.assert_allclose(got.drops, drops, atol=1e-4)
        for c in range(r.size):
            item, p, drop = got.top(c, 3, h)[0]
            assert item == h[p] and drop == pytest.approx(float(drops[:, c].max()), abs=1e-4)
            # removing the top "because" item lowers this recommendation's score the most
            assert p in np.flatnonzero(drops[:, c] >= drops[:, c].max() - 1e-4)
