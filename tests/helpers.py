"""Small builders shared by tests (tiny models and datasets that train in seconds)."""

from __future__ import annotations

from pathlib import Path

import torch

from missrec.checkpoint import attach_features
from missrec.config import MISSRecConfig
from missrec.data import SeqDataset, load_dataset
from missrec.model import MISSRec
from missrec.synthetic import generate_synthetic


def tiny_dataset(root: Path, modalities: tuple[str, ...] = ("text", "image"), **kw) -> SeqDataset:
    """SYNTHETIC: 300 users, 120 items, 6 topics, 24-d text / 40-d image features (any width must work)."""
    args = dict(num_users=300, num_items=120, num_topics=6, text_dim=24, image_dim=40, seed=3) | kw
    generate_synthetic(root, modalities=modalities, **args)
    return load_dataset(root)


def tiny_missrec(ds: SeqDataset, mode: str = "inductive", seed: int = 0, **cfg) -> MISSRec:
    torch.manual_seed(seed)
    config = MISSRecConfig(
        num_items=ds.num_items,
        text_dim=ds.features["text"].shape[1] if "text" in ds.features else 0,
        image_dim=ds.features["image"].shape[1] if "image" in ds.features else 0,
        mode=mode,
        hidden=32,
        ff_dim=48,
        dropout=0.1,
        **cfg,
    )
    model = MISSRec(config)
    attach_features(model, ds)
    return model
