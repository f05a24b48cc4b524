"""The exact top-k of a full scan that fits one chunk: every row's exact score is at hand, so the selection masks
dead and excluded rows in place and partially sorts all users at once (no candidate arrays, no set lookups). Also
the small helpers of serving_core.topk: per-user exclusions, the dead mask, a sorted best k.

Order: score descending, then row ascending; every tie at the k-th score is resolved by row over all the tied
rows, as :func:`serving_core.topk.top_k` promises (tests/serving_core/test_topk.py checks it against brute force).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np


def _sorted_best(rows: np.ndarray, scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Best k of 1-d (rows, scores) by score desc, then row asc, over every tie."""
    order = np.lexsort((rows, -scores))[:k]
    return rows[order], scores[order]


def scan_top_k(
    scores: np.ndarray, dead: np.ndarray, exclude: Sequence[np.ndarray], k: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """scores (G, N) exact scores of G users against rows 0..N-1; dead (N,) bool; exclude[g]: rows of user g ->
    per user (rows, scores) of its best min(k, valid) rows, best first."""
    scores = np.array(scores, dtype=np.float32, order="C")  # a copy: masked in place
    n = scores.shape[1]
    scores[:, dead[:n]] = -np.inf
    for g, e in enumerate(exclude):
        if e.shape[0]:
            scores[g, e[(e >= 0) & (e < n)]] = -np.inf
    k = min(k, n)
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k] if n > k else np.tile(np.arange(n), (scores.shape[0], 1))
    top_s = np.take_along_axis(scores, part, 1)
    ranked = np.lexsort((part, -top_s), axis=-1)
    top_s, top_i = np.take_along_axis(top_s, ranked, 1), np.take_along_axis(part, ranked, 1).astype(np.int64)
    kth = top_s[:, k - 1]
    tied = np.isfinite(kth) & ((scores >= kth[:, None]).sum(1) > k)  # a tie the partition may have cut
    out = []
    for g in range(scores.shape[0]):
        if tied[g]:
            rows = np.flatnonzero(scores[g] >= kth[g])
            out.append(_sorted_best(rows, scores[g, rows], k))
        else:
            m = int(np.isfinite(top_s[g]).sum())
            out.append((top_i[g, :m], top_s[g, :m]))
    return out


def _exclusions(exclude: Sequence[Iterable[int] | np.ndarray | None] | None, batch: int) -> list[np.ndarray]:
    if exclude is None:
        return [np.empty(0, np.int64)] * batch
    if len(exclude) != batch:
        raise ValueError(f"exclude has {len(exclude)} entries for {batch} users")
    out = []
    for e in exclude:
        if e is None:
            out.append(np.empty(0, np.int64))
        elif isinstance(e, np.ndarray):
            out.append(np.unique(e.astype(np.int64, copy=False)))
        else:
            out.append(np.unique(np.fromiter(e, dtype=np.int64)))
    return out


def _dead_mask(deleted: np.ndarray | Iterable[int] | None, n_items: int) -> np.ndarray:
    """(n_items,) bool: tombstoned rows and row 0 (padding). A shorter mask leaves newer rows alive."""
    dead = np.zeros(n_items, dtype=bool)
    if deleted is not None:
        if isinstance(deleted, np.ndarray) and deleted.dtype == bool:
            m = min(n_items, deleted.shape[0])
            dead[:m] = deleted[:m]
        else:
            rows = np.fromiter(deleted, dtype=np.int64) if not isinstance(deleted, np.ndarray) else deleted
            rows = rows.astype(np.int64, copy=False)
            dead[rows[(rows >= 0) & (rows < n_items)]] = True
    dead[0] = True
    return dead


def _top_sorted(ids: np.ndarray, scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Best k of 1-d (ids, scores) by score desc, then id asc (inputs already filtered to valid items)."""
    if ids.shape[0] > 4 * k:
        part = np.argpartition(-scores, k - 1)[:k]
        kth = scores[part].min()
        keep = scores >= kth  # keep every tie at the k-th score so the id tie-break is applied to all of them
        ids, scores = ids[keep], scores[keep]
    order = np.lexsort((ids, -scores))[:k]
    return ids[order], scores[order]
