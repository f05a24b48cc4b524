"""Small builders shared by tests (tiny models and datasets that train in seconds)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from missrec.data.dataset import SeqDataset, load_dataset
from missrec.data.synthetic import generate_synthetic
from missrec.models.missrec import MISSRec
from missrec.recipes.missrec import build_missrec


def tiny_dataset(root: Path, modalities: tuple[str, ...] = ("text", "image"), **kw) -> SeqDataset:
    """SYNTHETIC: 300 users, 120 items, 6 topics, 24-d text / 40-d image features (any width must work)."""
    args = dict(num_users=300, num_items=120, num_topics=6, text_dim=24, image_dim=40, seed=3) | kw
    generate_synthetic(root, modalities=modalities, **args)
    return load_dataset(root)


def tiny_missrec(ds: SeqDataset, mode: str = "inductive", seed: int = 0, **cfg) -> MISSRec:
    """A small MISSRec (hidden 32) for fast tests."""
    return build_missrec(ds, mode, seed, **({"hidden": 32, "ff_dim": 48, "dropout": 0.1} | cfg))


def drop_redis_keys(redis_url: str, prefix: str) -> None:
    """Delete every key under ``prefix:`` (test clean-up of a per-test or per-module key prefix)."""
    import redis

    client = redis.Redis.from_url(redis_url)
    keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()


def assert_checkpoint_round_trip(model, ds: SeqDataset, path: Path, kind: str, cls: type, width: int) -> dict:
    """Save ``model``, check the self-described kind, reload it with the features and compare full scores on a
    few test histories cut to ``width``; returns the raw checkpoint dict for further checks."""
    import torch

    from missrec.models.checkpoint import attach_features, load_checkpoint, save_checkpoint

    path = save_checkpoint(path, model)
    raw = torch.load(path, weights_only=True)
    assert raw["model_type"] == kind
    loaded = load_checkpoint(path)
    assert isinstance(loaded.model, cls) and loaded.model.cfg == model.cfg
    attach_features(loaded.model, ds, loaded.meta)
    items = torch.from_numpy(ds.test.histories[:6, :width])
    lengths = torch.from_numpy(ds.test.lengths[:6]).clamp(max=width)
    with torch.no_grad():
        assert torch.equal(model.eval().full_scores(items, lengths), loaded.model.full_scores(items, lengths))
    return raw


def withheld_outside(ds: SeqDataset, items, targets, n: int = 5) -> np.ndarray:
    """(N,) bool: ``n`` real items that appear nowhere in the batch (history or target), withheld."""
    present = set(items.flatten().tolist()) | set(targets.tolist())
    withheld = np.zeros(ds.num_items, dtype=bool)
    withheld[[i for i in range(1, ds.num_items) if i not in present][:n]] = True
    return withheld
