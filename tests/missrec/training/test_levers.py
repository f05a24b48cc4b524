"""Levers that keep the spec's checkpoint format: folding feature normalisation back into the adapters."""

import numpy as np
import pytest
import torch

from missrec.training.levers import feature_stats, fold_into_adapters, normalised
from tests.helpers import tiny_dataset, tiny_missrec


@pytest.mark.parametrize("how", ["center", "standardize"])
def test_folded_adapters_on_raw_features_equal_the_trained_ones_on_normalised(tmp_path, how):
    ds = tiny_dataset(tmp_path, num_users=60, num_items=40, num_topics=4)
    known = np.ones(ds.num_items, dtype=bool)
    known[[0, 3, 7]] = False
    stats = feature_stats(ds.features, known, how)
    z = normalised(ds.features, stats)
    assert abs(float(z["text"][1:][known[1:]].mean())) < 1e-4
    model = tiny_missrec(ds)
    model.set_item_features(z)
    with torch.no_grad():
        trained = {m: a.clone() for m, a in model.adapted().items()}
    fold_into_adapters(model, stats)
    model.set_item_features({m: torch.from_numpy(f) for m, f in ds.features.items()})
    with torch.no_grad():
        for m, a in model.adapted().items():
            assert torch.allclose(a[1:], trained[m][1:], atol=1e-4)
    assert feature_stats(ds.features, None, "none") is None
    with pytest.raises(ValueError, match="feature normalisation"):
        feature_stats(ds.features, None, "whiten")


def test_logit_adjustment_prior_and_loss(tmp_path):
    """The prior is log of the smoothed training popularity; adding it changes the loss, and it is off at 0."""
    from missrec.models.popularity import item_popularity
    from missrec.training.loop import training_log_prior, training_loss

    ds = tiny_dataset(tmp_path, num_users=60, num_items=40, num_topics=4)
    model = tiny_missrec(ds)
    assert training_log_prior(model, ds.train, 0.0, torch.device("cpu")) is None
    prior = training_log_prior(model, ds.train, 1.0, torch.device("cpu"))
    counts = item_popularity(ds.train, ds.num_items) + 1.0
    np.testing.assert_allclose(prior.numpy(), np.log(counts / counts.sum()), rtol=1e-5)
    assert prior.shape == (ds.num_items,) and float(prior.exp().sum()) == pytest.approx(1.0, abs=1e-5)
    rows = slice(0, 16)
    items = torch.from_numpy(ds.train.histories[rows])
    lengths, targets = torch.from_numpy(ds.train.lengths[rows]), torch.from_numpy(ds.train.targets[rows])
    model.eval()
    with torch.no_grad():
        model.on_epoch_start(None, torch.Generator().manual_seed(0))
        plain = training_loss(model, items, lengths, targets, 16, None)
        adjusted = training_loss(model, items, lengths, targets, 16, None, log_prior=prior)
        again = training_loss(model, items, lengths, targets, 16, None, log_prior=torch.zeros_like(prior))
    assert float(again) == pytest.approx(float(plain), rel=1e-6)  # a zero prior is the paper's loss
    assert abs(float(adjusted) - float(plain)) > 1e-3


def test_logit_adjustment_trains_and_lifts_rare_items(tmp_path):
    """Trained with the adjustment, the served (plain) scores rank rare items higher than the paper's loss does."""
    from missrec.models.popularity import item_popularity
    from missrec.training.loop import TrainOptions, fit

    ds = tiny_dataset(tmp_path, num_users=200, num_items=60, num_topics=4)
    counts = item_popularity(ds.train, ds.num_items)
    rare = np.flatnonzero((counts > 0) & (counts <= np.quantile(counts[1:], 0.25)))
    mean_rank = {}
    for scale in (0.0, 1.0):
        model = tiny_missrec(ds)
        opts = TrainOptions(epochs=6, patience=6, seed=0, progress=False, logit_adjust=scale)
        fit(model, ds.train, ds.valid, opts)
        with torch.no_grad():
            scores = model.full_scores(torch.from_numpy(ds.test.histories), torch.from_numpy(ds.test.lengths))
        scores[:, 0] = -torch.inf
        ranks = (-scores).argsort(dim=1).argsort(dim=1).float()  # 0 = best
        mean_rank[scale] = float(ranks[:, rare].mean())
    assert mean_rank[1.0] < mean_rank[0.0], mean_rank
