"""Sampled softmax (missrec.training.sampled) and the bounded whole-catalogue work, on tiny SYNTHETIC data."""

import numpy as np
import pytest
import torch

from missrec.evaluation import metrics
from missrec.evaluation.cold import withhold_items
from missrec.evaluation.metrics import compute_ranks
from missrec.models.sasrec import SASRec, SASRecConfig
from missrec.nn import interests
from missrec.nn.protocol import banned_items
from missrec.recipes.mmsrec import build_mmsrec
from missrec.recipes.msm4sr import build_msm4sr
from missrec.training.loop import TrainOptions, fit, training_loss
from missrec.training.sampled import (
    DEFAULT_NEGATIVES,
    FULL_SOFTMAX_MAX_ITEMS,
    Candidates,
    NegativeSampler,
    make_sampler,
    resolve_negatives,
)
from tests.helpers import tiny_dataset, tiny_missrec


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    return tiny_dataset(tmp_path_factory.mktemp("tiny"))


def _sasrec(ds, seed=0):
    torch.manual_seed(seed)
    return SASRec(SASRecConfig(num_items=ds.num_items, hidden=32, ff_dim=48, dropout=0.1))


FAMILIES = {
    "missrec": tiny_missrec,
    "msm4sr": lambda ds: build_msm4sr(ds, hidden=16, ff_dim=32),
    "mmsrec": lambda ds: build_mmsrec(ds, hidden=16, ff_dim=32, n_heads=2, dropout=0.1),
    "sasrec": _sasrec,
}


def test_negatives_default_from_catalogue_size():
    assert resolve_negatives(FULL_SOFTMAX_MAX_ITEMS + 1, None) == 0  # N counts the padding row
    assert resolve_negatives(FULL_SOFTMAX_MAX_ITEMS + 2, None) == DEFAULT_NEGATIVES
    assert resolve_negatives(10**6, 0) == 0 and resolve_negatives(100, 16) == 16
    with pytest.raises(ValueError):
        resolve_negatives(100, -1)
    with pytest.raises(ValueError):
        NegativeSampler(np.ones(5, bool), np.ones(5), 4, "zipf")


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family_trains_with_sampled_softmax(ds, family):
    opts = TrainOptions(epochs=4, batch_size=64, patience=4, progress=False, lr=3e-3, negatives=32)
    result = fit(FAMILIES[family](ds), ds.train, ds.valid, opts)
    losses = [h["loss"] for h in result.history]
    assert losses[-1] < losses[0]
    again = fit(FAMILIES[family](ds), ds.train, ds.valid, opts)  # deterministic for a seed
    assert [h["loss"] for h in again.history] == losses


def test_full_softmax_is_the_default_and_unchanged_for_small_catalogues(ds):
    model = _sasrec(ds)
    assert make_sampler(model, ds.train.targets, None, None, "mixed", 0) is None
    base = TrainOptions(epochs=2, batch_size=64, progress=False)
    explicit = TrainOptions(epochs=2, batch_size=64, progress=False, negatives=0)
    assert fit(_sasrec(ds), ds.train, ds.valid, base).history == fit(_sasrec(ds), ds.train, ds.valid, explicit).history


@pytest.mark.parametrize("sampler", ["uniform", "mixed"])
def test_withheld_items_are_never_drawn(ds, sampler):
    split = withhold_items(ds, 0.3, seed=1)
    banned = banned_items(ds.num_items, split.cold)
    draw = make_sampler(_sasrec(ds), split.train.targets, banned, 256, sampler, 0)
    for _ in range(20):
        cands = draw.draw(torch.from_numpy(split.train.targets[:64]))
        assert not banned[cands.ids].any()
        assert torch.equal(cands.ids, torch.unique(cands.ids))


def test_a_withheld_candidate_gets_no_gradient(ds):
    """Even if a withheld item reaches the candidates (a masked-item model's row items), its column is masked."""
    model = _sasrec(ds)
    split = withhold_items(ds, 0.3, seed=1)
    banned = banned_items(ds.num_items, split.cold)
    cold = int(np.flatnonzero(split.cold)[0])
    rows = split.train.subset(np.arange(32))
    ids = torch.unique(torch.cat([torch.from_numpy(rows.targets), torch.tensor([cold, 1, 2, 3])]))
    cands = Candidates(ids=ids, log_q=torch.zeros(len(ids)))
    items, lengths, targets = (torch.from_numpy(a) for a in (rows.histories, rows.lengths, rows.targets))
    loss = training_loss(model, items, lengths, targets, len(rows), banned, candidates=cands)
    loss.backward()
    grad = model.item_emb.weight.grad
    assert torch.isfinite(loss) and grad[cold].abs().sum() == 0
    assert grad[ids[~banned[ids]]].abs().sum(dim=1).gt(0).all()  # every allowed candidate is a negative


def test_log_q_is_the_expected_number_of_draws():
    allowed = np.array([False, True, True, True, False])
    sampler = NegativeSampler(allowed, np.array([0, 3, 1, 0, 5.0]), negatives=8, sampler="uniform")
    cands = sampler.draw(torch.tensor([1, 1, 1, 2]))  # in-batch items drawn by label popularity
    expected = {1: 4 * 3 / 4 + 8 / 3, 2: 4 * 1 / 4 + 8 / 3, 3: 8 / 3}
    for item, log_q in zip(cands.ids.tolist(), cands.log_q.tolist(), strict=True):
        assert item != 4
        assert log_q == pytest.approx(np.log(expected[item]), rel=1e-6)


def test_history_is_left_out_of_the_sampled_softmax_when_asked(ds):
    model = _sasrec(ds)
    rows = ds.train.subset(np.arange(16))
    items, lengths, targets = (torch.from_numpy(a) for a in (rows.histories, rows.lengths, rows.targets))
    ids = torch.arange(ds.num_items)
    cands = Candidates(ids=ids, log_q=torch.zeros(len(ids)))
    for exclude in (False, True):  # with every item a candidate and log Q = 0 it is the full softmax
        torch.manual_seed(0)
        sampled = training_loss(model.eval(), items, lengths, targets, 16, None, exclude, candidates=cands)
        torch.manual_seed(0)
        full = training_loss(model.eval(), items, lengths, targets, 16, None, exclude)
        assert sampled.item() == pytest.approx(full.item(), rel=1e-5)


def test_bounded_ranking_gives_the_same_ranks(ds, monkeypatch):
    model = tiny_missrec(ds)
    model.discover_interests(generator=torch.Generator().manual_seed(0))
    whole = compute_ranks(model, ds.valid)
    monkeypatch.setattr(metrics, "SCORE_BUDGET", 3 * ds.num_items)  # 3 rows at a time
    chunked = compute_ranks(model, ds.valid)
    for protocol in whole:
        np.testing.assert_array_equal(whole[protocol], chunked[protocol])


def test_large_catalogue_interest_discovery_is_capped_and_assigns_every_item(ds, monkeypatch):
    monkeypatch.setattr(interests, "LARGE_CLUSTERING", 10)
    monkeypatch.setattr("missrec.models.missrec.is_large", interests.is_large)
    monkeypatch.setattr("missrec.models.missrec.LARGE_MAX_INTERESTS", 8)
    model = tiny_missrec(ds)
    split = withhold_items(ds, 0.3, seed=1)
    k = model.discover_interests(torch.from_numpy(split.known), torch.Generator().manual_seed(0))
    assert k == 8 and model.centroids.shape[0] == 9
    for m in model.cfg.modalities:
        clusters = getattr(model, f"{m}_cluster")
        assert clusters[0] == 0 and clusters[1:].min() >= 1 and clusters.max() <= 8


def test_the_exact_kmeans_runs_only_while_it_costs_less_than_the_bounded_path():
    # two modalities at interest ratio 0.5: M = 2N vectors into K = N centres
    assert not interests.is_large(2 * 1585, 1585) and not interests.is_large(2 * 4385, 4385)  # the real datasets
    assert not interests.is_large(2 * 16000, 16000)
    assert interests.is_large(2 * 17000, 17000) and interests.is_large(2 * 100_000, 100_000)
    assert interests.is_large(interests.LARGE_CLUSTERING + 1)  # by size alone, whatever K


def test_a_quadratic_exact_kmeans_takes_the_bounded_path(ds, monkeypatch):
    monkeypatch.setattr(interests, "LARGE_MAX_INTERESTS", 8)  # bounded work 8 x 8 x 2 = 128 distances per pass
    monkeypatch.setattr(interests, "POINTS_PER_CENTROID", 2)
    monkeypatch.setattr("missrec.models.missrec.LARGE_MAX_INTERESTS", 8)
    model = tiny_missrec(ds)
    assert 2 * ds.num_items <= interests.LARGE_CLUSTERING  # not large by size: by the exact path's cost
    k = model.discover_interests(None, torch.Generator().manual_seed(0))
    assert k == 8 and model.centroids.shape[0] == 9
    for m in model.cfg.modalities:
        clusters = getattr(model, f"{m}_cluster")
        assert clusters[0] == 0 and clusters[1:].min() >= 1 and clusters.max() <= 8
