"""Numpy twin of missrec.nn.fusion: fused item scores and explanation weights for serving (float32, no torch).

Spec section 5. For one user u and item i with unit modality vectors t_i, v_i:
    s_t = u . t_i, s_v = u . v_i,  w = softmax(alpha [s_t, s_v]),  s = w_t s_t + w_v s_v
    = m + (d/2) tanh(alpha d / 2)  with m = (s_t + s_v)/2, d = s_t - s_v    (the serving identity)
Item score: s (inductive), (u . e_i + 2 s) / 3 (transductive, e_i the unit ID vector), s_t (one modality).
tests/serving_core/test_fusion.py proves agreement with missrec.nn.fusion and MISSRec.score.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from serving_core.bundle import Fusion
from serving_core.compact import row_dots
from serving_core.rows import dot_rows


def _f32(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, dtype=np.float32)


def fuse(sims: np.ndarray, alpha: float) -> np.ndarray:
    """Softmax form. sims: (..., M) cosines per modality (M = 1 or 2) -> (...,) fused score."""
    sims = _f32(sims)
    if sims.shape[-1] == 1:
        return sims[..., 0]
    return (fusion_weights(sims, alpha) * sims).sum(axis=-1, dtype=np.float32)


def fuse_pair(s_t: np.ndarray, s_v: np.ndarray, alpha: float) -> np.ndarray:
    """Closed form (tanh identity) for two modalities given as equal-shape arrays (...,) -> (...,)."""
    s_t, s_v = _f32(s_t), _f32(s_v)
    mean = (s_t + s_v) * np.float32(0.5)
    half_diff = (s_t - s_v) * np.float32(0.5)
    return mean + half_diff * np.tanh(np.float32(alpha) * half_diff)


def fuse_sims(sims: Sequence[np.ndarray], alpha: float) -> np.ndarray:
    """Fused score from a list of per-modality cosine arrays of equal shape (one or two modalities)."""
    if len(sims) == 2:
        return fuse_pair(sims[0], sims[1], alpha)
    if len(sims) == 1:
        return _f32(sims[0])
    raise ValueError(f"MISSRec fuses one or two modalities, got {len(sims)}")


def fusion_weights(sims: np.ndarray, alpha: float) -> np.ndarray:
    """Softmax weights (..., M) behind a fused score, from cosines (..., M): the per-item explanation."""
    logits = np.float32(alpha) * _f32(sims)
    logits = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(logits)
    return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)


def modality_sims(
    users: np.ndarray, vectors: Mapping[str, np.ndarray], fusion: Fusion, items: np.ndarray | None = None
) -> list[np.ndarray]:
    """Per-modality cosines, in fusion.modalities order.

    users: (B, D); vectors[m]: (N, D) unit rows. items None -> each (B, N); items (B, C) int row ids -> each (B, C).
    """
    return [_dots(users, vectors[m], items) for m in fusion.modalities]


def _dots(users: np.ndarray, table: np.ndarray, items: np.ndarray | None) -> np.ndarray:
    users = _f32(users)
    if items is None:
        return dot_rows(users, table)  # (B, N)
    return row_dots(users, table[items])  # (B, C, D) -> (B, C), each row independent of the others


def score_from_sims(sims: Sequence[np.ndarray], fusion: Fusion, id_sim: np.ndarray | None = None) -> np.ndarray:
    """Item score from per-modality cosines (and the ID cosine u . e_i in transductive mode), any equal shapes."""
    s = fuse_sims(sims, fusion.alpha)
    if fusion.transductive:
        if id_sim is None:
            raise ValueError("transductive fusion needs the ID cosines u . e_i")
        s = (_f32(id_sim) + np.float32(2.0) * s) / np.float32(3.0)
    return s


def item_scores(
    users: np.ndarray,
    vectors: Mapping[str, np.ndarray],
    fusion: Fusion,
    id_vectors: np.ndarray | None = None,
    items: np.ndarray | None = None,
) -> np.ndarray:
    """Exact fused scores: users (B, D) against every item -> (B, N), or against items (B, C) -> (B, C). float32.

    The twin of MISSRec.score (no padding mask: callers exclude row 0 themselves).
    """
    sims = modality_sims(users, vectors, fusion, items)
    id_sim = None
    if fusion.transductive:
        if id_vectors is None:
            raise ValueError("transductive fusion needs id_vectors")
        id_sim = _dots(users, id_vectors, items)
    return score_from_sims(sims, fusion, id_sim)


def explanation_weights(
    users: np.ndarray, vectors: Mapping[str, np.ndarray], fusion: Fusion, items: np.ndarray | None = None
) -> np.ndarray:
    """Per-item modality weights (e.g. text/image weight): (B, C, M) for users (B, D) and items (B, C) rows of
    vectors[m] (N, D), or (B, N, M) for every row when items is None (pass pre-gathered rows as vectors).

    Order of the last axis: fusion.modalities; with one modality every weight is 1.
    """
    sims = np.stack(modality_sims(users, vectors, fusion, items), axis=-1)  # (B, C, M)
    return fusion_weights(sims, fusion.alpha)


def deviation_bound(fusion: Fusion, max_gap: float = 2.0, user_norm: float = 1.0) -> float:
    """Upper bound on |score_i - u . static_i| over items with ||t_i - v_i|| <= max_gap, for ||u|| = user_norm.

    |s - m| = (|d|/2) tanh(|alpha| |d|/2) grows with |d| = |u . (t_i - v_i)| <= user_norm * max_gap, so the bound
    is c * (x/2) tanh(|alpha| x/2) with x = user_norm * max_gap. For unit vectors (max_gap 2, user_norm 1) this is
    Fusion.bound = c tanh(|alpha|); a smaller measured max_gap (see :func:`max_modality_gap`) gives a tighter one.
    """
    x = user_norm * max_gap
    return fusion.rescore_weight * (x / 2.0) * math.tanh(abs(fusion.alpha) * x / 2.0)


def max_modality_gap(vectors: Mapping[str, np.ndarray], fusion: Fusion, chunk: int = 65536) -> float:
    """max_i ||t_i - v_i|| over all rows (2.0 for one modality: unused then since c = 0). vectors[m]: (N, D)."""
    if len(fusion.modalities) < 2:
        return 2.0
    a, b = (vectors[m] for m in fusion.modalities)
    best = 0.0
    for start in range(0, a.shape[0], chunk):
        diff = a[start : start + chunk].astype(np.float64) - b[start : start + chunk]
        best = max(best, float(np.sqrt((diff * diff).sum(axis=1)).max(initial=0.0)))
    return best
