"""Parity checks run as part of export: ONNX Runtime against the PyTorch model, failing with :class:`ExportError`.

User tower at history lengths PARITY_LENGTHS x batches PARITY_BATCHES (random histories of real items, with their
real tokens and interest centroids); :class:`serving_core.towers.UserTower` end to end (numpy interest ids + ONNX)
against ``model.encode`` on real histories; the item tower against the model's adapters and the nearest-centroid
rule of :func:`missrec.interests.assign_nearest`. Every check returns the max abs difference it measured.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import torch
import torch.nn.functional as F

from missrec.interests import assign_in_batches
from missrec.model import MISSRec
from serving_core.towers import (
    ITEM_TOKENS,
    USER_OUTPUT,
    UserTower,
    cluster_output,
    feature_input,
    item_tower_outputs,
)

PARITY_ATOL = 1e-4
PARITY_LENGTHS = (1, 7, 50)
PARITY_BATCHES = (1, 16)
PARITY_ITEMS = 4096  # item-tower parity rows (real items, in order)
PARITY_USERS = 256  # real histories for the end-to-end user-tower check


class ExportError(RuntimeError):
    """The model cannot be exported, or the exported graphs do not reproduce it."""


def max_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    diff = np.abs(a.astype(np.float64) - b.astype(np.float64))
    return float("inf") if not np.isfinite(diff).all() else float(diff.max(initial=0.0))


def require_parity(name: str, diff: float) -> float:
    if not diff <= PARITY_ATOL:
        raise ExportError(f"ONNX Runtime and PyTorch disagree on {name}: max abs diff {diff:.3g} > {PARITY_ATOL}")
    return diff


def random_histories(rng: np.random.Generator, batch: int, length: int, num_items: int) -> np.ndarray:
    """(batch, length) random real item ids; row 0 is full, the others have random lengths, 0-padded."""
    items = rng.integers(1, num_items, size=(batch, length))
    lengths = np.concatenate([[length], rng.integers(1, length + 1, size=batch - 1)])
    items[np.arange(length)[None, :] >= lengths[:, None]] = 0
    return items


@torch.no_grad()
def check_user_parity(model: MISSRec, session: ort.InferenceSession, seed: int = 0) -> float:
    """Max |ORT - torch| of the user vector over lengths PARITY_LENGTHS x batches PARITY_BATCHES (random
    histories of real items, their real interest tokens); raises ExportError above PARITY_ATOL."""
    rng = np.random.default_rng(seed)
    tokens = model.item_tables().tokens
    worst = 0.0
    for length in sorted({min(n, model.cfg.max_len) for n in PARITY_LENGTHS}):
        for batch in PARITY_BATCHES:
            items = torch.from_numpy(random_histories(rng, batch, length, model.cfg.num_items))
            lengths = (items > 0).sum(dim=1)
            ids = model.interest_ids(items)
            feeds = {
                "tokens": tokens[items],
                "lengths": lengths,
                "interests": model.centroids[ids],
                "interest_lengths": (ids > 0).sum(dim=1).clamp(min=1),
            }
            expected = model.user_tower(*feeds.values())[0].numpy()
            got = session.run([USER_OUTPUT], {k: v.numpy() for k, v in feeds.items()})[0]
            diff = require_parity(f"the user vector (length {length}, batch {batch})", max_abs_diff(got, expected))
            worst = max(worst, diff)
    return worst


@torch.no_grad()
def check_encode_parity(model: MISSRec, tower: UserTower, histories: np.ndarray, lengths: np.ndarray) -> float:
    """UserTower.encode (numpy interest ids + ORT) vs model.encode on real histories (R, L) with lengths (R,)."""
    expected = model.encode(torch.from_numpy(histories), torch.from_numpy(lengths))[0].numpy()
    got = tower.encode([h[:n] for h, n in zip(histories, lengths, strict=True)])
    return require_parity("UserTower.encode vs model.encode", max_abs_diff(got, expected))


@torch.no_grad()
def check_item_parity(
    model: MISSRec, session: ort.InferenceSession, features: dict[str, np.ndarray]
) -> dict[str, float | int]:
    """Item tower on ``features`` (modality -> (B, F_m)) vs the model's adapters and ``assign_nearest`` rule.

    Vectors must agree within PARITY_ATOL; cluster ids must be identical except at exact-arithmetic ties (the
    two candidate centroids' distances within 1e-5 relative), which are counted, not failed."""
    modalities = model.cfg.modalities
    feeds = {feature_input(m): np.ascontiguousarray(features[m], dtype=np.float32) for m in modalities}
    got = dict(zip(item_tower_outputs(modalities), session.run(None, feeds), strict=True))
    centroids = model.centroids[1:]
    adapted = {m: model.adapters[m](torch.from_numpy(feeds[feature_input(m)])) for m in modalities}
    worst = max_abs_diff(got[ITEM_TOKENS], torch.stack(list(adapted.values())).sum(dim=0).numpy())
    ties = 0
    for m, a in adapted.items():
        worst = max(worst, max_abs_diff(got[m], F.normalize(a, dim=-1).numpy()))
        expected = assign_in_batches(a, centroids) + 1
        onnx_ids = torch.from_numpy(got[cluster_output(m)])
        differ = torch.nonzero(onnx_ids != expected).squeeze(1)
        if differ.numel():
            dist = torch.cdist(a[differ].double(), centroids.double()) ** 2  # (n, K)
            picked = dist.gather(1, onnx_ids[differ, None] - 1).squeeze(1)
            best = dist.gather(1, expected[differ, None] - 1).squeeze(1)
            if not torch.all(picked - best <= 1e-5 * best.abs().clamp(min=1.0)):
                raise ExportError(f"item tower assigns {differ.numel()} {m} vectors to a different interest cluster")
            ties += differ.numel()
    return {"item_max_abs_diff": require_parity("the item tower outputs", worst), "item_cluster_ties": ties}


@torch.no_grad()
def stored_cluster_agreement(model: MISSRec, rows: slice) -> float:
    """Fraction of (item, modality) pairs in ``rows`` whose stored cluster lookup is still the nearest centroid.

    The lookups are refreshed at the start of each epoch and the adapters move during it, so a trained model's
    stored clusters lag its adapters a little. Serving uses the stored lookups for known items (as the model does)
    and the nearest-centroid rule only for new items; this number says how often the two differ. Diagnostic only.
    """
    adapted = model.adapted()
    same = [
        (assign_in_batches(a[rows], model.centroids[1:]) + 1 == getattr(model, f"{m}_cluster")[rows]).double().mean()
        for m, a in adapted.items()
    ]
    return round(float(torch.stack(same).mean()), 4)
