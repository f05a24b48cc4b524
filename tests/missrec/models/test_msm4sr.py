"""MSM4SR: shapes, the score as one inner product, mixup and item-drop statistics, losses that fall, one modality
and odd widths, determinism, checkpoint round trip, a brand-new item scored from its features alone (seconds each)."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from missrec.models.msm4sr import MSM4SR, MoEAdapter, MSM4SRConfig
from missrec.nn.protocol import banned_items, mask_items, softmax_loss
from missrec.recipes.msm4sr import build_msm4sr, train_msm4sr
from missrec.training.loop import TrainOptions, fit, training_loss
from missrec.training.pretrain_missrec import drop_items
from missrec.training.pretrain_msm4sr import MSM4SRPretraining, complementary_mixup, cross_modal_nce, next_item_nce
from tests.helpers import assert_checkpoint_round_trip, tiny_dataset, withheld_outside

SMALL = {"hidden": 16, "ff_dim": 32}
FAST = TrainOptions(epochs=3, batch_size=64, patience=3, progress=False, lr=3e-3, grad_clip=5.0)


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    return tiny_dataset(tmp_path_factory.mktemp("tiny"))


def _rows(ds, n=400):
    """A few hundred training rows, so a few epochs take a second."""
    return ds.train.subset(np.arange(n))


def _batch(ds, n=6, width=10):
    return torch.from_numpy(ds.test.histories[:n, :width]), torch.from_numpy(ds.test.lengths[:n]).clamp(max=width)


def test_config_refuses_unknown_keys_and_round_trips():
    cfg = MSM4SRConfig(num_items=10, text_dim=7, image_dim=0, mode="transductive")
    assert MSM4SRConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown MSM4SRConfig fields"):
        MSM4SRConfig.from_dict({**cfg.to_dict(), "hiddne": 3})
    with pytest.raises(ValueError, match="at least one modality"):
        MSM4SRConfig(num_items=10, text_dim=0, image_dim=0)
    with pytest.raises(AttributeError):
        cfg.hidden = 3  # frozen


def test_moe_gate_starts_as_the_average_of_the_experts():
    torch.manual_seed(0)
    moe = MoEAdapter(width=9, dim=4, n_experts=8, dropout=0.2, eps=1e-12).eval()
    x = torch.randn(5, 9)
    experts = torch.nn.functional.layer_norm(moe.experts(x).unflatten(-1, (8, 4)), (4,), eps=1e-12)
    assert torch.allclose(moe(x), experts.mean(dim=1), atol=1e-6)
    assert moe(torch.randn(3, 2, 9)).shape == (3, 2, 4)


def test_shapes_and_score_is_the_sum_of_two_cosines(ds):
    model = build_msm4sr(ds, **SMALL).eval()
    items, lengths = _batch(ds)
    with torch.no_grad():
        u = model.encode(items, lengths)
        assert u.shape == (6, 2 * 16)
        h_t, h_v = u[:, :16], u[:, 16:]
        assert torch.allclose(h_t.norm(dim=-1), torch.ones(6), atol=1e-5)
        assert torch.allclose(h_v.norm(dim=-1), torch.ones(6), atol=1e-5)
        z = model.item_table()  # (N, 2, D)
        assert z.shape == (ds.num_items, 2, 16)
        scores = model.full_scores(items, lengths)
        cos_t = h_t @ torch.nn.functional.normalize(z[:, 0], dim=-1).T
        cos_v = h_v @ torch.nn.functional.normalize(z[:, 1], dim=-1).T
        assert scores.shape == (6, ds.num_items) and torch.isinf(scores[:, 0]).all()
        assert torch.allclose(scores[:, 1:], (cos_t + cos_v)[:, 1:], atol=1e-5)
        # the serving item tower (raw features in) gives the same vectors as the catalogue table
        feats = {m: torch.from_numpy(f) for m, f in ds.features.items()}
        assert torch.allclose(model.item_vectors(feats)[1:], model.scoring_vectors(z)[1:], atol=1e-6)


def test_padding_does_not_change_the_user_vector(ds):
    model = build_msm4sr(ds, **SMALL).eval()
    items, lengths = _batch(ds, width=8)
    padded = torch.cat([items, torch.zeros(6, 5, dtype=torch.long)], dim=1)
    with torch.no_grad():
        assert torch.allclose(model.encode(items, lengths), model.encode(padded, lengths), atol=1e-6)


def test_complementary_mixup_rate_and_exact_complement():
    g = torch.Generator().manual_seed(0)
    b, length, d = 400, 30, 3
    z_t, z_v = torch.zeros(b, length, d), torch.ones(b, length, d)
    real = torch.arange(length)[None] < torch.randint(1, length + 1, (b, 1), generator=g)
    for p in (0.1, 0.35):
        text_dom, image_dom, m = complementary_mixup(z_t, z_v, real, p, g)
        assert not m[~real].any()  # only real positions are mixed
        assert abs(m[real].float().mean().item() - p) < 0.015  # ~6,000 draws: 3 sigma is ~0.012
        assert torch.equal(text_dom[..., 0] == 1, m) and torch.equal(image_dom[..., 0] == 0, m)
        assert torch.equal(text_dom + image_dom, z_t + z_v)  # exact complement at every position


def test_item_drop_rate_keeps_the_first_item():
    g = torch.Generator().manual_seed(1)
    items = torch.arange(1, 21).repeat(500, 1)  # (500, 20)
    lengths = torch.full((500,), 20)
    for q in (0.05, 0.2):
        dropped, new_len = drop_items(items, lengths, keep_prob=1.0 - q, generator=g)
        assert (dropped[:, 0] == 1).all()
        rate = 1.0 - (new_len - 1).sum().item() / (500 * 19)  # position 0 is never dropped
        assert abs(rate - q) < 0.015


def test_next_item_nce_masks_rows_that_share_a_target():
    h = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    z = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    same = torch.tensor([5, 5, 7])
    different = torch.tensor([5, 6, 7])
    # rows 0 and 1 share item 5: without the mask each would count the other's (identical) target as a negative
    assert next_item_nce(h, z, same, 0.07) < next_item_nce(h, z, different, 0.07) - 1.0
    assert next_item_nce(h, z, same, 0.07).item() == pytest.approx(0.0, abs=1e-3)


def test_cross_modal_nce_is_low_for_aligned_views():
    torch.manual_seed(0)
    h = torch.randn(16, 8)
    aligned = cross_modal_nce(h, h + 0.01 * torch.randn(16, 8), 0.07)
    shuffled = cross_modal_nce(h, h[torch.randperm(16)], 0.07)
    assert aligned < 0.1 * shuffled


@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
def test_losses_fall_on_synthetic_data(ds, stage):
    model = build_msm4sr(ds, seed=0, **SMALL)
    trainable = MSM4SRPretraining(model) if stage == "pretrain" else model
    history = fit(trainable, _rows(ds), ds.valid.subset(np.arange(200)), FAST).history
    assert history[-1]["loss"] < 0.95 * history[0]["loss"]


@pytest.mark.parametrize(("modalities", "widths"), [(("text",), {"text_dim": 13}), (("image",), {"image_dim": 7})])
def test_one_modality_and_odd_widths(tmp_path, modalities, widths):
    one = tiny_dataset(tmp_path, modalities=modalities, num_users=120, **widths)
    model = build_msm4sr(one, **SMALL)
    assert model.cfg.modalities == modalities
    items, lengths = _batch(one)
    assert model.encode(items, lengths).shape == (6, 16)
    pre = MSM4SRPretraining(model).loss(items, lengths, torch.from_numpy(one.test.targets[:6]))
    pre.backward()  # the one-modality pre-training loss (no mixup) is differentiable
    assert torch.isfinite(pre)
    assert torch.isfinite(model.full_scores(items, lengths)[:, 1:]).all()


def test_deterministic_for_a_seed(ds):
    def run(seed):
        model = build_msm4sr(ds, seed=seed, **SMALL)
        opts = TrainOptions(epochs=1, batch_size=64, progress=False, seed=seed, grad_clip=5.0)
        return [h["loss"] for h in fit(MSM4SRPretraining(model), _rows(ds, 200), ds.valid, opts).history]

    assert run(3) == run(3)
    assert run(3) != run(4)


def test_checkpoint_round_trip(ds, tmp_path):
    model = build_msm4sr(ds, mode="transductive", **SMALL)
    fit(model, _rows(ds, 128), ds.valid, TrainOptions(epochs=1, batch_size=64, progress=False))
    raw = assert_checkpoint_round_trip(model, ds, tmp_path / "ckpt.pt", "msm4sr", MSM4SR, width=10)
    assert raw["config"]["mode"] == "transductive"


def test_inductive_scores_a_brand_new_item_from_features_alone(tmp_path):
    """Train with an item withheld, then score it for users: its vector comes from the adapters only, and a copy
    of a trained item's features scores exactly like that item."""
    small = tiny_dataset(tmp_path, num_users=80)
    run = train_msm4sr(small, replace(FAST, epochs=1), pretrain_epochs=1, cold_fraction=0.1, **SMALL)
    assert run.info["pretraining"]["epochs_run"] == 1
    model = run.model.eval()
    cold = np.flatnonzero(run.cold_items)
    assert len(cold) > 0 and "test_cold" in run.metrics
    items, lengths = _batch(small)
    feats = {m: torch.from_numpy(small.features[m][cold]) for m in model.cfg.modalities}
    with torch.no_grad():
        new_vectors = model.item_vectors(feats)  # (C, 2D): the item tower on features alone
        full = model.full_scores(items, lengths)
        assert torch.allclose(model.score(model.encode(items, lengths), new_vectors), full[:, cold], atol=1e-5)
        # an item without an image still scores, on its text half alone
        text_only = model.item_vectors({"text": feats["text"][:1], "image": torch.zeros_like(feats["image"][:1])})
        assert torch.equal(text_only[0, 16:], torch.zeros(16)) and text_only[0, :16].norm() > 0.99


def test_real_scientific_users_rank_by_one_inner_product(scientific_dir):
    """Spec-size MSM4SR on the real 512-d CLIP features: the full ranking of 64 real users is one inner product of
    the user tower's vectors with the serving item tower's vectors (what an exact FAISS index would return)."""
    from missrec.data.dataset import load_dataset

    real = load_dataset(scientific_dir)
    model = build_msm4sr(real).eval()
    experts, norms, gate = 512 * 8 * 64 + 8 * 64, 2 * 8 * 64, 512 * 8  # per adapter
    assert model.user_dim == 128
    assert sum(p.numel() for p in model.adapters.parameters()) == 2 * (experts + norms + gate)
    items, lengths = torch.from_numpy(real.test.histories[:64]), torch.from_numpy(real.test.lengths[:64])
    feats = {m: torch.from_numpy(f) for m, f in real.features.items()}
    with torch.no_grad():
        full = model.full_scores(items, lengths)
        served = model.score(model.encode(items, lengths), model.item_vectors(feats))
    assert torch.allclose(full[:, 1:], served[:, 1:], atol=1e-5)
    assert torch.equal(full[:, 1:].topk(50).indices, served[:, 1:].topk(50).indices)


def test_cold_protocol_masks_withheld_items_out_of_the_training_softmax(ds):
    """training_logits: full-softmax logits (B, N); under the cold protocol the loop gives a withheld item -inf,
    no probability and no gradient, and model.loss is the same reduction without the withheld mask."""
    model = build_msm4sr(ds, **SMALL).eval()
    items, lengths = _batch(ds)
    targets = torch.from_numpy(ds.test.targets[: len(items)])
    withheld = withheld_outside(ds, items, targets)
    banned = banned_items(ds.num_items, withheld)
    out = model.training_logits(items, lengths, targets)
    assert out.logits.shape == (len(items), ds.num_items) and out.rows is None
    assert torch.equal(out.labels, targets)
    masked = mask_items(out.logits.detach(), banned)
    assert torch.isneginf(masked[:, withheld]).all() and torch.isfinite(masked[:, ~banned]).all()
    assert (torch.softmax(masked, dim=1)[:, withheld] == 0).all()
    logits = out.logits.detach().requires_grad_(True)
    loss = softmax_loss(logits, out.labels, None, banned)
    loss.backward()
    assert (logits.grad[:, withheld] == 0).all() and (logits.grad[:, ~banned] != 0).all()
    with torch.no_grad():  # the loop applies the mask (a model without training_logits raises TypeError here)
        assert float(training_loss(model, items, lengths, targets, len(items), banned)) == pytest.approx(float(loss))
        unmasked = float(model.loss(items, lengths, targets))
    assert unmasked == pytest.approx(float(softmax_loss(out.logits.detach(), targets)))
    assert unmasked > float(loss.detach())  # the withheld items did take probability before masking
