"""The recommend path: plain functions over one catalogue snapshot (ONNX Runtime + FAISS + numpy; no torch).

One micro-batch runs :func:`recommend_batch` in a worker thread against the snapshot that was current when the
batch started; nothing here locks or mutates shared state. :func:`serve` is the one serving path (histories ->
user tower -> exact top-k), also taken by shadow scoring and ``missrec evaluate-bundle``.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from service.catalogue import Snapshot
from service.metrics import Metrics
from serving_core.bundle import INNER_PRODUCT, static_vectors
from serving_core.explain import LeaveOneOut, leave_one_out
from serving_core.filtered import filtered_top_k
from serving_core.topk import TopK, top_k


@dataclass
class Query:
    history: np.ndarray  # (L,) internal ids, oldest first; empty = no history
    k: int
    exclude: set[int] = field(default_factory=set)
    explain: bool = False
    snapshot: Snapshot | None = None  # the one its rows come from (None: whichever is current)
    allowed: np.ndarray | None = None  # rows a filter matches (bool, over ``snapshot``); None: every row
    max_per: dict[str, int] | None = None  # at most n items per value of these fields


@dataclass
class RecommendedRow:
    item_id: str
    score: float
    explanation: dict[str, Any] | None = None


@dataclass
class Recommendation:
    items: list[RecommendedRow]
    exact: bool
    model_version: str
    fallback: str | None = None
    matched: int | None = None  # with a filter: live available items matching it
    recommendation_id: str | None = None  # while an experiment runs (service.experiments)
    variant: str | None = None


@dataclass(frozen=True)
class Served:
    """One user's exact top-k on a snapshot: item rows best first, their exact scores, whether the result is proven
    equal to brute force, the explanation weights (k, M) when any user of its search asked for them, and the user
    vector the scores come from."""

    rows: np.ndarray
    scores: np.ndarray
    exact: bool
    weights: np.ndarray | None = None
    user: np.ndarray | None = None


def serve(
    snap: Snapshot,
    histories: Sequence[np.ndarray],
    ks: Sequence[int],
    exclude: Sequence[Iterable[int]],
    explain: Sequence[bool] | None = None,
    metrics: Metrics | None = None,
    allowed: Sequence[np.ndarray | None] | None = None,
    max_per: Sequence[dict[str, int] | None] | None = None,
) -> list[Served]:
    """The one serving path, "these histories on this snapshot": the user tower over every history at once
    (internal rows, oldest first, each non-empty: the tower reads the last ``max_len`` items of each, the one place
    histories are cut), then each user's exact top-k with its own k, exclusions and explanation flag. The recommend
    route's micro-batches, shadow scoring and ``missrec evaluate-bundle`` serve through here. With ``metrics``:
    the ``user_tower``, ``search`` and ``rescore`` stages."""
    with _timed(metrics, "user_tower"):
        users = snap.model.towers.user.encode(histories, snap.item_arrays())
    return rank(snap, users, ks, exclude, explain, metrics, allowed=allowed, max_per=max_per)


def rank(
    snap: Snapshot,
    users: np.ndarray,
    ks: Sequence[int],
    exclude: Sequence[Iterable[int]],
    explain: Sequence[bool] | None = None,
    metrics: Metrics | None = None,
    stage: str = "search",
    allowed: Sequence[np.ndarray | None] | None = None,
    max_per: Sequence[dict[str, int] | None] | None = None,
) -> list[Served]:
    """Exact top-k of query vectors (B, D), each with its own k, exclusions, filter (``allowed`` rows) and caps:
    one search per distinct k and filter (timed as ``stage``), in the order they first appear; a query with caps
    (``max_per``) searches alone. Deleted and unavailable rows (``snap.hidden``) are never returned."""
    wanted = explain if explain is not None else [False] * len(ks)
    masks = allowed if allowed is not None else [None] * len(ks)
    caps = max_per if max_per is not None else [None] * len(ks)
    by_k: dict[tuple[int, int], list[int]] = {}
    for b, k in enumerate(ks):
        by_k.setdefault((k, id(masks[b]) if not caps[b] else -1 - b), []).append(b)
    out: list[Served] = [None] * len(ks)  # type: ignore[list-item]
    for (k, _), members in by_k.items():
        mask, cap, excl = masks[members[0]], caps[members[0]], [exclude[b] for b in members]
        with _timed(metrics, stage):
            if cap:
                found = capped(snap, users[members], k, excl, any(wanted[b] for b in members), mask, cap)
            else:
                found = search(snap, users[members], k, excl, any(wanted[b] for b in members), mask)
        if metrics is not None:
            metrics.stage.labels("rescore").observe(found.rescore_seconds)
            for dtype, rows in (("float16", found.rows_float16), ("float32", found.rows_float32)):
                if rows is not None and rows.any():
                    metrics.rescore_rows.labels(dtype).inc(int(rows.sum()))
        for j, b in enumerate(members):
            rows, scores = found.row(j)
            weights = found.weights[j] if found.weights is not None else None
            out[b] = Served(rows, scores, bool(found.user_exact[j]), weights, users[b])
    return out


def search(
    snap: Snapshot,
    users: np.ndarray,
    k: int,
    exclude: Sequence[Iterable[int]],
    explain: bool,
    allowed: np.ndarray | None,
) -> TopK:
    """The exact top-k of ``users`` among the live available rows (and the ``allowed`` ones, with a filter)."""
    opts, scorer, excl = snap.model.options, snap.scorer(), list(exclude)
    if allowed is None:
        return top_k(users, k, snap.index, scorer, exclude=excl, deleted=snap.hidden, explain=explain, options=opts)
    return filtered_top_k(users, k, snap.index, scorer, allowed=allowed, exclude=excl, deleted=snap.hidden,
                          explain=explain, options=opts)  # fmt: skip


def capped(
    snap: Snapshot,
    users: np.ndarray,
    k: int,
    exclude: Sequence[Iterable[int]],
    explain: bool,
    allowed: np.ndarray | None,
    max_per: dict[str, int],
) -> TopK:
    """One user's top-k with at most ``max_per[field]`` items per value of each field: the exact ranking walked best
    first, an item taken unless one of its values reached its cap. The ranking is searched 4k deep, then 4x deeper
    while the walk comes up short and the ranking has more items (so the result is the walk over the full one)."""
    depth, n = 4 * k, snap.n
    while True:
        found = search(snap, users, min(depth, n), exclude, explain, allowed)
        counts: dict[tuple[str, Any], int] = {}
        keep: list[int] = []
        for c, row in enumerate(found.ids[0, : found.counts[0]]):
            attrs = snap.attrs.of(int(row))
            values = [(f, v) for f in max_per for v in _as_list(attrs.get(f))]
            if all(counts.get(fv, 0) < max_per[fv[0]] for fv in values):
                keep.append(c)
                for fv in values:
                    counts[fv] = counts.get(fv, 0) + 1
                if len(keep) == k:
                    break
        if len(keep) == k or found.counts[0] < min(depth, n) or depth >= n:
            break
        depth *= 4
    pick = np.asarray(keep, dtype=np.int64)
    ids = np.full((1, k), -1, dtype=np.int64)
    scores = np.full((1, k), -np.inf, dtype=np.float32)
    ids[0, : pick.shape[0]], scores[0, : pick.shape[0]] = found.ids[0, pick], found.scores[0, pick]
    weights = None
    if found.weights is not None:
        weights = np.full((1, k, found.weights.shape[2]), np.nan, dtype=np.float32)
        weights[0, : pick.shape[0]] = found.weights[0, pick]
    count = np.array([pick.shape[0]])
    return TopK(ids, scores, count, found.candidates, found.user_exact, weights, found.rescore_seconds,
                found.rows_float16, found.rows_float32)  # fmt: skip


def _as_list(value: Any) -> list[Any]:
    return [] if value is None else list(value) if isinstance(value, list) else [value]


def _timed(metrics: Metrics | None, stage: str) -> contextlib.AbstractContextManager[Any]:
    return metrics.timed(stage) if metrics is not None else contextlib.nullcontext()


def recommend_batch(current: Snapshot, queries: list[Query], metrics: Metrics) -> list[Recommendation | Exception]:
    """One micro-batch against the current snapshot; a query whose rows come from a snapshot of another model (a
    bundle swap happened since it was resolved) runs on that model, with the newest such snapshot in the batch:
    rows of one bundle mean nothing in another."""
    groups: dict[int, tuple[Snapshot, list[int]]] = {}
    for i, q in enumerate(queries):
        snap = current if q.snapshot is None or q.snapshot.model is current.model else q.snapshot
        seen, members = groups.setdefault(id(snap.model), (snap, []))
        if snap.seq > seen.seq:
            groups[id(snap.model)] = (snap, members)
        members.append(i)
    if len(groups) == 1:
        return _recommend_on(next(iter(groups.values()))[0], queries, metrics)
    results: list[Recommendation | Exception] = [None] * len(queries)  # type: ignore[list-item]
    for snap, members in groups.values():
        for i, rec in zip(members, _recommend_on(snap, [queries[i] for i in members], metrics), strict=True):
            results[i] = rec
    return results


def _recommend_on(snap: Snapshot, queries: list[Query], metrics: Metrics) -> list[Recommendation | Exception]:
    """One group of queries on one snapshot: popularity for empty histories, :func:`serve` for the others."""
    results: list[Recommendation | Exception] = [None] * len(queries)  # type: ignore[list-item]
    slots = [i for i, q in enumerate(queries) if q.history.size]
    for i, q in enumerate(queries):
        if not q.history.size:
            results[i] = popular(snap, q)
    if not slots:
        return results
    personal = [queries[i] for i in slots]
    histories, ks = [q.history for q in personal], [q.k for q in personal]
    served = serve(snap, histories, ks, [q.exclude for q in personal], [q.explain for q in personal], metrics,
                   [q.allowed for q in personal], [q.max_per for q in personal])  # fmt: skip
    wanted = [j for j, q in enumerate(personal) if q.explain]
    because: list[LeaveOneOut | None] = [None] * len(personal)
    if wanted:
        found = leave_one_out(
            snap.model.towers.user,
            snap.scorer(),
            [histories[j] for j in wanted],
            [served[j].rows for j in wanted],
            [served[j].scores for j in wanted],
            snap.item_arrays(),
        )
        for j, loo in zip(wanted, found, strict=True):
            because[j] = loo
    for j, (slot, q, one) in enumerate(zip(slots, personal, served, strict=True)):
        results[slot] = recommendation(snap, one, q.explain, q.history, because[j])
    return results


BECAUSE_TOP = 3  # history items named per recommended item


def recommendation(
    snap: Snapshot,
    served: Served,
    explain: bool,
    history: np.ndarray | None = None,
    because: LeaveOneOut | None = None,
) -> Recommendation:
    """The wire-ready items of one served top-k; with ``explain``, each item's explanation: the fusion weights
    and interest cluster, the split of its score into parts (:meth:`ItemScorer.split`) and, given the
    leave-one-out contributions of the ``history`` it was served for, the history items it is there because of."""
    notes: list[dict[str, Any] | None] = [None] * len(served.rows)
    if explain:
        scorer = snap.scorer()
        names = scorer.explained_by if served.weights is not None else ()
        none = np.zeros(0, dtype=np.float32)
        notes = [
            explanation(snap, int(r), names, served.weights[c] if served.weights is not None else none)
            for c, r in enumerate(served.rows)
        ]
        parts = None
        if served.user is not None and served.rows.size:
            parts = scorer.split(served.user[None, :], served.rows[None, :].astype(np.int64))
        for c, note in enumerate(notes):
            note["score_split"] = [] if parts is None else score_split(scorer.split_by, parts[0, c])
            note["because"] = None
            if history is not None:  # [] for a one-item history: there is nothing to leave out
                note["because"] = [
                    {"item_id": snap.ids[item], "position": p, "contribution": drop}
                    for item, p, drop in (because.top(c, BECAUSE_TOP, history) if because is not None else [])
                ]
    items = [
        RecommendedRow(snap.ids[r], float(s), e) for r, s, e in zip(served.rows, served.scores, notes, strict=True)
    ]
    return Recommendation(items=items, exact=served.exact, model_version=snap.model.version)


def item_query(snap: Snapshot, row: int) -> np.ndarray:
    """(1, D) the query vector of an item, for "items like this one".

    missrec_fusion: the item's static vector (the mean of its unit modality vectors, and of its ID vector in
    transductive mode: what the index stores for it) scaled to unit norm, the norm of a user vector; its scores
    are then the model's fused scores, as if a user were exactly this item. inner_product: the item vector."""
    scorer = snap.model.manifest.scorer
    ids = snap.id_vectors[row : row + 1] if snap.id_vectors is not None else None
    query = static_vectors(scorer, {name: v[row : row + 1] for name, v in snap.vectors.items()}, ids)
    if scorer.kind == INNER_PRODUCT:
        return query
    norm = float(np.linalg.norm(query))
    return query / norm if norm > 0 else query


def similar(
    snap: Snapshot,
    row: int,
    k: int,
    explain: bool,
    metrics: Metrics,
    allowed: np.ndarray | None = None,
    max_per: dict[str, int] | None = None,
) -> Recommendation:
    """The exact top-k items for an item's own query vector (:func:`item_query`), the item itself excluded."""
    query = item_query(snap, row)
    served = rank(snap, query, [k], [{row}], [explain], metrics, "similar", [allowed], [max_per])[0]
    return recommendation(snap, served, explain)


def explanation(snap: Snapshot, row: int, names: tuple[str, ...], weights: np.ndarray) -> dict[str, Any]:
    """Text/image weights of an item for this user (None for a scorer with nothing to weigh, e.g. MMSRec's one
    cosine) and the interest cluster of the leading modality (MISSRec)."""
    w = {name: float(weights[j]) for j, name in enumerate(names)}
    lead = max(w, key=lambda m: w[m], default=None)
    cluster = snap.clusters.get(lead) if lead is not None else None
    return {
        "text_weight": w.get("text", 0.0) if w else None,
        "image_weight": w.get("image", 0.0) if w else None,
        "interest": int(cluster[row]) if cluster is not None else None,
    }


def score_split(names: tuple[str, ...], parts: np.ndarray) -> list[dict[str, Any]]:
    """Each part's score and share of the item's score (parts sum to the score; shares sum to 1 and are negative
    for a part that pulls the score down)."""
    total = float(parts.sum())
    safe = total if abs(total) > 1e-12 else 1.0
    return [{"part": n, "score": float(v), "share": float(v) / safe} for n, v in zip(names, parts, strict=True)]


def popular(snap: Snapshot, q: Query) -> Recommendation:
    """Fallback for an empty history: the most popular live available items (bundle popularity), then ingested
    ones; with a filter, matching ones only; with caps, walked like :func:`capped`."""
    model = snap.model
    n_bundle = model.bundle.table.num_items
    picked: list[int] = []
    counts: dict[tuple[str, Any], int] = {}
    for r in itertools.chain(model.popular_order, range(n_bundle, snap.n)):
        if snap.hidden[r] or r in q.exclude or (q.allowed is not None and not q.allowed[r]):
            continue
        if q.max_per:
            values = [(f, v) for f in q.max_per for v in _as_list(snap.attrs.of(int(r)).get(f))]
            if any(counts.get(fv, 0) >= q.max_per[fv[0]] for fv in values):
                continue
            for fv in values:
                counts[fv] = counts.get(fv, 0) + 1
        picked.append(int(r))
        if len(picked) == q.k:
            break
    pop = model.bundle.table.popularity
    items = [RecommendedRow(snap.ids[r], float(pop[r]) if r < n_bundle else 0.0) for r in picked]
    return Recommendation(items=items, exact=True, model_version=model.version, fallback="popular")


def warmup(snap: Snapshot, batch_size: int, metrics: Metrics) -> None:
    """A max-shape batch through the user tower and the search before traffic."""
    snap.model.towers.user.warm_up(batch_size)
    n = snap.n
    history = (np.arange(snap.model.max_len) % (n - 1) + 1).astype(np.int64)
    recommend_batch(snap, [Query(history=history, k=min(100, n - 1)) for _ in range(min(batch_size, 8))], metrics)
