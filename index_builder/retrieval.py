"""Exact fused top-k: ANN/flat candidates by static score, exact re-scoring, widening until the spec's bound proves it.

Spec section 5 and index_builder/bundle.py: for a user u, score_i = u . static_i + c (s_i - m_i) with
|c (s_i - m_i)| <= bound. The index ranks items by u . static_i; exact re-scoring of the retrieved candidates plus
the bound tells when no item outside the candidates can enter the top-k. Pure functions over arrays passed in
(the item table may grow between calls: nothing about sizes is cached).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from index_builder.bundle import Fusion
from index_builder.fusion import deviation_bound, explanation_weights, item_scores

DEFAULT_TOL = 1e-4  # > float32 rounding of two 300-d unit inner products (static via FAISS, exact via numpy)
GPU_MAX_K = 2048  # FAISS GPU indexes refuse larger k
_GATHER_BUDGET = 1 << 16  # candidate rows gathered per re-scoring chunk (x D x 4 bytes per modality)


@dataclass(frozen=True)
class TopK:
    """Result of :func:`fused_topk` for B users.

    ids: (B, k) int64 item rows (= internal ids = FAISS ids), best first, -1 padding when fewer valid items exist;
    scores: (B, k) float32 exact fused scores, descending (ties: lower id first), -inf padding;
    counts: (B,) number of real results; candidates: (B,) items exactly scored in the final round per user
    (the whole table for a full scan); user_exact: (B,) True when the result is proven equal to brute force;
    weights: (B, k, M) modality weights in fusion.modalities order (explanations), NaN padding, or None.
    """

    ids: np.ndarray
    scores: np.ndarray
    counts: np.ndarray
    candidates: np.ndarray
    user_exact: np.ndarray
    weights: np.ndarray | None = None

    @property
    def exact(self) -> bool:
        """True when every user's top-k is proven identical to brute-force scoring of the whole table."""
        return bool(self.user_exact.all())

    def row(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids, scores) of user b without padding."""
        n = int(self.counts[b])
        return self.ids[b, :n], self.scores[b, :n]


def is_exact_index(index: Any) -> bool:
    """True for indexes whose search returns the true top-k by inner product (flat, CPU or GPU); None = no index."""
    if index is None:
        return True
    import faiss

    idx = faiss.downcast_index(index)
    flat: tuple[type, ...] = (faiss.IndexFlat,)
    if hasattr(faiss, "GpuIndexFlat"):
        flat += (faiss.GpuIndexFlat,)
    return isinstance(idx, flat) and idx.metric_type == faiss.METRIC_INNER_PRODUCT


def _search_limit(index: Any) -> int:
    """Largest k one search may ask for."""
    return GPU_MAX_K if type(index).__name__.startswith("Gpu") else int(index.ntotal)


def _flat_matrix(index: Any) -> np.ndarray | None:
    """(ntotal, D) zero-copy view of a CPU flat index's vectors (valid until the index changes), else None."""
    import faiss

    idx = faiss.downcast_index(index)
    if not isinstance(idx, faiss.IndexFlat) or idx.metric_type != faiss.METRIC_INNER_PRODUCT:
        return None
    return faiss.rev_swig_ptr(idx.get_xb(), idx.ntotal * idx.d).reshape(idx.ntotal, idx.d)


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


def _rescore(
    users: np.ndarray,
    cand: np.ndarray,
    vectors: Mapping[str, np.ndarray],
    fusion: Fusion,
    id_vectors: np.ndarray | None,
) -> np.ndarray:
    """Exact scores (G, C) of candidates cand (G, C) (-1 entries scored as row 0), chunked over users."""
    safe = np.where(cand < 0, 0, cand)
    out = np.empty(cand.shape, dtype=np.float32)
    step = max(1, _GATHER_BUDGET // max(1, cand.shape[1]))
    for s in range(0, cand.shape[0], step):
        out[s : s + step] = item_scores(users[s : s + step], vectors, fusion, id_vectors, safe[s : s + step])
    return out


def _full_scan(
    users: np.ndarray,
    k: int,
    vectors: Mapping[str, np.ndarray],
    fusion: Fusion,
    id_vectors: np.ndarray | None,
    dead: np.ndarray,
    excl: list[np.ndarray],
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Brute-force exact top-k over every row for users (G, D), in item chunks; one (ids, scores) per user."""
    n_items = dead.shape[0]
    chunk = max(4096, (1 << 22) // max(1, users.shape[0]))
    best: list[tuple[np.ndarray, np.ndarray]] = [(np.empty(0, np.int64), np.empty(0, np.float32))] * users.shape[0]
    for start in range(0, n_items, chunk):
        stop = min(n_items, start + chunk)
        part = {m: vectors[m][start:stop] for m in fusion.modalities}
        ids_part = None if id_vectors is None else id_vectors[start:stop]
        scores = item_scores(users, part, fusion, ids_part)  # (G, chunk)
        alive = ~dead[start:stop]
        rows = np.arange(start, stop, dtype=np.int64)
        for g in range(users.shape[0]):
            ok = alive.copy()
            e = excl[g]
            e = e[(e >= start) & (e < stop)]
            ok[e - start] = False
            ids = np.concatenate([best[g][0], rows[ok]])
            sc = np.concatenate([best[g][1], scores[g][ok]])
            best[g] = _top_sorted(ids, sc, k) if ids.shape[0] else (ids, sc)
    return best


def fused_topk(
    user_vectors: np.ndarray,
    k: int,
    index: Any,
    vectors: Mapping[str, np.ndarray],
    fusion: Fusion,
    *,
    id_vectors: np.ndarray | None = None,
    exclude: Sequence[Iterable[int] | np.ndarray | None] | None = None,
    deleted: np.ndarray | Iterable[int] | None = None,
    exact_index: bool | None = None,
    explain: bool = False,
    initial_width: int | None = None,
    growth: int | None = None,
    max_candidates: int | None = None,
    max_gap: float = 2.0,
    tol: float = DEFAULT_TOL,
    full_scan_fraction: float = 0.25,
    one_pass: bool = True,
) -> TopK:
    """Top-k items by exact fused score for each user, excluding row 0, deleted rows and per-user excludes.

    user_vectors: (B, D) float32 (unit vectors from the user tower); index: FAISS inner-product index over the
    static vectors with FAISS id = item row (row 0 included and never returned), or None (brute force);
    vectors[m]: (N, D) unit modality vectors, id_vectors: (N, D) (transductive), N >= index.ntotal: rows past
    index.ntotal (items appended since the index was last extended) are always re-scored exactly;
    exclude: one collection of item rows per user or None; deleted: (N',) bool mask (rows past N' alive) or rows.

    Algorithm, per user: search the index for the top-w rows by static score u . static_i (w starts at
    initial_width + the user's exclusion count, a power of two; default initial_width = max(2k, 32)), re-score
    them exactly (index_builder.fusion.item_scores), and stop when the k-th best valid exact score
    >= (smallest static score retrieved) + bound + tol, where bound = deviation_bound(fusion, max_gap, ||u||)
    (= fusion.bound for unit vectors and max_gap = 2). Otherwise multiply w by growth (default 4 for ANN indexes:
    HNSW cost grows with w but IVF re-scans the same lists whatever w; 16 for exact ones, where every search is a
    full pass over the static vectors whatever w); once w reaches full_scan_fraction * ntotal (or the index's
    largest k), score the whole table by brute force instead (M or M + 1 passes). Users widen independently.
    One-pass variant (one_pass, CPU flat index, no max_candidates): one matrix product gives every static score;
    after re-scoring the top-w, the rows with static >= S_k - bound - tol are exactly the ones the proof needs, so
    they are re-scored at once (or the table is scanned when they are more than full_scan_fraction of it).

    Guarantee (exact index: flat, CPU or GPU; exact_index None -> inferred from the index type). When the stop
    rule holds, every valid item j outside the candidates has u . static_j <= L (the smallest static score
    retrieved: the index returns the true static top-w), hence score_j <= L + bound <= S_k - tol, where S_k is the
    k-th returned exact score. So no item outside the candidates beats the k-th returned one, and the candidates
    are ranked by their exact scores: the returned ids and scores are those of brute-force scoring of the whole
    table (all valid rows), up to ties and float32 rounding smaller than tol (tol must exceed the rounding error
    of the FAISS and numpy inner products; 1e-4 is ample for unit 300-d vectors). Exactly min(k, #valid items)
    items are returned. user_exact[b] is True when the proof held or the user was fully scanned.
    With an approximate index (HNSW, IVF, PQ) the index may miss items above L, so the same rule is only a
    heuristic that buys recall: user_exact is False unless the user was fully scanned. max_candidates caps w
    (users that hit the cap are not proven; a cap below full_scan_fraction * ntotal also disables the full scan).
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    users = np.ascontiguousarray(user_vectors, dtype=np.float32)
    if users.ndim != 2:
        raise ValueError(f"user_vectors must be (B, D), got shape {users.shape}")
    batch = users.shape[0]
    n_items = vectors[fusion.modalities[0]].shape[0]
    ntotal = 0 if index is None else int(index.ntotal)
    if ntotal > n_items:
        raise ValueError(f"index holds {ntotal} vectors but the item table has only {n_items} rows")
    exact_index = is_exact_index(index) if exact_index is None else exact_index
    growth = growth if growth is not None else (16 if exact_index else 4)
    if growth < 2:
        raise ValueError(f"growth must be >= 2, got {growth}")
    excl = _exclusions(exclude, batch)
    dead = _dead_mask(deleted, n_items)
    norms = np.linalg.norm(users, axis=1)
    bounds = np.array([deviation_bound(fusion, max_gap, float(n)) for n in norms], dtype=np.float64)
    tail = np.arange(ntotal, n_items, dtype=np.int64)  # not in the index yet: always candidates
    full_at = min(0 if index is None else _search_limit(index), max(1, int(full_scan_fraction * ntotal)))
    w0 = initial_width if initial_width is not None else max(2 * k, 32)
    width = [min(1 << int(np.ceil(np.log2(max(1, w0 + e.shape[0])))), max_candidates or ntotal) for e in excl]

    out_ids = np.full((batch, k), -1, dtype=np.int64)
    out_scores = np.full((batch, k), -np.inf, dtype=np.float32)
    counts, n_cand = np.zeros(batch, dtype=np.int64), np.zeros(batch, dtype=np.int64)
    user_exact = np.zeros(batch, dtype=bool)

    def finish(b: int, ids: np.ndarray, scores: np.ndarray, candidates: int, proven: bool) -> None:
        counts[b], n_cand[b], user_exact[b] = ids.shape[0], candidates, proven
        out_ids[b, : ids.shape[0]] = ids
        out_scores[b, : ids.shape[0]] = scores

    def best_valid(b: int, cand: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        ok = (cand >= 0) & ~dead[np.where(cand < 0, 0, cand)] & ~np.isin(cand, excl[b])
        return _top_sorted(cand[ok], scores[ok], k)

    def rescore_one(b: int, cand: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return best_valid(b, cand, _rescore(users[b : b + 1], cand[None], vectors, fusion, id_vectors)[0])

    scan: list[int] = []  # users scored by brute force over the whole table
    xb = _flat_matrix(index) if one_pass and exact_index and ntotal and max_candidates is None else None
    if xb is not None:
        # CPU flat index: one pass gives every static score; the bound then says exactly which rows to re-score
        step = max(1, (1 << 24) // ntotal)
        for s in range(0, batch, step):
            static = users[s : s + step] @ xb.T  # (G, ntotal)
            for j, b in enumerate(range(s, min(batch, s + step))):
                w = width[b]
                top = np.argpartition(-static[j], w - 1)[:w] if w < ntotal else np.arange(ntotal)
                ids, sc = rescore_one(b, np.concatenate([top, tail]))
                if ids.shape[0] < k:
                    scan.append(b)
                    continue
                cand = np.flatnonzero(static[j] >= float(sc[-1]) - bounds[b] - tol)
                if cand.shape[0] >= full_at:
                    scan.append(b)
                    continue
                ids, sc = rescore_one(b, np.concatenate([cand, tail]))
                finish(b, ids, sc, cand.shape[0] + tail.shape[0], True)
    else:
        pending = set(range(batch))
        prev_returned = dict.fromkeys(pending, 0)
        while pending:
            move = [b for b in pending if index is None or width[b] >= full_at]
            scan += move
            pending -= set(move)
            for w in sorted({width[b] for b in pending}):
                group = sorted(b for b in pending if width[b] == w)
                static, found = index.search(users[group], w)  # (G, w) each, static desc
                cand = np.concatenate([found, np.broadcast_to(tail, (len(group), tail.shape[0]))], axis=1)
                rescored = _rescore(users[group], cand, vectors, fusion, id_vectors)
                for j, b in enumerate(group):
                    ids, sc = best_valid(b, cand[j], rescored[j])
                    returned = int((found[j] >= 0).sum())
                    # the index has nothing more to give: a flat index returned everything; an ANN index (HNSW
                    # may return fewer than w) gave no more rows than at the previous width
                    exhausted = returned < w and (exact_index or returned <= prev_returned[b])
                    prev_returned[b] = returned
                    last_static = float(static[j, returned - 1]) if returned and not exhausted else -np.inf
                    proven = exhausted or (ids.shape[0] == k and float(sc[-1]) >= last_static + bounds[b] + tol)
                    if proven or (max_candidates is not None and w >= max_candidates):
                        finish(b, ids, sc, returned + tail.shape[0], bool(proven and exact_index))
                        pending.discard(b)
                    else:
                        width[b] = min(w * growth, max_candidates or w * growth)
    if scan:
        scan.sort()
        for b, (ids, sc) in zip(
            scan, _full_scan(users[scan], k, vectors, fusion, id_vectors, dead, [excl[b] for b in scan]), strict=True
        ):
            finish(b, ids, sc, n_items, True)

    weights = None
    if explain:
        safe = np.where(out_ids < 0, 0, out_ids)
        weights = explanation_weights(users, vectors, fusion, safe)
        weights[out_ids < 0] = np.nan
    return TopK(out_ids, out_scores, counts, n_cand, user_exact, weights)
