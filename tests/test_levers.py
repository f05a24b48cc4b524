"""Levers that keep the spec's checkpoint format: folding feature normalisation back into the adapters."""

import numpy as np
import pytest
import torch

from missrec.levers import feature_stats, fold_into_adapters, normalised
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
