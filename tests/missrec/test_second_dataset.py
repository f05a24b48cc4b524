"""The second real dataset (../shared/data/scientific-full: text only, 384-d all-MiniLM-L6-v2 features, 4,385
items): every feature model builds from the data's own modalities and widths and trains a step on real rows.
Training, export and serving on it with the usual commands: docs/results.md."""

import numpy as np
import pytest
import torch

from missrec.data.dataset import load_dataset
from missrec.families import family


@pytest.fixture(scope="module")
def full(scientific_full_dir):
    return load_dataset(scientific_full_dir)


def test_the_dataset_is_text_only_at_its_own_width(full):
    assert set(full.features) == {"text"} and full.features["text"].shape == (full.num_items, 384)
    norms = np.linalg.norm(full.features["text"][1:], axis=1)
    assert np.allclose(norms, 1.0, atol=1e-4)  # MiniLM ends in a normalisation layer (the data's README)


@pytest.mark.parametrize(
    ("name", "builder", "kwargs"),
    [
        ("missrec", "build_missrec", {"mode": "inductive"}),
        ("missrec", "build_missrec", {"mode": "transductive", "id_dropout": 0.5}),
        ("msm4sr", "build_msm4sr", {"mode": "inductive"}),
        ("mmsrec", "build_mmsrec", {"hidden": 64, "n_heads": 2, "ff_dim": 128}),
    ],
)
def test_every_feature_model_trains_a_step_on_it(full, name, builder, kwargs):
    model = getattr(family(name).recipe(), builder)(full, **kwargs)
    assert model.cfg.modalities == ("text",) and model.cfg.text_dim == 384 and model.cfg.image_dim == 0
    rows = full.train.subset(np.arange(16))
    items, lengths = torch.from_numpy(rows.histories), torch.from_numpy(rows.lengths)
    loss = model.loss(items, lengths, torch.from_numpy(rows.targets))
    loss.backward()
    assert torch.isfinite(loss)
    model.eval()
    with torch.no_grad():
        scores = model.full_scores(items, lengths)
    assert scores.shape == (16, full.num_items) and torch.isfinite(scores[:, 1:]).all()
