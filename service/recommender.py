"""The recommend path: plain functions over one catalogue snapshot (ONNX Runtime + FAISS + numpy; no torch).

One micro-batch runs :func:`recommend_batch` in a worker thread against the snapshot that was current when the
batch started; nothing here locks or mutates shared state.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from service.catalogue import Snapshot
from service.metrics import Metrics
from serving_core.bundle import INNER_PRODUCT, static_vectors
from serving_core.topk import top_k


@dataclass
class Query:
    history: np.ndarray  # (L,) internal ids, oldest first; empty = no history
    k: int
    exclude: set[int] = field(default_factory=set)
    explain: bool = False
    snapshot: Snapshot | None = None  # the one its rows come from (None: whichever is current)


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
    """One group of queries on one snapshot: popularity for empty histories, user tower + exact top-k for the
    others."""
    results: list[Recommendation | Exception] = [None] * len(queries)  # type: ignore[list-item]
    personal = [i for i, q in enumerate(queries) if q.history.size]
    for i, q in enumerate(queries):
        if not q.history.size:
            results[i] = popular(snap, q)
    if not personal:
        return results
    with metrics.timed("user_tower"):
        users = snap.model.towers.user.encode([queries[i].history for i in personal], snap.item_arrays())
    by_k: dict[int, list[int]] = {}
    for j, i in enumerate(personal):
        by_k.setdefault(queries[i].k, []).append(j)
    for k, members in by_k.items():
        slots = [personal[j] for j in members]
        for slot, rec in zip(slots, search(snap, users[members], k, [queries[s] for s in slots], metrics), strict=True):
            results[slot] = rec
    return results


def search(
    snap: Snapshot, users: np.ndarray, k: int, queries: list[Query], metrics: Metrics, stage: str = "search"
) -> list[Recommendation]:
    """Exact top-k of users (G, D) with one k, each with its query's exclusions (timed as ``stage``)."""
    scorer = snap.scorer()
    with metrics.timed(stage):
        found = top_k(
            users,
            k,
            snap.index,
            scorer,
            exclude=[q.exclude for q in queries],
            deleted=snap.deleted,
            explain=any(q.explain for q in queries),
            options=snap.model.options,
        )
    metrics.stage.labels("rescore").observe(found.rescore_seconds)
    names = scorer.explained_by
    out = []
    for b, q in enumerate(queries):
        rows, scores = found.row(b)
        notes: list[dict[str, Any] | None] = [None] * len(rows)
        if q.explain and found.weights is not None:
            notes = [explanation(snap, int(r), names, found.weights[b, c]) for c, r in enumerate(rows)]
        items = [RecommendedRow(snap.ids[r], float(s), e) for r, s, e in zip(rows, scores, notes, strict=True)]
        out.append(Recommendation(items=items, exact=bool(found.user_exact[b]), model_version=snap.model.version))
    return out


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


def similar(snap: Snapshot, row: int, k: int, explain: bool, metrics: Metrics) -> Recommendation:
    """The exact top-k items for an item's own query vector (:func:`item_query`), the item itself excluded."""
    query = Query(history=np.empty(0, dtype=np.int64), k=k, exclude={row}, explain=explain)
    return search(snap, item_query(snap, row), k, [query], metrics, stage="similar")[0]


def explanation(snap: Snapshot, row: int, names: tuple[str, ...], weights: np.ndarray) -> dict[str, Any]:
    """Text/image weights of an item for this user and the interest cluster of the leading modality (MISSRec)."""
    w = {name: float(weights[j]) for j, name in enumerate(names)}
    lead = max(w, key=lambda m: w[m])
    cluster = snap.clusters.get(lead)
    return {
        "text_weight": w.get("text", 0.0),
        "image_weight": w.get("image", 0.0),
        "interest": int(cluster[row]) if cluster is not None else None,
    }


def popular(snap: Snapshot, q: Query) -> Recommendation:
    """Fallback for an empty history: the most popular live items (bundle popularity), then ingested ones."""
    model = snap.model
    n_bundle = model.bundle.table.num_items
    picked: list[int] = []
    for r in itertools.chain(model.popular_order, range(n_bundle, snap.n)):
        if not snap.deleted[r] and r not in q.exclude:
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
