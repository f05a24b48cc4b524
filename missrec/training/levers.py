"""Training levers that leave the trained model in the spec's format (so export and serving are unchanged).

Feature normalisation: train the adapters on centred (or standardised) frozen features, then fold the affine
map into each adapter: A(z) = W (f - mu) / sigma + b = (W / sigma) f + (b - (W / sigma) mu). The checkpoint holds a
plain MISSRec that takes raw features; only the optimisation saw normalised inputs. Statistics come from the
items that exist at training time (withheld items excluded). "none" is the paper's behaviour.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from missrec.models.missrec import MISSRec

FEATURE_NORMS: tuple[str, ...] = ("none", "center", "standardize")


@dataclass(frozen=True)
class FeatureStats:
    """Per modality: mean (W,) and scale (W,) of the raw features (scale 1 for "center")."""

    mean: dict[str, np.ndarray]
    scale: dict[str, np.ndarray]


def feature_stats(features: dict[str, np.ndarray], known: np.ndarray | None, how: str) -> FeatureStats | None:
    """Statistics over the real (and known) item rows; None for "none". features[m]: (N, W), row 0 padding."""
    if how not in FEATURE_NORMS:
        raise ValueError(f"feature normalisation must be one of {FEATURE_NORMS}, got {how!r}")
    if how == "none":
        return None
    rows = np.arange(1, next(iter(features.values())).shape[0])
    if known is not None:
        rows = rows[np.asarray(known, dtype=bool)[1:]]
    mean, scale = {}, {}
    for m, f in features.items():
        mean[m] = f[rows].mean(axis=0)
        scale[m] = f[rows].std(axis=0) + 1e-6 if how == "standardize" else np.ones(f.shape[1], dtype=f.dtype)
    return FeatureStats(mean, scale)


def normalised(features: dict[str, np.ndarray], stats: FeatureStats) -> dict[str, torch.Tensor]:
    """(f - mean) / scale per modality (padding row kept at zero), as float32 tensors."""
    out = {}
    for m, f in features.items():
        z = ((f - stats.mean[m]) / stats.scale[m]).astype(np.float32)
        z[0] = 0.0
        out[m] = torch.from_numpy(z)
    return out


@torch.no_grad()
def fold_into_adapters(model: MISSRec, stats: FeatureStats) -> None:
    """Rewrite each adapter so that it takes raw features and computes what it computed on normalised ones."""
    for m, adapter in model.adapters.items():
        device = adapter.weight.device
        inv = torch.as_tensor(1.0 / stats.scale[m], dtype=torch.float32, device=device)
        mean = torch.as_tensor(stats.mean[m], dtype=torch.float32, device=device)
        adapter.weight.mul_(inv[None, :])  # W / sigma
        adapter.bias.sub_(adapter.weight @ mean)  # b - (W / sigma) mu
