"""Exact top-k: ANN/flat candidates by static score, exact re-scoring, widening until the scorer's bound proves it.

For a user u, score_i = u . static_i + r_i with |r_i| <= bound (serving_core.bundle: the missrec_fusion bound, 0
for inner_product). The index ranks items by u . static_i; exact re-scoring of the retrieved candidates plus the
bound tells when no item outside the candidates can enter the top-k. One entry point, :func:`top_k`, over three
small strategies: a one-pass scan of a CPU flat index, widening searches of any index, a brute-force full scan.
Pure functions over arrays passed in (the item table may grow between calls: nothing about sizes is cached).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from serving_core import compact
from serving_core.scan import _dead_mask, _exclusions, _top_sorted, scan_top_k
from serving_core.scoring import ItemScorer

DEFAULT_TOL = 1e-4  # > float32 rounding of two 300-d unit inner products (static via FAISS, exact via numpy)
GPU_MAX_K = 2048  # FAISS GPU indexes refuse larger k
_GATHER_BUDGET = 1 << 16  # candidate rows gathered per re-scoring chunk (x D x 4 bytes per modality)
# Below this many rows a plain exact scan of every row beats the bounded search on CPU (measured with
# loadtest/topk_crossover.py, docs/benchmarks.md: on the real 1,586-row Scientific table 1.12x faster at batch 1 and
# 2.96x at batch 16; from 4k rows at batch 1 and 8k at batch 16 the bounded search wins): the search's fixed costs
# (selection, thresholds, gathers) are larger than scoring a small table outright.
EXACT_SCAN_BELOW = 4096
_SCAN_BUDGET = 1 << 22  # users x rows scored per full-scan chunk


@dataclass(frozen=True)
class TopK:
    """Result of :func:`top_k` for B users.

    ids: (B, k) int64 item rows (= internal ids = FAISS ids), best first, -1 padding when fewer valid items exist;
    scores: (B, k) float32 exact fused scores, descending (ties: lower id first), -inf padding;
    counts: (B,) number of real results; candidates: (B,) items exactly scored in the final round per user
    (the whole table for a full scan); user_exact: (B,) True when the result is proven equal to brute force;
    weights: (B, k, M) explanation weights (ItemScorer.explained_by order), NaN padding, or None;
    rows_float16 / rows_float32: (B,) candidate rows the re-scoring of every round scored from the float16 copies /
    in float32 (serving_core.compact; without copies every candidate is scored in float32); None from a path that
    does not count them.
    """

    ids: np.ndarray
    scores: np.ndarray
    counts: np.ndarray
    candidates: np.ndarray
    user_exact: np.ndarray
    weights: np.ndarray | None = None
    rescore_seconds: float = 0.0  # time spent in exact re-scoring (candidates and full scans)
    rows_float16: np.ndarray | None = None
    rows_float32: np.ndarray | None = None

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


@dataclass(frozen=True)
class SearchOptions:
    """How the search looks for candidates (see :func:`top_k`); the defaults suit every index.

    exact_index: None = inferred from the index type; initial_width: first search width (default max(2k, 32));
    growth: width multiplier per round (default 16 for exact indexes, 4 for ANN ones); max_candidates: cap on the
    width (users that hit it are not proven; a cap below full_scan_fraction * ntotal disables the full scan);
    tol: slack above float32 rounding of the two inner products; full_scan_fraction: width at which scoring every
    row is cheaper; one_pass: use the one-pass strategy on CPU flat indexes; exact_scan_below: catalogues with
    fewer rows than this are scored in full for every user, whatever the index (exact, and cheaper than the
    bounded search there: loadtest/topk_crossover.py measures the crossover; 0 = never)."""

    exact_index: bool | None = None
    initial_width: int | None = None
    growth: int | None = None
    max_candidates: int | None = None
    tol: float = DEFAULT_TOL
    full_scan_fraction: float = 0.25
    one_pass: bool = True
    exact_scan_below: int = EXACT_SCAN_BELOW


@dataclass
class _Search:
    """One call's inputs and outputs, shared by the strategies."""

    users: np.ndarray  # (B, D)
    k: int
    items: ItemScorer
    excl: list[np.ndarray]  # per user, sorted unique rows
    dead: np.ndarray  # (N,) bool
    tol: float
    bounds: np.ndarray = field(init=False)  # (B,) per-user bound on |exact - static|
    ids: np.ndarray = field(init=False)
    scores: np.ndarray = field(init=False)
    counts: np.ndarray = field(init=False)
    candidates: np.ndarray = field(init=False)
    proven: np.ndarray = field(init=False)
    rows16: np.ndarray = field(init=False)  # (B,) candidates scored from float16 copies, all rounds
    rows32: np.ndarray = field(init=False)  # (B,) candidates scored in float32 (re-checks, or all without copies)
    rescore_s: float = 0.0

    def __post_init__(self) -> None:
        batch = self.users.shape[0]
        norms = np.linalg.norm(self.users, axis=1)
        self.bounds = np.array([self.items.bound(float(n)) for n in norms], dtype=np.float64)
        self.ids = np.full((batch, self.k), -1, dtype=np.int64)
        self.scores = np.full((batch, self.k), -np.inf, dtype=np.float32)
        self.counts = np.zeros(batch, dtype=np.int64)
        self.candidates = np.zeros(batch, dtype=np.int64)
        self.proven = np.zeros(batch, dtype=bool)
        self.rows16, self.rows32 = np.zeros(batch, dtype=np.int64), np.zeros(batch, dtype=np.int64)

    def finish(self, b: int, ids: np.ndarray, scores: np.ndarray, candidates: int, proven: bool) -> None:
        self.counts[b], self.candidates[b], self.proven[b] = ids.shape[0], candidates, proven
        self.ids[b, : ids.shape[0]] = ids
        self.scores[b, : ids.shape[0]] = scores

    def select(self, group: Sequence[int], cand: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, ...]:
        """The best k valid candidates of users ``group`` at once: cand, scores (G, C) (-1 = no candidate, each row
        without repeats) -> ids (G, k) (-1 padding), scores (G, k) (-inf padding), counts (G,); by score desc,
        then id asc, exactly as :func:`_top_sorted` per user."""
        valid = cand >= 0
        safe = np.where(valid, cand, 0)
        valid &= ~self.dead[safe]
        excl = [self.excl[b] for b in group]
        if any(e.shape[0] for e in excl):  # one isin over (user, row) keys for the whole group
            n = np.int64(self.dead.shape[0])
            keys = np.concatenate([np.int64(j) * n + e for j, e in enumerate(excl)])
            valid &= ~np.isin(np.arange(len(group), dtype=np.int64)[:, None] * n + safe, keys)
        masked = np.where(valid, scores, np.float32(-np.inf)).astype(np.float32, copy=False)
        k = min(self.k, masked.shape[1])
        if masked.shape[1] > k:
            part = np.argpartition(-masked, k - 1, axis=1)[:, :k]
            top_s, top_i = np.take_along_axis(masked, part, 1), np.take_along_axis(cand, part, 1)
        else:
            top_s, top_i = masked, cand
        order = np.lexsort((top_i, -top_s), axis=-1)
        top_s, top_i = np.take_along_axis(top_s, order, 1), np.take_along_axis(top_i, order, 1)
        counts = np.isfinite(top_s).sum(1)
        top_i = np.where(np.isfinite(top_s), top_i, -1)
        ids = np.full((len(group), self.k), -1, dtype=np.int64)
        out = np.full((len(group), self.k), -np.inf, dtype=np.float32)
        ids[:, :k], out[:, :k] = top_i, top_s
        # ties at the k-th score that the partition cut: redo those users with the id tie-break over all of them
        kth = top_s[:, k - 1]
        tied = np.flatnonzero(np.isfinite(kth) & ((masked >= kth[:, None]).sum(1) > k))
        for j in tied:
            ok = valid[j]
            ti, ts = _top_sorted(cand[j][ok], scores[j][ok], self.k)
            ids[j], out[j] = -1, -np.inf
            ids[j, : ti.shape[0]], out[j, : ti.shape[0]] = ti, ts
        return ids, out, counts

    def valid(self, b: int, cand: np.ndarray) -> np.ndarray:
        return (cand >= 0) & ~self.dead[np.where(cand < 0, 0, cand)] & ~np.isin(cand, self.excl[b])

    def best_valid(self, b: int, cand: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        ok = self.valid(b, cand)
        return _top_sorted(cand[ok], scores[ok], self.k)

    def rescore(self, group: Sequence[int], cand: np.ndarray) -> np.ndarray:
        """Exact scores (G, C) of candidates cand (G, C) of users ``group`` (-1 entries scored as row 0), chunked
        over users. With float16 copies (serving_core.compact): -inf for the invalid candidates and for those
        provably below the k-th exact score, the float32 score of the others."""
        started = time.perf_counter()
        safe = np.where(cand < 0, 0, cand)
        out = np.empty(cand.shape, dtype=np.float32)
        step = max(1, _GATHER_BUDGET // max(1, cand.shape[1]))
        for s in range(0, cand.shape[0], step):
            part, users = list(group[s : s + step]), self.users[list(group[s : s + step])]
            if self.items.half is None:
                out[s : s + step] = self.items.exact(users, safe[s : s + step])
                self.rows32[part] += cand.shape[1]
                continue
            valid = np.stack([self.valid(b, c) for b, c in zip(part, cand[s : s + step], strict=True)])
            out[s : s + step], counts = compact.rescore(self.items, users, safe[s : s + step], valid, self.k)
            self.rows16[part] += cand.shape[1]
            self.rows32[part] += counts
        self.rescore_s += time.perf_counter() - started
        return out

    def rescore_one(self, b: int, cand: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.best_valid(b, cand, self.rescore([b], cand[None])[0])


def _one_pass(s: _Search, xb: np.ndarray, width: list[int], tail: np.ndarray, full_at: int) -> list[int]:
    """CPU flat index: one matrix product gives every static score; after re-scoring the top-w, the rows with
    static >= S_k - bound - tol are exactly the ones the proof needs, so they are re-scored at once. Per user: a
    version vectorised across the batch (one selection per round for all users) measured slower at batch 1 and no
    faster at batch 16 from 16k rows (docs/benchmarks.md); below EXACT_SCAN_BELOW rows the exact scan answers.
    Returns the users that need a full scan instead."""
    ntotal = xb.shape[0]
    scan: list[int] = []
    step = max(1, (1 << 24) // ntotal)
    for start in range(0, s.users.shape[0], step):
        static = s.users[start : start + step] @ xb.T  # (G, ntotal)
        for j, b in enumerate(range(start, min(s.users.shape[0], start + step))):
            w = width[b]
            top = np.argpartition(-static[j], w - 1)[:w] if w < ntotal else np.arange(ntotal)
            ids, sc = s.rescore_one(b, np.concatenate([top, tail]))
            if ids.shape[0] < s.k:
                scan.append(b)
                continue
            cand = np.flatnonzero(static[j] >= float(sc[-1]) - s.bounds[b] - s.tol)
            if cand.shape[0] >= full_at:
                scan.append(b)
                continue
            ids, sc = s.rescore_one(b, np.concatenate([cand, tail]))
            s.finish(b, ids, sc, cand.shape[0] + tail.shape[0], True)
    return scan


def _widening(
    s: _Search,
    index: Any,
    width: list[int],
    tail: np.ndarray,
    full_at: int,
    growth: int,
    opts: SearchOptions,
    params: Any = None,
) -> list[int]:
    """Any index: search the top-w rows by static score, re-score them exactly, stop when the k-th best exact score
    >= the smallest static score retrieved + bound + tol, else widen w by ``growth``. Users widen independently.
    Returns the users that reached ``full_at`` (or every user without an index): they need a full scan."""
    exact_index, cap = bool(opts.exact_index), opts.max_candidates
    scan: list[int] = []
    pending = set(range(s.users.shape[0]))
    prev_returned = dict.fromkeys(pending, 0)
    while pending:
        move = [b for b in pending if index is None or width[b] >= full_at]
        scan += move
        pending -= set(move)
        for w in sorted({width[b] for b in pending}):
            group = sorted(b for b in pending if width[b] == w)
            found_by = index.search(s.users[group], w, params=params) if params else index.search(s.users[group], w)
            static, found = found_by  # (G, w) each, static desc (params: an IDSelector, only the rows it allows)
            cand = np.concatenate([found, np.broadcast_to(tail, (len(group), tail.shape[0]))], axis=1)
            rescored = s.rescore(group, cand)  # one gather for the group; selection per user (measured
            for j, b in enumerate(group):  # faster at batch 1 than one vectorised selection, docs/benchmarks.md)
                ids, sc = s.best_valid(b, cand[j], rescored[j])
                returned = int((found[j] >= 0).sum())
                # the index has nothing more to give: a flat index returned everything; an ANN index (HNSW may
                # return fewer than w) gave no more rows than at the previous width
                exhausted = returned < w and (exact_index or returned <= prev_returned[b])
                prev_returned[b] = returned
                last_static = float(static[j, returned - 1]) if returned and not exhausted else -np.inf
                proven = exhausted or (ids.shape[0] == s.k and float(sc[-1]) >= last_static + s.bounds[b] + s.tol)
                if proven or (cap is not None and w >= cap):
                    s.finish(b, ids, sc, returned + tail.shape[0], bool(proven and exact_index))
                    pending.discard(b)
                else:
                    width[b] = min(w * growth, cap or w * growth)
    return scan


def _full_scan(s: _Search, scan: list[int]) -> None:
    """Brute-force exact top-k over every row for the users ``scan``: item chunks scored for all of them at once,
    each chunk's best merged with the running best (one vectorised selection per chunk)."""
    started = time.perf_counter()
    order = sorted(scan)
    users = s.users[order]
    n_items = s.dead.shape[0]
    chunk = max(4096, _SCAN_BUDGET // max(1, users.shape[0]))
    if n_items <= chunk:  # one chunk (serving_core.scan): the scores masked in place, one selection
        found = scan_top_k(s.items.exact(users), s.dead, [s.excl[b] for b in order], s.k)
        for b, (ids, sc) in zip(order, found, strict=True):
            s.finish(b, ids, sc, n_items, True)
        s.rows32[order] += n_items
        s.rescore_s += time.perf_counter() - started
        return
    best_ids = np.full((len(order), 0), -1, dtype=np.int64)
    best_sc = np.full((len(order), 0), -np.inf, dtype=np.float32)
    counts = np.zeros(len(order), dtype=np.int64)
    for lo in range(0, n_items, chunk):
        hi = min(n_items, lo + chunk)
        scores = s.items.sliced(lo, hi).exact(users)  # (G, chunk)
        rows = np.broadcast_to(np.arange(lo, hi, dtype=np.int64), scores.shape)
        cand = np.concatenate([best_ids, rows], axis=1)
        best_ids, best_sc, counts = s.select(order, cand, np.concatenate([best_sc, scores], axis=1))
        keep = int(counts.max(initial=0))  # padding past every user's count carries nothing to the next chunk
        best_ids, best_sc = best_ids[:, :keep], best_sc[:, :keep]
    s.rescore_s += time.perf_counter() - started
    s.rows32[order] += n_items
    for g, b in enumerate(order):
        n = int(counts[g])
        s.finish(b, best_ids[g, :n], best_sc[g, :n], n_items, True)


def top_k(
    user_vectors: np.ndarray,
    k: int,
    index: Any,
    items: ItemScorer,
    *,
    exclude: Sequence[Iterable[int] | np.ndarray | None] | None = None,
    deleted: np.ndarray | Iterable[int] | None = None,
    explain: bool = False,
    options: SearchOptions | None = None,
    search_params: Any = None,
) -> TopK:
    """Top-k items by exact score for each user, excluding row 0, deleted rows and per-user excludes.

    user_vectors: (B, D) float32; index: FAISS inner-product index over the static vectors with FAISS id = item
    row (row 0 included and never returned), or None (brute force); items: the scorer over the item arrays, with
    N >= index.ntotal rows: rows past index.ntotal (appended since the index was built) are always re-scored;
    exclude: one collection of item rows per user or None; deleted: (N',) bool mask (rows past N' alive) or rows;
    search_params: FAISS SearchParameters with an IDSelector allowing only rows that ``deleted`` leaves alive (a
    filter, serving_core.filtered): the widening searches then retrieve valid rows only (the proof is unchanged).

    Guarantee (exact index: flat, CPU or GPU). When the stop rule holds, every valid item j outside the candidates
    has u . static_j <= L (the smallest static score retrieved: the index returns the true static top-w), hence
    score_j <= L + bound <= S_k - tol, where S_k is the k-th returned exact score. So no item outside the
    candidates beats the k-th returned one, and the candidates are ranked by their exact scores: the result is that
    of brute-force scoring of every valid row, up to ties and float32 rounding below tol. Exactly min(k, #valid)
    items are returned; user_exact[b] is True when the proof held or the user was fully scanned. With an
    approximate index (HNSW, IVF, PQ) the same rule is a heuristic that buys recall: user_exact is False unless the
    user was fully scanned. With float16 copies (``items.half``, serving_core.compact) the candidates are scored from
    them first and only those that can reach the k-th place are re-scored in float32; the others are provably below
    the k-th exact score, so the guarantee and the results are those of the float32 path.
    """
    opts = options or SearchOptions()
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    users = np.ascontiguousarray(user_vectors, dtype=np.float32)
    if users.ndim != 2:
        raise ValueError(f"user_vectors must be (B, D), got shape {users.shape}")
    batch, n_items = users.shape[0], items.num_items
    ntotal = 0 if index is None else int(index.ntotal)
    if ntotal > n_items:
        raise ValueError(f"index holds {ntotal} vectors but the item table has only {n_items} rows")
    exact_index = is_exact_index(index) if opts.exact_index is None else opts.exact_index
    opts = replace(opts, exact_index=exact_index)
    growth = opts.growth if opts.growth is not None else (16 if exact_index else 4)
    if growth < 2:
        raise ValueError(f"growth must be >= 2, got {growth}")
    s = _Search(users, k, items, _exclusions(exclude, batch), _dead_mask(deleted, n_items), opts.tol)
    tail = np.arange(ntotal, n_items, dtype=np.int64)  # not in the index yet: always candidates
    full_at = min(0 if index is None else _search_limit(index), max(1, int(opts.full_scan_fraction * ntotal)))
    w0 = opts.initial_width if opts.initial_width is not None else max(2 * k, 32)
    cap = opts.max_candidates or ntotal
    width = [min(1 << int(np.ceil(np.log2(max(1, w0 + e.shape[0])))), cap) for e in s.excl]

    if n_items < opts.exact_scan_below:
        scan = list(range(batch))  # a small catalogue: scoring every row is cheaper than bounding the search
    else:
        xb = _flat_matrix(index) if opts.one_pass and exact_index and ntotal and opts.max_candidates is None else None
        if xb is not None:
            scan = _one_pass(s, xb, width, tail, full_at)
        else:
            scan = _widening(s, index, width, tail, full_at, growth, opts, search_params)
    if scan:
        _full_scan(s, scan)

    weights = None
    if explain:
        safe = np.where(s.ids < 0, 0, s.ids)
        weights = items.explain(users, safe)
        if weights is not None:
            weights[s.ids < 0] = np.nan
    return TopK(s.ids, s.scores, s.counts, s.candidates, s.proven, weights, s.rescore_s, s.rows16, s.rows32)
