"""The exact top-k among the rows a filter allows: the filter goes into the search, never after it.

:func:`filtered_top_k` takes ``allowed`` (a bool mask of the rows a request's filter matches) and returns the
top-k by exact score among the allowed, live, not excluded rows: exactly min(k, such rows) items, with the same
``user_exact`` proof as :func:`serving_core.topk.top_k`. Two ways, chosen by how many rows are allowed:

- few (at most ``subset_fraction`` of the table, or below ``exact_scan_below``): the **exact scan** of the allowed
  rows only (gathered once, scored for every user): exact by construction;
- more: :func:`~serving_core.topk.top_k` with the disallowed rows dead, and the filter passed to FAISS as an
  ``IDSelectorBitmap`` in the ``SearchParameters`` where the index takes one (CPU flat, HNSW, IVF), so the index
  retrieves allowed rows only. The stop rule bounds every row the index did not return, so the proof holds as
  without a filter. A CPU flat index is searched by one matrix product whose candidates are then filtered: still
  exact (the threshold covers every row). An ANN index that returned fewer than k allowed rows (HNSW with a
  selective filter) is topped up by the exact scan.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from serving_core.scoring import ItemScorer
from serving_core.topk import SearchOptions, TopK, _dead_mask, _exclusions, _top_sorted, top_k

SUBSET_FRACTION_FLAT = 0.25  # a CPU flat index scores every row statically anyway: scan subsets up to a quarter
SUBSET_FRACTION_ANN = 0.02  # HNSW / IVF with an IDSelector are cheaper than scanning more than this
_SCAN_BUDGET = 1 << 22  # users x rows scored per chunk of the exact scan


def selector_params(index: Any, ok: np.ndarray) -> Any:
    """FAISS SearchParameters whose IDSelectorBitmap allows the rows ``ok`` (bool, >= index.ntotal rows), with the
    index's own efSearch / nprobe; None where the index takes no selector (GPU, pre-transformed)."""
    import faiss

    if index is None or type(index).__name__.startswith("Gpu"):
        return None
    idx = faiss.downcast_index(index)
    bits = np.packbits(ok[: idx.ntotal], bitorder="little")
    sel = faiss.IDSelectorBitmap(idx.ntotal, faiss.swig_ptr(bits))
    if isinstance(idx, faiss.IndexHNSW):
        params = faiss.SearchParametersHNSW(sel=sel, efSearch=idx.hnsw.efSearch)
    elif isinstance(idx, faiss.IndexIVF):
        params = faiss.SearchParametersIVF(sel=sel, nprobe=idx.nprobe)
    elif isinstance(idx, faiss.IndexFlat):
        params = faiss.SearchParameters(sel=sel)
    else:
        return None
    params._keep = (bits, sel)  # the bitmap's memory must live as long as the parameters
    return params


def subset_top_k(
    users: np.ndarray, k: int, items: ItemScorer, rows: np.ndarray, excl: list[np.ndarray], explain: bool
) -> TopK:
    """Exact top-k of users (B, D) among ``rows`` (sorted live rows) minus each user's exclusions: every one of
    those rows scored exactly (chunked), so the result is brute force over them by construction."""
    started = time.perf_counter()
    batch = users.shape[0]
    ids = np.full((batch, k), -1, dtype=np.int64)
    scores = np.full((batch, k), -np.inf, dtype=np.float32)
    counts = np.zeros(batch, dtype=np.int64)
    best: list[tuple[np.ndarray, np.ndarray]] = [(np.empty(0, np.int64), np.empty(0, np.float32))] * batch
    chunk = max(1024, _SCAN_BUDGET // max(1, batch))
    for lo in range(0, rows.shape[0], chunk):
        part = rows[lo : lo + chunk]
        sc = items.take(part).exact(users)  # (B, C)
        for b in range(batch):
            keep = ~np.isin(part, excl[b]) if excl[b].shape[0] else slice(None)
            merged_ids = np.concatenate([best[b][0], part[keep]])
            best[b] = _top_sorted(merged_ids, np.concatenate([best[b][1], sc[b][keep]]), k)
    for b, (i, s) in enumerate(best):
        counts[b] = i.shape[0]
        ids[b, : i.shape[0]], scores[b, : i.shape[0]] = i, s
    weights = None
    if explain:
        weights = items.explain(users, np.where(ids < 0, 0, ids))
        if weights is not None:
            weights[ids < 0] = np.nan
    elapsed = time.perf_counter() - started
    cands = np.full(batch, rows.shape[0], dtype=np.int64)
    return TopK(ids, scores, counts, cands, np.ones(batch, dtype=bool), weights, elapsed)


def filtered_top_k(
    user_vectors: np.ndarray,
    k: int,
    index: Any,
    items: ItemScorer,
    *,
    allowed: np.ndarray,
    exclude: Sequence[Iterable[int] | np.ndarray | None] | None = None,
    deleted: np.ndarray | None = None,
    explain: bool = False,
    options: SearchOptions | None = None,
) -> TopK:
    """Exact top-k of every user among the rows ``allowed`` (bool, rows past its length: not allowed) that are not
    ``deleted`` nor excluded (see the module docstring)."""
    opts = options or SearchOptions()
    users = np.ascontiguousarray(user_vectors, dtype=np.float32)
    n = items.num_items
    ok = np.zeros(n, dtype=bool)
    m = min(n, allowed.shape[0])
    ok[:m] = allowed[:m]
    ok &= ~_dead_mask(deleted, n)
    rows = np.flatnonzero(ok)
    excl = _exclusions(exclude, users.shape[0])
    flat = index is None or type(index).__name__ in ("IndexFlatIP", "IndexFlat")
    fraction = SUBSET_FRACTION_FLAT if flat else SUBSET_FRACTION_ANN
    if rows.shape[0] <= max(opts.exact_scan_below, fraction * n):
        return subset_top_k(users, k, items, rows, excl, explain)
    width = opts.initial_width or max(2 * k, 32)
    opts = replace(opts, initial_width=min(n, int(np.ceil(width * n / rows.shape[0]))))
    params = selector_params(index, ok)
    found = top_k(users, k, index, items, exclude=excl, deleted=~ok, explain=explain, options=opts,
                  search_params=params)  # fmt: skip
    valid = [rows.shape[0] - int(np.isin(e, rows).sum()) for e in excl]
    short = [b for b in range(users.shape[0]) if found.counts[b] < min(k, valid[b])]
    if not short:
        return found
    redo = subset_top_k(users[short], k, items, rows, [excl[b] for b in short], explain)
    fields = [found.ids.copy(), found.scores.copy(), found.counts.copy(), found.candidates.copy()]
    exact = found.user_exact.copy()
    weights = None if found.weights is None else found.weights.copy()
    for j, b in enumerate(short):
        for out, src in zip(fields, (redo.ids, redo.scores, redo.counts, redo.candidates), strict=True):
            out[b] = src[j]
        exact[b] = True
        if weights is not None and redo.weights is not None:
            weights[b] = redo.weights[j]
    return TopK(*fields, exact, weights, found.rescore_seconds + redo.rescore_seconds)
