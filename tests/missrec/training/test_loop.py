"""Training, cold-item protocol, checkpoints and pre-training on tiny SYNTHETIC data (seconds each)."""

import numpy as np
import pytest
import torch

from missrec.data.dataset import Interactions
from missrec.evaluation.cold import remove_items, withhold_items
from missrec.evaluation.metrics import evaluate
from missrec.models.checkpoint import CheckpointError, attach_features, load_checkpoint, save_checkpoint
from missrec.models.popularity import Popularity, item_popularity
from missrec.models.sasrec import SASRec, SASRecConfig
from missrec.recipes.missrec import build_missrec, load_pretrained
from missrec.training.loop import TrainOptions, fit
from missrec.training.pretrain_missrec import Pretrainer, PretrainOptions, drop_items, merge_domains, pretrain
from tests.helpers import tiny_dataset, tiny_missrec

FAST = TrainOptions(epochs=6, batch_size=128, patience=3, progress=False, lr=3e-3)


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    return tiny_dataset(tmp_path_factory.mktemp("tiny"))


def _epoch_losses(model, ds, opts):
    return [h["loss"] for h in fit(model, ds.train, ds.valid, opts).history]


def _train_loss(model, ds):
    """Loss over all training rows in eval mode, with the model's current interest clusters."""
    model.eval()
    with torch.no_grad():
        rows = ds.train
        return model.loss(*(torch.from_numpy(a) for a in (rows.histories, rows.lengths, rows.targets))).item()


def test_training_loss_falls_and_beats_popularity(ds):
    model = tiny_missrec(ds)
    model.discover_interests(generator=torch.Generator().manual_seed(0))
    before = evaluate(model, ds.valid)["all"]["ndcg@10"]
    untrained_loss = _train_loss(model, ds)
    result = fit(model, ds.train, ds.valid, FAST)
    losses = [h["loss"] for h in result.history]
    assert losses[-1] < losses[0]
    assert _train_loss(model, ds) < 0.85 * untrained_loss
    after = evaluate(model, ds.valid)["all"]["ndcg@10"]
    assert after > before
    assert after == pytest.approx(result.best_valid["ndcg@10"])  # best weights restored
    popular = evaluate(Popularity(item_popularity(ds.train, ds.num_items)), ds.valid)["all"]["ndcg@10"]
    assert after > popular


def test_training_is_deterministic_for_a_seed(ds):
    opts = TrainOptions(epochs=2, batch_size=128, progress=False)
    a = _epoch_losses(tiny_missrec(ds, seed=5), ds, opts)
    b = _epoch_losses(tiny_missrec(ds, seed=5), ds, opts)
    c = _epoch_losses(tiny_missrec(ds, seed=6), ds, TrainOptions(epochs=2, batch_size=128, progress=False, seed=1))
    assert a == b
    assert a != c


def test_sasrec_trains(ds):
    torch.manual_seed(0)
    model = SASRec(SASRecConfig(num_items=ds.num_items, hidden=32, ff_dim=48, dropout=0.1))
    losses = [h["loss"] for h in fit(model, ds.train, ds.valid, FAST).history]
    assert losses[-1] < losses[0]


def test_checkpoint_round_trip_gives_identical_scores(ds, tmp_path):
    model = tiny_missrec(ds, mode="transductive")
    fit(model, ds.train, ds.valid, TrainOptions(epochs=1, batch_size=128, progress=False))
    path = save_checkpoint(tmp_path / "run" / "checkpoint.pt", model, dataset={"fingerprint": ds.fingerprint})
    raw = torch.load(path, weights_only=True)  # no pickled objects inside
    assert raw["config"]["mode"] == "transductive" and "centroids" in raw["state_dict"]
    loaded = load_checkpoint(path)
    attach_features(loaded.model, ds, loaded.meta)
    items, lengths = torch.from_numpy(ds.test.histories), torch.from_numpy(ds.test.lengths)
    with torch.no_grad():
        assert torch.equal(model.eval().full_scores(items, lengths), loaded.model.full_scores(items, lengths))


def test_checkpoint_errors(ds, tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(bad)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")
    torch.save({"format": "something-else"}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="is not a missrec-checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
    other = tiny_dataset(tmp_path / "other", num_items=90)
    with pytest.raises(CheckpointError, match="item rows"):
        attach_features(tiny_missrec(ds), other)


def test_remove_items_compacts_histories_and_drops_rows():
    rows = Interactions.from_lists([0, 1, 2], [[1, 2, 3], [2], [4, 2, 5]], [4, 3, 2], max_len=5)
    drop = np.zeros(6, dtype=bool)
    drop[2] = True
    out = remove_items(rows, drop)
    # row 0: history 1 3 -> 4 ; row 1: empty history -> dropped ; row 2: target 2 is cold -> dropped
    assert out.users.tolist() == [0]
    assert out.histories[0, :3].tolist() == [1, 3, 0] and out.lengths.tolist() == [2]


def test_cold_split_never_trains_on_cold_items(ds):
    split = withhold_items(ds, 0.15, seed=0)
    assert split.cold.sum() == round(0.15 * (ds.num_items - 1)) and not split.cold[0]
    assert not split.cold[split.train.histories[split.train.histories > 0]].any()
    assert not split.cold[split.train.targets].any()
    assert not split.cold[split.valid.targets].any()
    assert not split.known[0] and (split.known[1:] == ~split.cold[1:]).all()


def test_item_drop_keeps_first_item_and_order():
    items = torch.tensor([[5, 6, 7, 8, 0], [9, 0, 0, 0, 0]])
    lengths = torch.tensor([4, 1])
    dropped, new_len = drop_items(items, lengths, keep_prob=0.5, generator=torch.Generator().manual_seed(0))
    for row in range(2):
        kept = dropped[row, : new_len[row]].tolist()
        assert kept[0] == items[row, 0]
        original = items[row, : lengths[row]].tolist()
        assert kept == [i for i in original if i in kept]  # a subsequence, order kept
        assert (dropped[row, new_len[row] :] == 0).all()


def test_augmented_tokens_keep_modalities_aligned(ds):
    """After item drop, every position's text AND image parts come from the same item."""
    model = tiny_missrec(ds)
    merged = merge_domains([ds])
    trainer = Pretrainer(model, merged, PretrainOptions(drop_prob=1.0))
    items = torch.from_numpy(ds.test.histories[:8, :10])
    lengths = torch.from_numpy(ds.test.lengths[:8]).clamp(max=10)
    tables = model.item_tables()
    tokens, aug_len, aug_items = trainer._augmented_tokens(items, lengths, tables, torch.Generator().manual_seed(1))
    adapted = model.adapted()
    expected = adapted["text"][aug_items] + adapted["image"][aug_items]
    valid = torch.arange(10)[None] < aug_len[:, None]
    assert torch.allclose(tokens[valid], expected[valid], atol=1e-6)


def test_pretrain_then_finetune_freezes_transformer(ds, tmp_path):
    other = tiny_dataset(tmp_path / "b", seed=11, num_items=80)
    model, history = pretrain([ds, other], PretrainOptions(epochs=3, batch_size=128, progress=False))
    assert model.cfg.num_items == ds.num_items + other.num_items - 1
    assert history[-1]["loss"] < history[0]["loss"]
    path = save_checkpoint(tmp_path / "pre.pt", model)
    fresh = build_missrec(ds)  # same (spec) sizes as the pre-trained model
    params = load_pretrained(fresh, path)
    assert torch.equal(fresh.position.weight, model.position.weight)
    assert not fresh.position.weight.requires_grad
    assert all(not p.requires_grad for p in fresh.encoder.parameters())
    assert fresh.alpha.requires_grad and any(p is fresh.alpha for p in params)


def test_chunked_batches_give_the_full_batch_gradient(ds):
    from missrec.data.batching import split_by_cost

    model = tiny_missrec(ds).eval()  # eval: no dropout, so both passes see the same function
    model.discover_interests(generator=torch.Generator().manual_seed(0))
    rows = np.arange(64)
    keys = model.batch_sort_keys(torch.from_numpy(ds.train.histories[rows])).numpy()
    rows = rows[np.argsort(keys, kind="stable")]
    keys = np.sort(keys, kind="stable")
    parts = split_by_cost(keys, budget=int(keys.max()) * 8)
    assert len(parts) > 2 and sum(p.stop - p.start for p in parts) == 64

    def grads(chunks):
        model.zero_grad()
        for part in chunks:
            idx = rows[part]
            longest = int(ds.train.lengths[idx].max())
            loss = model.loss(
                torch.from_numpy(ds.train.histories[idx, :longest]),
                torch.from_numpy(ds.train.lengths[idx]),
                torch.from_numpy(ds.train.targets[idx]),
                batch_size=64,
            )
            loss.backward()
        return [p.grad.clone() for p in model.parameters() if p.grad is not None]

    whole = grads([slice(0, 64)])
    chunked = grads(parts)
    assert all(torch.allclose(a, b, atol=1e-6, rtol=1e-4) for a, b in zip(whole, chunked, strict=True))


def test_split_by_cost_respects_the_budget():
    from missrec.data.batching import split_by_cost

    keys = np.array([1, 1, 2, 2, 3, 10, 50])
    parts = split_by_cost(keys, budget=8)
    assert [(p.start, p.stop) for p in parts] == [(0, 4), (4, 5), (5, 6), (6, 7)]
