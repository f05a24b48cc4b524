"""MISSRec model: shapes, fusion identity, interest tokens, k-means, regulariser."""

import math

import pytest
import torch

from missrec.models.missrec import MISSRec, MISSRecConfig, interest_diversity
from missrec.nn.fusion import fuse, fuse_pair
from missrec.nn.interests import assign_in_batches, assign_nearest, minibatch_kmeans, num_interests
from tests.helpers import tiny_dataset, tiny_missrec


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    return tiny_dataset(tmp_path_factory.mktemp("tiny"))


def test_parameter_count_matches_spec():
    # inductive, from scratch, 512-d CLIP features: "about 1.7 M" (spec section 6)
    model = MISSRec(MISSRecConfig(num_items=1586))
    assert sum(p.numel() for p in model.parameters()) == 1_719_513


@pytest.mark.parametrize("alpha", [0.0, 0.7, -2.5, 9.0])
def test_fusion_identity_matches_softmax_form(alpha):
    torch.manual_seed(0)
    s_t, s_v = torch.rand(64) * 2 - 1, torch.rand(64) * 2 - 1
    a = torch.tensor(alpha)
    softmax_form = fuse(torch.stack([s_t, s_v], dim=-1), a)
    m, d = (s_t + s_v) / 2, s_t - s_v
    identity = m + (d / 2) * torch.tanh(a * d / 2)
    assert torch.allclose(softmax_form, identity, atol=1e-6)
    assert torch.allclose(fuse_pair(s_t, s_v, a), softmax_form, atol=1e-6)
    # the bound that makes exact retrieval possible
    assert ((softmax_form - m).abs() <= math.tanh(abs(alpha)) + 1e-6).all()
    assert (softmax_form <= torch.maximum(s_t, s_v) + 1e-6).all()
    assert (softmax_form >= torch.minimum(s_t, s_v) - 1e-6).all()


def test_alpha_zero_is_plain_mean():
    s = torch.tensor([[0.2, 0.8]])
    assert fuse(s, torch.tensor(0.0)).item() == pytest.approx(0.5)


def test_shapes_and_unit_user_vectors(ds):
    model = tiny_missrec(ds).eval()
    model.discover_interests(generator=torch.Generator().manual_seed(0))
    items = torch.from_numpy(ds.test.histories[:9, :12])
    lengths = torch.from_numpy(ds.test.lengths[:9]).clamp(max=12)
    u, xi, pad = model.encode(items, lengths)
    assert u.shape == (9, 32)
    assert torch.allclose(u.norm(dim=-1), torch.ones(9), atol=1e-5)
    assert xi.shape[:2] == pad.shape and xi.shape[0] == 9
    scores = model.full_scores(items, lengths)
    assert scores.shape == (9, ds.num_items)
    assert torch.isinf(scores[:, 0]).all() and torch.isfinite(scores[:, 1:]).all()


def test_padding_does_not_change_the_user_vector(ds):
    model = tiny_missrec(ds).eval()
    model.discover_interests(generator=torch.Generator().manual_seed(0))
    items = torch.from_numpy(ds.test.histories[:4, :10])
    lengths = torch.from_numpy(ds.test.lengths[:4]).clamp(max=10)
    wider = torch.cat([items, torch.zeros(4, 7, dtype=torch.long)], dim=1)
    a, _, _ = model.encode(items, lengths)
    b, _, _ = model.encode(wider, lengths)
    assert torch.allclose(a, b, atol=1e-5)


def test_interest_ids_are_the_deduplicated_cluster_set(ds):
    model = tiny_missrec(ds)
    model.text_cluster = torch.arange(ds.num_items) % 5  # item 0 -> 0 (padding)
    model.image_cluster = (torch.arange(ds.num_items) % 3) + 5
    model.image_cluster[0] = 0
    items = torch.tensor([[1, 6, 11, 0], [2, 3, 0, 0]])
    ids = model.interest_ids(items)
    expected0 = {int(model.text_cluster[i]) for i in (1, 6, 11)} | {int(model.image_cluster[i]) for i in (1, 6, 11)}
    assert set(ids[0][ids[0] > 0].tolist()) == expected0 - {0}
    expected1 = {2, 3, int(model.image_cluster[2]), int(model.image_cluster[3])}
    assert set(ids[1][ids[1] > 0].tolist()) == expected1
    assert (ids[1] > 0).sum() == len(expected1)  # no duplicates


def test_kmeans_recovers_separated_clusters():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[10.0, 0.0], [0.0, 10.0], [-10.0, -10.0]])
    labels = torch.randint(0, 3, (3000,), generator=g)
    x = centres[labels] + 0.3 * torch.randn(3000, 2, generator=g)
    found = minibatch_kmeans(x, 3, passes=5, batch_size=256, generator=torch.Generator().manual_seed(1))
    assigned = assign_nearest(x, found)
    # each true cluster maps to exactly one found cluster, and vice versa
    pairs = {(int(a), int(b)) for a, b in zip(labels, assigned, strict=True)}
    assert len(pairs) == 3
    nearest_true = assign_nearest(found, centres)
    assert sorted(nearest_true.tolist()) == [0, 1, 2]
    assert (found - centres[nearest_true]).abs().max() < 0.2


def test_chunked_assignment_equals_brute_force():
    g = torch.Generator().manual_seed(0)
    x, c = torch.randn(1000, 16, generator=g), torch.randn(300, 16, generator=g)
    brute = torch.cdist(x, c).argmin(dim=1)
    assert torch.equal(assign_in_batches(x, c, batch_size=97, chunk=41), brute)


def test_num_interests():
    assert num_interests(3170, 0.5) == 1585
    assert num_interests(3170, 0.02) == math.ceil(0.02 * 3170)
    assert num_interests(3, 5.0) == 3


def test_discover_interests_fills_lookups_and_excludes_cold_items(ds):
    model = tiny_missrec(ds)
    known = torch.ones(ds.num_items, dtype=torch.bool)
    known[0] = False
    known[1:11] = False  # ten "cold" items
    k = model.discover_interests(known, torch.Generator().manual_seed(0))
    assert k == math.ceil(0.5 * 2 * (ds.num_items - 11))
    assert model.centroids.shape == (k + 1, 32) and model.centroids[0].abs().sum() == 0
    for m in ("text", "image"):
        lookup = getattr(model, f"{m}_cluster")
        assert lookup[0] == 0 and (lookup[1:] >= 1).all() and (lookup <= k).all()
    # cold items get their nearest centroid, like any new item
    adapted = model.adapted()["text"][1:11].detach()
    assert torch.equal(model.text_cluster[1:11], assign_nearest(adapted, model.centroids[1:]) + 1)


def test_diversity_regulariser_ignores_padding():
    xi = torch.randn(2, 3, 8)
    pad = torch.tensor([[False, False, True], [False, True, True]])
    r = interest_diversity(xi, pad, n_slots=10)
    changed = xi.clone()
    changed[pad] = 1e3  # garbage in padded slots must not matter
    assert torch.allclose(interest_diversity(changed, pad, n_slots=10), r)
    wider = torch.cat([xi, torch.randn(2, 4, 8)], dim=1)  # more padding: same value
    assert torch.allclose(interest_diversity(wider, torch.cat([pad, torch.ones(2, 4, dtype=torch.bool)], 1), 10), r)
    pooled0 = (2 / 10) * xi[0, :2].sum(0)
    pooled1 = (1 / 10) * xi[1, :1].sum(0)
    assert r.item() == pytest.approx(((pooled0**2).sum() + (pooled1**2).sum()).item() / 8, rel=1e-5)


def test_one_modality_model(tmp_path):
    ds = tiny_dataset(tmp_path, modalities=("image",))
    model = tiny_missrec(ds)
    assert model.cfg.modalities == ("image",)
    model.discover_interests(generator=torch.Generator().manual_seed(0))
    items = torch.from_numpy(ds.test.histories[:5, :8])
    lengths = torch.from_numpy(ds.test.lengths[:5]).clamp(max=8)
    loss = model.loss(items, lengths, torch.from_numpy(ds.test.targets[:5]))
    loss.backward()
    assert torch.isfinite(loss)


def test_transductive_adds_ids(ds):
    model = tiny_missrec(ds, mode="transductive")
    assert model.item_id is not None and model.item_id.weight.shape == (ds.num_items, 32)
    with pytest.raises(ValueError):
        MISSRecConfig(num_items=10, text_dim=0, image_dim=0)


def test_user_tower_matches_a_torch_nn_transformer_reference(ds):
    """Oracle: nn.TransformerEncoder/Decoder with the same weights, full decoder output gathered at the last
    real position, then L2-normalised."""
    from torch import nn

    model = tiny_missrec(ds).eval()
    model.discover_interests(generator=torch.Generator().manual_seed(0))
    cfg = model.cfg
    enc = nn.TransformerEncoder(
        nn.TransformerEncoderLayer(cfg.hidden, cfg.n_heads, cfg.ff_dim, 0.0, activation="gelu", batch_first=True),
        1,
        norm=nn.LayerNorm(cfg.hidden),
        enable_nested_tensor=False,
    ).eval()
    dec = nn.TransformerDecoder(
        nn.TransformerDecoderLayer(cfg.hidden, cfg.n_heads, cfg.ff_dim, 0.0, activation="gelu", batch_first=True),
        1,
        norm=nn.LayerNorm(cfg.hidden),
    ).eval()
    enc.load_state_dict(model.encoder.state_dict())
    dec.load_state_dict(model.decoder.state_dict())
    items = torch.from_numpy(ds.test.histories[:16, :20])
    lengths = torch.from_numpy(ds.test.lengths[:16]).clamp(max=20)
    with torch.no_grad():
        u, _, _ = model.encode(items, lengths)
        tables = model.item_tables()
        ids = model.interest_ids(items)
        x = model.token_norm(tables.tokens[items] + model.position.weight[: items.shape[1]][None])
        item_pad = torch.arange(items.shape[1])[None] >= lengths[:, None]
        xi = enc(model.centroids[ids], src_key_padding_mask=ids == 0)
        h = dec(x, xi, tgt_key_padding_mask=item_pad, memory_key_padding_mask=ids == 0)
        expected = torch.nn.functional.normalize(h[torch.arange(16), lengths - 1], dim=-1)
    assert torch.allclose(u, expected, atol=1e-5)
