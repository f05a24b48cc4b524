"""The numpy fusion twin (serving_core.fusion) agrees with missrec.nn.fusion and MISSRec.score; the bound holds."""

import numpy as np
import pytest
import torch

from missrec.nn import fusion as tf
from serving_core import fusion as nf
from serving_core.bundle import MISSREC_FUSION, Fusion, ItemTable, Scorer, static_vectors
from tests.helpers import tiny_dataset, tiny_missrec

pytestmark = pytest.mark.oracle

ALPHAS = [0.0, 0.3, -1.7, 3.0, -3.0, 25.0, -80.0]


def _sims(rng, shape, m):
    return (rng.random((*shape, m), dtype=np.float32) * 2 - 1).astype(np.float32)


@pytest.mark.parametrize("alpha", ALPHAS)
def test_fuse_forms_match_torch(alpha):
    rng = np.random.default_rng(0)
    sims = _sims(rng, (7, 33), 2)
    a = torch.tensor(alpha)
    want = tf.fuse(torch.from_numpy(sims), a).numpy()
    got_softmax = nf.fuse(sims, alpha)
    got_pair = nf.fuse_pair(sims[..., 0], sims[..., 1], alpha)
    assert got_softmax.dtype == got_pair.dtype == np.float32
    assert got_softmax.shape == got_pair.shape == (7, 33)
    np.testing.assert_allclose(got_softmax, want, atol=1e-6)
    np.testing.assert_allclose(got_pair, want, atol=1e-6)
    np.testing.assert_allclose(
        got_pair, tf.fuse_pair(torch.from_numpy(sims[..., 0]), torch.from_numpy(sims[..., 1]), a), atol=1e-6
    )
    np.testing.assert_allclose(nf.fuse_sims([sims[..., 0], sims[..., 1]], alpha), want, atol=1e-6)
    w = nf.fusion_weights(sims, alpha)
    assert w.dtype == np.float32
    np.testing.assert_allclose(w, tf.fusion_weights(torch.from_numpy(sims), a).numpy(), atol=1e-6)
    np.testing.assert_allclose(w.sum(-1), 1.0, atol=1e-6)


def test_alpha_zero_is_mean_and_one_modality_is_identity():
    rng = np.random.default_rng(1)
    sims = _sims(rng, (50,), 2)
    np.testing.assert_allclose(nf.fuse(sims, 0.0), sims.mean(-1), atol=1e-7)
    np.testing.assert_allclose(nf.fusion_weights(sims, 0.0), 0.5)
    one = _sims(rng, (4, 9), 1)
    np.testing.assert_array_equal(nf.fuse(one, 5.0), one[..., 0])
    np.testing.assert_array_equal(nf.fuse_sims([one[..., 0]], 5.0), one[..., 0])
    np.testing.assert_array_equal(nf.fusion_weights(one, 5.0), 1.0)
    with pytest.raises(ValueError, match="one or two"):
        nf.fuse_sims([one, one, one], 1.0)


@pytest.mark.parametrize(
    ("mode", "modalities"),
    [
        ("inductive", ("text", "image")),
        ("transductive", ("text", "image")),
        ("inductive", ("image",)),
        ("transductive", ("text",)),
    ],
)
@pytest.mark.parametrize("alpha", [0.0, 1.3, -4.0])
def test_item_scores_match_missrec_score(tmp_path, mode, modalities, alpha):
    ds = tiny_dataset(tmp_path, modalities=modalities)
    model = tiny_missrec(ds, mode=mode)
    with torch.no_grad():
        model.alpha.fill_(alpha)
        tables = model.item_tables()
        u = torch.nn.functional.normalize(torch.randn(6, 32, generator=torch.Generator().manual_seed(2)), dim=-1)
        want_full = model.score(u, tables).numpy()
        items = torch.randint(1, ds.num_items, (6, 11), generator=torch.Generator().manual_seed(3))
        want_some = model.score(u, tables, items).numpy()
    fusion = Fusion(modalities, alpha, 0.07, mode == "transductive")
    vectors = {m: tables.normed[m].numpy() for m in modalities}
    ids = tables.ids.numpy() if tables.ids is not None else None
    got_full = nf.item_scores(u.numpy(), vectors, fusion, ids)
    got_some = nf.item_scores(u.numpy(), vectors, fusion, ids, items.numpy())
    assert got_full.dtype == got_some.dtype == np.float32
    assert got_full.shape == (6, ds.num_items) and got_some.shape == (6, 11)
    np.testing.assert_allclose(got_full, want_full, atol=1e-6)
    np.testing.assert_allclose(got_some, want_some, atol=1e-6)
    # explanation weights: the softmax weights of the per-modality cosines of the chosen items
    weights = nf.explanation_weights(u.numpy(), vectors, fusion, items.numpy())
    sims = torch.stack([torch.einsum("bd,bcd->bc", u, tables.normed[m][items]) for m in modalities], dim=-1)
    assert weights.shape == (6, 11, len(modalities))
    np.testing.assert_allclose(weights, tf.fusion_weights(sims, torch.tensor(alpha)).numpy(), atol=1e-6)


def _random_table(rng, n, d, transductive):
    def unit(x):
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)

    t = unit(rng.standard_normal((n, d)))
    v = unit(t + rng.standard_normal((n, d)) * 0.6)
    e = unit(rng.standard_normal((n, d))) if transductive else None
    zeros = np.zeros(n, np.int64)
    return ItemTable(
        [str(i) for i in range(n)],
        t,
        {"text": t, "image": v},
        {"text": zeros, "image": zeros},
        np.zeros(n, np.float32),
        e,
    )


@pytest.mark.parametrize("transductive", [False, True])
@pytest.mark.parametrize("alpha", [0.0, 0.8, -3.0, 30.0])
def test_score_minus_static_is_within_bound(transductive, alpha):
    rng = np.random.default_rng(4)
    table = _random_table(rng, 400, 16, transductive)
    fusion = Fusion(("text", "image"), alpha, 0.07, transductive)
    users = table.vectors["text"][:50] + rng.standard_normal((50, 16)).astype(np.float32) * 0.3
    users /= np.linalg.norm(users, axis=1, keepdims=True)
    scorer = Scorer(MISSREC_FUSION, fusion.modalities, alpha, 0.07, transductive)
    static = static_vectors(scorer, table.vectors, table.id_vectors)
    dev = np.abs(nf.item_scores(users, table.vectors, fusion, table.id_vectors) - users @ static.T)
    gap = nf.max_modality_gap(table.vectors, fusion)
    tight = nf.deviation_bound(fusion, gap)
    assert gap < 2.0 and tight <= fusion.bound + 1e-12
    assert nf.deviation_bound(fusion) == pytest.approx(fusion.bound)
    assert dev.max() <= tight + 1e-5
    # the worst case (t = -v, u = t) reaches Fusion.bound exactly: the bound cannot be tightened without the gap
    t = np.eye(16, dtype=np.float32)[:2]
    worst = {"text": t, "image": -t}
    ids = np.zeros_like(t) if transductive else None
    s = nf.item_scores(t[:1], worst, fusion, ids)[0, 0]
    static = (t[0] - t[0]) / 2 @ t[0]
    assert abs(s - static) == pytest.approx(fusion.bound, abs=1e-6)


def test_user_norm_scales_the_bound():
    fusion = Fusion(("text", "image"), 2.0, 0.07, False)
    assert nf.deviation_bound(fusion, 2.0, 2.0) > fusion.bound
    assert nf.deviation_bound(Fusion(("text",), 2.0, 0.07, False)) == 0.0
