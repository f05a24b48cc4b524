"""MMSRec: shapes, positions independent of the batch, masking statistics, losses that fall (fine-tuning and the
item-level pre-training), one modality and odd widths, determinism, checkpoint round trip, a brand-new item scored
through the item tower alone (seconds each)."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from missrec.models.mmsrec import KEEP, MASK, RANDOM, MMSRec, MMSRecConfig, right_align, sample_masking
from missrec.nn.protocol import banned_items, mask_items, softmax_loss
from missrec.recipes.mmsrec import MMSREC_OPTIMISER, build_mmsrec, train_mmsrec
from missrec.training.loop import TrainOptions, fit, training_loss
from missrec.training.pretrain_mmsrec import multiview_loss, pretrain_items
from tests.helpers import assert_checkpoint_round_trip, tiny_dataset, withheld_outside

SMALL = {"hidden": 16, "ff_dim": 32, "n_heads": 2, "dropout": 0.1}
FAST = TrainOptions(epochs=3, batch_size=64, patience=3, progress=False, lr=3e-3, **MMSREC_OPTIMISER)


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    return tiny_dataset(tmp_path_factory.mktemp("tiny"))


def _batch(ds, n=6, width=12):
    return torch.from_numpy(ds.test.histories[:n, :width]), torch.from_numpy(ds.test.lengths[:n]).clamp(max=width)


def test_config_refuses_unknown_keys_and_round_trips():
    cfg = MMSRecConfig(num_items=10, text_dim=0, image_dim=5)
    assert MMSRecConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown MMSRecConfig fields"):
        MMSRecConfig.from_dict({**cfg.to_dict(), "mode": "transductive"})  # no IDs: there is no mode
    with pytest.raises(ValueError, match="random_prob"):
        MMSRecConfig(num_items=10, random_prob=0.6, keep_prob=0.6)


def test_right_align_keeps_the_last_items():
    items = torch.tensor([[1, 2, 3, 0], [4, 0, 0, 0]])
    lengths = torch.tensor([3, 1])
    assert right_align(items, lengths, 2).tolist() == [[2, 3], [0, 4]]
    assert right_align(items, lengths, 5).tolist() == [[0, 0, 1, 2, 3], [0, 0, 0, 0, 4]]


def test_shapes_unit_vectors_and_score_is_one_cosine(ds):
    model = build_mmsrec(ds, **SMALL).eval()
    items, lengths = _batch(ds)
    with torch.no_grad():
        u = model.encode(items, lengths)
        v = model.item_table()
        assert u.shape == (6, 16) and v.shape == (ds.num_items, 16)
        assert torch.allclose(u.norm(dim=-1), torch.ones(6), atol=1e-5)
        assert torch.allclose(v[1:].norm(dim=-1), torch.ones(ds.num_items - 1), atol=1e-5)
        scores = model.full_scores(items, lengths)
        assert torch.isinf(scores[:, 0]).all()
        assert torch.allclose(scores[:, 1:], (u @ v.T)[:, 1:], atol=1e-6)


def test_user_vector_uses_the_last_l_minus_1_items_whatever_the_padding(ds):
    """[MASK] sits at position L - 1 whatever the batch: padding the batch or prepending older items changes
    nothing (the authors' batches made positions depend on the longest row)."""
    model = build_mmsrec(ds, max_len=5, **SMALL).eval()
    items = torch.tensor([[3, 4, 5, 6, 7, 8, 0, 0], [9, 10, 0, 0, 0, 0, 0, 0]])
    lengths = torch.tensor([6, 2])
    with torch.no_grad():
        u = model.encode(items, lengths)
        alone = model.encode(torch.tensor([[5, 6, 7, 8]]), torch.tensor([4]))  # the last L - 1 = 4 items
        assert torch.allclose(u[0], alone[0], atol=1e-6)
        short = model.encode(torch.tensor([[9, 10]]), torch.tensor([2]))
        assert torch.allclose(u[1], short[0], atol=1e-6)


def test_masking_statistics_match_the_config():
    cfg = MMSRecConfig(num_items=10, mask_prob=0.2, random_prob=0.1, keep_prob=0.1)
    g = torch.Generator().manual_seed(0)
    b, s = 2000, 20
    real = torch.arange(s)[None] >= torch.randint(0, s - 1, (b, 1), generator=g)  # right-aligned rows
    last = torch.zeros(b, s, dtype=torch.bool)
    last[:, -1] = True
    masked, action = sample_masking(real, last, cfg, g)
    assert masked[:, -1].all() and (action[:, -1] == MASK).all()
    assert not masked[~real].any()
    inner = real & ~last
    assert abs(masked[inner].float().mean().item() - 0.2) < 0.01  # ~20,000 draws
    chosen = action[masked & ~last]
    assert abs((chosen == RANDOM).float().mean().item() - 0.1) < 0.02
    assert abs((chosen == KEEP).float().mean().item() - 0.1) < 0.02
    assert abs((chosen == MASK).float().mean().item() - 0.8) < 0.025


@pytest.mark.parametrize("mask_prob", [0.0, 1.0])
def test_masked_slots_show_the_mask_item_and_the_target_slot_always_does(mask_prob):
    torch.manual_seed(0)
    cfg = MMSRecConfig(
        num_items=30, text_dim=6, image_dim=4, mask_prob=mask_prob, random_prob=0.0, keep_prob=0.0, **SMALL
    )
    model = MMSRec(cfg).eval()
    feats = {"text": torch.randn(30, 6), "image": torch.randn(30, 4)}
    feats["text"][0] = feats["image"][0] = 0
    model.set_item_features(feats)
    seen = []
    encode_slots = model.encode_slots

    def spy(tokens, valid, positions):
        seen.append((tokens, valid, positions))
        return encode_slots(tokens, valid, positions)

    model.encode_slots = spy
    items, lengths, targets = torch.tensor([[3, 4, 5], [7, 0, 0]]), torch.tensor([3, 1]), torch.tensor([6, 8])
    assert torch.isfinite(model.loss(items, lengths, targets))
    tokens, valid, positions = seen[0]  # the sequence pass (the next is the item tower)
    assert tokens.shape == (2, 4, 2, 16) and positions.tolist() == [cfg.max_len - 4 + i for i in range(4)]
    mask = model.mask_item.expand(2, 16)
    assert torch.equal(tokens[0, -1], mask) and torch.equal(tokens[1, -1], mask)  # the target slot
    assert valid[1].tolist() == [[False, False]] * 2 + [[True, True]] * 2  # left padding masked out
    own, _ = model.item_tokens({m: f[torch.tensor([3, 4, 5])] for m, f in feats.items()})
    for slot in range(3):
        expected = mask if mask_prob == 1.0 else own[slot]
        assert torch.allclose(tokens[0, slot], expected, atol=1e-6)


def test_fine_tuning_loss_falls(ds):
    model = build_mmsrec(ds, seed=0, **SMALL)
    history = fit(model, ds.train.subset(np.arange(400)), ds.valid.subset(np.arange(200)), FAST).history
    assert history[-1]["loss"] < 0.9 * history[0]["loss"]


def test_item_pretraining_loss_falls(ds):
    model = build_mmsrec(ds, seed=0, **SMALL)
    items = np.arange(1, ds.num_items)
    with torch.no_grad():
        model.eval()
        before = multiview_loss(model, torch.from_numpy(items)).item()
    info = pretrain_items(model, items, replace(FAST, lr=3e-3), epochs=5, batch_size=64)
    with torch.no_grad():
        after = multiview_loss(model.eval(), torch.from_numpy(items)).item()
    assert len(info["history"]) == 5 and after < 0.9 * before


@pytest.mark.parametrize(("modalities", "widths"), [(("text",), {"text_dim": 11}), (("image",), {"image_dim": 3})])
def test_one_modality_and_odd_widths(tmp_path, modalities, widths):
    one = tiny_dataset(tmp_path, modalities=modalities, num_users=120, **widths)
    model = build_mmsrec(one, **SMALL)
    assert model.cfg.modalities == modalities
    items, lengths = _batch(one)
    loss = model.loss(items, lengths, torch.from_numpy(one.test.targets[:6]))
    loss.backward()
    assert torch.isfinite(loss)
    assert multiview_loss(model, torch.arange(1, 20)).isfinite()
    with torch.no_grad():
        assert model.eval().encode(items, lengths).shape == (6, 16)


def test_missing_modality_is_a_masked_token_not_a_zero_vector(ds):
    model = build_mmsrec(ds, **SMALL).eval()
    text = torch.from_numpy(ds.features["text"][1:3])
    image = torch.from_numpy(ds.features["image"][1:3])
    with torch.no_grad():
        text_only = model.item_vectors({"text": text, "image": torch.zeros_like(image)})
        tokens, valid = model.item_tokens({"text": text, "image": image})
        pos0 = torch.zeros(1, dtype=torch.long)
        masked_image = model.encode_slots(tokens[:, None], (valid & torch.tensor([True, False]))[:, None], pos0)
        assert torch.allclose(text_only, torch.nn.functional.normalize(masked_image[:, 0], dim=-1), atol=1e-6)
        nothing = model.item_vectors({"text": torch.zeros_like(text), "image": torch.zeros_like(image)})
        assert torch.equal(nothing, torch.zeros_like(nothing))


def test_deterministic_for_a_seed(ds):
    def run(seed):
        model = build_mmsrec(ds, seed=seed, **SMALL)
        opts = replace(FAST, epochs=1, seed=seed)
        return [h["loss"] for h in fit(model, ds.train.subset(np.arange(200)), ds.valid, opts).history]

    assert run(3) == run(3)
    assert run(3) != run(4)


def test_checkpoint_round_trip(ds, tmp_path):
    model = build_mmsrec(ds, **SMALL)
    fit(model, ds.train.subset(np.arange(128)), ds.valid, replace(FAST, epochs=1))
    assert_checkpoint_round_trip(model, ds, tmp_path / "ckpt.pt", "mmsrec", MMSRec, width=12)


def test_a_brand_new_item_is_scored_through_the_item_tower(tmp_path):
    small = tiny_dataset(tmp_path, num_users=80)
    run = train_mmsrec(small, replace(FAST, epochs=1), pretrain_epochs=1, cold_fraction=0.1, **SMALL)
    model = run.model.eval()
    cold = np.flatnonzero(run.cold_items)
    assert len(cold) > 0 and "test_cold" in run.metrics and run.info["pretraining"]["epochs_run"] == 1
    items, lengths = _batch(small)
    with torch.no_grad():
        new = model.item_vectors({m: torch.from_numpy(small.features[m][cold]) for m in model.cfg.modalities})
        full = model.full_scores(items, lengths)
        assert torch.allclose(model.score(model.encode(items, lengths), new), full[:, cold], atol=1e-5)


def test_random_replacements_come_only_from_known_items():
    torch.manual_seed(0)
    cfg = MMSRecConfig(num_items=30, text_dim=6, image_dim=0, mask_prob=1.0, random_prob=1.0, keep_prob=0.0, **SMALL)
    model = MMSRec(cfg)
    feats = torch.randn(30, 6)
    feats[0] = 0
    model.set_item_features({"text": feats})
    known = torch.zeros(30, dtype=torch.bool)
    known[[3, 4, 5, 6]] = True
    model.on_epoch_start(known, torch.Generator())
    shown = []
    item_tokens = model.item_tokens
    model.item_tokens = lambda f: (shown.append(f["text"]), item_tokens(f))[1]
    items = torch.tensor([[3, 4, 5, 6, 3, 4]] * 50)
    model.loss(items, torch.full((50,), 6), torch.full((50,), 5))
    rows = {int(torch.nonzero((feats == r).all(dim=1))[0]) for r in shown[0][:, :-1].flatten(0, 1)}
    assert rows <= {3, 4, 5, 6}  # every replacement (all non-last slots) is a known item
    assert len(rows) > 1


def test_real_scientific_users_rank_by_one_inner_product(scientific_dir):
    """Spec-size MMSRec (d 512, L 20) on the real CLIP features: the full ranking of 64 real users is one cosine of
    the user tower's vector with the item tower's vectors built from the raw features."""
    from missrec.data.dataset import load_dataset

    real = load_dataset(scientific_dir)
    model = build_mmsrec(real).eval()
    assert model.cfg.hidden == 512 and model.cfg.max_len == 20
    items, lengths = torch.from_numpy(real.test.histories[:64]), torch.from_numpy(real.test.lengths[:64])
    feats = {m: torch.from_numpy(f) for m, f in real.features.items()}
    with torch.no_grad():
        full = model.full_scores(items, lengths)
        served = model.score(model.encode(items, lengths), model.item_vectors(feats))
    assert torch.allclose(full[:, 1:], served[:, 1:], atol=1e-5)
    assert torch.equal(full[:, 1:].topk(50).indices, served[:, 1:].topk(50).indices)


@pytest.mark.parametrize("with_dropout", [False, True])
def test_fine_tuning_candidates_are_built_without_dropout_by_default(ds, with_dropout):
    model = build_mmsrec(ds, candidates_with_dropout=with_dropout, **(SMALL | {"dropout": 0.5})).train()
    a, b = model.candidate_table(), model.candidate_table()
    assert model.training and a.requires_grad
    assert torch.equal(a, b) != with_dropout
    if not with_dropout:
        with torch.no_grad():
            assert torch.allclose(a, model.eval().item_table(), atol=1e-6)


def test_cold_protocol_masks_withheld_items_out_of_the_training_softmax(ds):
    """training_logits: one row of logits per masked slot (P, N), its label and batch row; under the cold
    protocol the loop gives a withheld item -inf, no probability and no gradient; model.loss is the same
    reduction without the withheld mask."""
    model = build_mmsrec(ds, seed=0, **SMALL).eval()
    items, lengths = _batch(ds)
    targets = torch.from_numpy(ds.test.targets[: len(items)])
    withheld = withheld_outside(ds, items, targets)
    banned = banned_items(ds.num_items, withheld)
    known = ~torch.from_numpy(banned.numpy())
    model.on_epoch_start(known, torch.Generator())
    torch.manual_seed(0)
    out = model.training_logits(items, lengths, targets)
    p = out.logits.shape[0]
    assert out.logits.shape == (p, ds.num_items) and out.labels.shape == (p,) and out.rows.shape == (p,)
    assert p >= len(items)  # the target slot of every row is always masked
    for row in range(len(items)):  # each row's predictions include its target, and only its own items
        own = out.labels[out.rows == row].tolist()
        assert targets[row].item() in own
        assert set(own) <= set(items[row, : lengths[row]].tolist()) | {targets[row].item()}
    masked = mask_items(out.logits.detach(), banned)
    assert torch.isneginf(masked[:, withheld]).all() and torch.isfinite(masked[:, ~banned]).all()
    assert (torch.softmax(masked, dim=1)[:, withheld] == 0).all()
    logits = out.logits.detach().requires_grad_(True)
    loss = softmax_loss(logits, out.labels, len(items), banned)
    loss.backward()
    assert (logits.grad[:, withheld] == 0).all() and (logits.grad[:, ~banned] != 0).all()
    with torch.no_grad():  # the loop applies the mask (a model without training_logits raises TypeError here)
        torch.manual_seed(0)
        assert float(training_loss(model, items, lengths, targets, len(items), banned)) == pytest.approx(float(loss))
        torch.manual_seed(0)
        unmasked = float(model.loss(items, lengths, targets))
    assert unmasked == pytest.approx(float(softmax_loss(out.logits.detach(), out.labels, len(items))))
    assert unmasked > float(loss.detach())  # the withheld items did take probability before masking
