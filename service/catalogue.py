"""The live catalogue: immutable snapshots of the servable items, published by a single writer.

Readers (the event loop's id lookups, the micro-batch thread's searches) take ``catalogue.current`` and never
lock: a :class:`Snapshot` never changes. Writers (ingest, delete, item-stream events, a model swap) serialise on
one lock, build the next snapshot and swap the reference.

Rows: the bundle's rows first, then cold-start items appended in order. Re-ingesting an id appends a new row and
tombstones the old one; deleting tombstones the row. Row r is the FAISS id and the internal item id. Item arrays
are append-only segments: the bundle's array (memory-mapped read-only by the service) is kept as it is, never
copied, and appended rows go to a separate growable buffer; a snapshot holds views of rows [0, n) (the bundle array
alone, or a :class:`~serving_core.rows.RowStack` of it and a view of the appended rows), which later appends never
touch (a grown buffer is a new buffer; the old views keep the old one alive). The deleted mask and the id overlay
are copied per write.
The FAISS index is never mutated: rows past ``index_rows`` (the tail) are scored exactly for every query, and a
tail longer than ``compact_rows`` is folded into a copy of the index, published with the next snapshot.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from service.serving_model import IncompatibleItem, ServingModel
from service.store import ItemRecord
from serving_core.attributes import AttributeIndex
from serving_core.bundle import MISSREC_FUSION, static_vectors
from serving_core.compact import widened
from serving_core.index import to_cpu, to_device
from serving_core.rows import RowStack, Segment
from serving_core.scoring import ItemScorer, measured_max_gap
from serving_core.towers import ItemArrays

log = logging.getLogger(__name__)

DEFAULT_COMPACT_ROWS = 4096


@dataclass(frozen=True)
class Snapshot:
    """One immutable state of the catalogue over one :class:`ServingModel`."""

    model: ServingModel
    seq: int  # catalogue version: +1 per published change
    n: int  # rows, padding and tombstones included
    ids: list[str]  # shared, append-only: only ids[:n] belong to this snapshot
    texts: list[str]  # shared, append-only, like ids
    overlay: dict[str, int]  # ingested or deleted id -> row (own copy; 0 for a tombstone without a row); other
    # bundle ids resolve through the bundle's table
    deleted: np.ndarray  # (n,) bool, own copy; row 0 (padding) is always deleted
    ingested: dict[str, ItemRecord]  # live ingested items (own copy)
    # The item arrays: rows [0, n), each the bundle's array (memory-mapped by the service) while nothing was
    # appended, else a RowStack of it and the appended rows (row gathers and row slices, like an ndarray)
    tokens: np.ndarray | RowStack  # (n, T) what the user tower gathers
    vectors: dict[str, np.ndarray | RowStack]  # name -> (n, D)
    clusters: dict[str, np.ndarray | RowStack]  # modality -> (n,) (MISSRec)
    id_vectors: np.ndarray | RowStack | None  # (n, D), transductive MISSRec (cold items: zero rows)
    index: Any  # FAISS index over rows [0, index_rows)
    index_rows: int
    max_gap: float
    attrs: AttributeIndex  # attributes and availability of rows [0, n)
    patched: dict[str, ItemRecord]  # bundle items whose attributes or availability were set (own copy)
    hidden: np.ndarray  # (n,) bool: deleted or unavailable, what the search never returns
    half: dict[str, np.ndarray | RowStack] | None = None  # float16 copies read by the re-scoring (None: float32)
    half_stats: dict[str, dict[str, float]] | None = None  # their error bounds, covering the appended rows too

    # ----- ids --------------------------------------------------------------------------------------------
    def _known_row(self, item_id: str) -> int | None:
        """The row an id points at in this snapshot, live or tombstoned; None for an id it never saw."""
        r = self.overlay.get(item_id)
        return self.model.bundle_rows.get(item_id) if r is None else r

    def row(self, item_id: str) -> int | None:
        """The live row of an external id, or None (unknown or deleted)."""
        r = self._known_row(item_id)
        return None if r is None or self.deleted[r] else r

    def was_deleted(self, item_id: str) -> bool:
        """True for an id this snapshot knows was deleted (its row is tombstoned, or a tombstone without a row)."""
        r = self._known_row(item_id)
        return r is not None and bool(self.deleted[r])

    def rows_for(self, item_ids: Iterable[str]) -> tuple[list[int], list[str]]:
        """Live rows of external ids, and the ids that are unknown or deleted."""
        rows, unknown = [], []
        for item in item_ids:
            r = self.row(item)
            if r is None:
                unknown.append(item)
            else:
                rows.append(r)
        return rows, unknown

    @property
    def live_count(self) -> int:
        return int(self.n - self.deleted.sum())

    @property
    def num_ingested(self) -> int:
        return len(self.ingested)

    @property
    def num_deleted(self) -> int:
        return int(self.deleted[1 : self.model.bundle.table.num_items].sum())

    @property
    def deleted_ids(self) -> int:
        """Ids deleted (bundle or ingested) and not ingested again since."""
        return sum(1 for r in self.overlay.values() if self.deleted[r])

    # ----- what the search reads -----------------------------------------------------------------------------
    def item_arrays(self) -> ItemArrays:
        return ItemArrays(tokens=self.tokens, clusters=self.clusters)

    def scorer(self) -> ItemScorer:
        scorer = self.model.manifest.scorer
        return ItemScorer(scorer, self.vectors, self.id_vectors, self.max_gap, self.half, self.half_stats)

    def item_info(self, item_id: str) -> dict[str, Any] | None:
        row = self.row(item_id)
        if row is None:
            return None
        record = self.ingested.get(item_id)
        return {
            "item_id": item_id,
            "source": "ingested" if record else "bundle",
            "text": self.texts[row],
            "version": record.version if record else None,
            "text_cluster": int(self.clusters["text"][row]) if "text" in self.clusters else None,
            "image_cluster": int(self.clusters["image"][row]) if "image" in self.clusters else None,
            "created_at": record.created_at if record else None,
            "has_image": bool(record and record.thumbnail),
            "attributes": dict(self.attrs.of(row)),
            "available": self.attrs.is_available(row),
        }

    def search_text(self, query: str, limit: int) -> tuple[list[int], int]:
        """Live rows whose id or text contains every word of ``query`` (case-insensitive), and how many match.

        A linear scan (a console and debugging aid, not a search engine): an exact id first, then rows whose
        text holds the whole query as a phrase, then the others, each in row order."""
        words = query.casefold().split()
        phrase = " ".join(words)
        exact = self.row(query.strip())
        ranked: tuple[list[int], list[int]] = ([], [])
        for r in range(1, self.n):
            if self.deleted[r] or r == exact:
                continue
            hay = f"{self.ids[r]} {self.texts[r]}".casefold()
            if all(w in hay for w in words):
                ranked[phrase not in hay].append(r)
        rows = ([exact] if exact is not None else []) + ranked[0] + ranked[1]
        return rows[:limit], len(rows)


class Catalogue:
    """The single writer of snapshots. ``current`` is safe to read from any thread at any time."""

    def __init__(self, model: ServingModel, compact_rows: int = DEFAULT_COMPACT_ROWS) -> None:
        self._lock = threading.Lock()
        self.compact_rows = compact_rows
        self.versions: dict[str, int] = {}  # item id -> version of the latest change applied here
        self.followers: list[Catalogue] = []  # catalogues of other models kept in step (a shadow candidate)
        self._current = self._fresh(model, 0)

    def _fresh(self, model: ServingModel, seq: int) -> Snapshot:
        """Publish the bundle alone as snapshot ``seq`` (new segments over the bundle's arrays)."""
        snap = self._bundle_only(model, seq)
        self._current = snap  # one reference assignment: readers see the old or the new snapshot, whole
        return snap

    def _bundle_only(self, model: ServingModel, seq: int) -> Snapshot:
        """The bundle alone as snapshot ``seq`` over new segments, not published (readers keep the current one:
        its views hold the old segments' buffers)."""
        table = model.bundle.table
        n = table.num_items
        self._ids, self._texts = list(table.ids), list(table.texts) if table.texts is not None else [""] * n
        self._tokens = Segment(table.tokens)
        self._vectors = {name: Segment(v) for name, v in table.vectors.items()}
        self._clusters = {m: Segment(c) for m, c in table.clusters.items()}
        self._id_vectors = Segment(table.id_vectors) if table.id_vectors is not None else None
        self._half = {name: Segment(a) for name, a in table.half.items()} if model.rescore_half else {}
        self._half_stats = {name: model.manifest.rescore_vectors[name] for name in self._half}
        deleted = np.zeros(n, dtype=bool)
        deleted[0] = True  # padding is never recommended
        index_info = model.manifest.index
        gap = index_info.max_gap if index_info is not None else 2.0
        return self._snapshot(model, seq, deleted, {}, {}, model.index, n, gap, model.attributes, {})

    def _snapshot(
        self,
        model: ServingModel,
        seq: int,
        deleted: np.ndarray,
        overlay: dict[str, int],
        ingested: dict[str, ItemRecord],
        index: Any,
        index_rows: int,
        max_gap: float,
        attrs: AttributeIndex,
        patched: dict[str, ItemRecord],
    ) -> Snapshot:
        n = self._tokens.n
        hidden = deleted | attrs.unavailable_mask() if attrs.unavailable else deleted
        return Snapshot(
            model=model,
            seq=seq,
            n=n,
            ids=self._ids,
            texts=self._texts,
            overlay=overlay,
            deleted=deleted,
            ingested=ingested,
            tokens=self._tokens.view(n),
            vectors={k: s.view(n) for k, s in self._vectors.items()},
            clusters={k: s.view(n) for k, s in self._clusters.items()},
            id_vectors=self._id_vectors.view(n) if self._id_vectors is not None else None,
            index=index,
            index_rows=index_rows,
            max_gap=max_gap,
            attrs=attrs,
            patched=patched,
            hidden=hidden,
            half={k: s.view(n) for k, s in self._half.items()} if self._half else None,
            half_stats=dict(self._half_stats) if self._half else None,
        )

    @property
    def current(self) -> Snapshot:
        return self._current

    def reset(self) -> Snapshot:
        """Back to the bundle alone (Redis lost item state: the caller replays what Redis holds now)."""
        with self._lock:
            self.versions = {}
            for follower in self.followers:
                follower.reset()
            return self._fresh(self._current.model, self._current.seq + 1)

    def changes(self) -> list[ItemRecord]:
        """Every item change this catalogue holds, as records in version order: the live ingested items, the
        patched bundle items and a tombstone per deleted id."""
        snap = self._current
        tombstones = [ItemRecord(item_id=i, version=v, deleted=True) for i, v in self.versions.items()
                      if i not in snap.ingested and i not in snap.patched]  # fmt: skip
        return sorted([*snap.ingested.values(), *snap.patched.values(), *tombstones], key=lambda r: r.version)

    def follow(self, other: Catalogue) -> None:
        """Keep ``other`` (over another model) in step: it gets every change applied here so far, then each
        one applied from now on. Raises :class:`IncompatibleItem` when ``other`` cannot serve a stored item."""
        with self._lock:
            other.apply(self.changes())
            self.followers.append(other)

    def unfollow(self, other: Catalogue) -> None:
        with self._lock:
            if other in self.followers:
                self.followers.remove(other)

    def is_newer(self, item_id: str, version: int) -> bool:
        return version > self.versions.get(item_id, 0)

    def apply(self, records: list[ItemRecord]) -> int:
        """Apply stored item changes (ingest or delete) newer than what this replica has; returns how many.

        Raises :class:`IncompatibleItem` (and applies none of ``records``) when one cannot be served."""
        with self._lock:
            snap = self._current
            for record in records:
                if problem := snap.model.record_problem(record):
                    raise IncompatibleItem(problem)
            fresh = [r for r in sorted(records, key=lambda r: r.version) if self.is_newer(r.item_id, r.version)]
            if not fresh:
                return 0
            embedded = [r for r in fresh if not r.deleted and not r.bundle_patch]
            self._current = self._applied(snap, fresh, snap.model.vectors_of_many(embedded))
            for follower in self.followers:  # never fails the change: the serving catalogue has it already
                try:
                    follower.apply(fresh)
                except Exception:
                    log.exception(
                        "a following catalogue (%s) could not apply an item change", follower.current.model.version
                    )
            return len(fresh)

    def switch(self, model: ServingModel, prepared: dict[tuple[str, int], dict[str, np.ndarray]]) -> Snapshot:
        """Serve ``model`` from now on, with every item change applied so far (a bundle swap), in one publish.

        The live ingested items are served with ``prepared`` vectors (keyed by id and version: the new item tower
        run beforehand, outside the lock) or, for those that changed since, with vectors computed here; deletions
        carry over as tombstones. Raises :class:`IncompatibleItem` (and publishes nothing) when a live item cannot
        be served by ``model``."""
        with self._lock:
            snap = self._current
            changes = self.changes()  # live ingested records and tombstones, in version order
            live = [r for r in changes if not r.deleted and not r.bundle_patch]
            for record in live:
                if problem := model.record_problem(record):
                    raise IncompatibleItem(problem)
            vectors: dict[int, dict[str, np.ndarray]] = {}
            missing = []
            for record in live:
                vec = prepared.get((record.item_id, record.version))
                if vec is None:
                    missing.append(record)
                else:
                    vectors[id(record)] = vec
            vectors |= {id(r): v for r, v in zip(missing, model.vectors_of_many(missing), strict=True)}
            saved = (self._ids, self._texts, self._tokens, self._vectors, self._clusters, self._id_vectors, self._half,
                     self._half_stats)  # fmt: skip
            try:
                base = self._bundle_only(model, snap.seq)
                new = self._applied(base, changes, [vectors[id(r)] for r in live])
            except BaseException:  # nothing published: the segments go back to the ones the current snapshot uses
                (self._ids, self._texts, self._tokens, self._vectors, self._clusters, self._id_vectors, self._half,
                 self._half_stats) = saved  # fmt: skip
                raise
            self._current = new
            deleted = sum(r.deleted for r in changes)
            log.info("switched to bundle %s: %d ingested items, %d deleted", model.version, len(live), deleted)
            return new

    def _applied(self, snap: Snapshot, fresh: list[ItemRecord], vectors: list[dict[str, np.ndarray]]) -> Snapshot:
        """``snap`` with ``fresh`` (in version order; ``vectors`` of its ingested records, in order) applied: the
        next snapshot, not published. An attribute or availability change (a bundle item's patch, or an ingested
        record with the vectors it had) keeps the item's row: nothing is re-embedded. Holds the lock."""
        model = snap.model
        live = iter(vectors)
        deleted_rows: list[int] = []
        state: dict[int, tuple[dict, bool]] = {}  # rows whose attributes or availability are set
        overlay, ingested, gap = dict(snap.overlay), dict(snap.ingested), snap.max_gap
        patched = dict(snap.patched)
        for record in fresh:
            self.versions[record.item_id] = record.version
            old = overlay.get(record.item_id, model.bundle_rows.get(record.item_id))
            if record.bundle_patch:  # a bundle item (a bundle without it: kept for the next swap)
                patched[record.item_id] = record
                if old is not None:
                    state[old] = (record.attributes, record.available)
                continue
            patched.pop(record.item_id, None)
            vec = None if record.deleted else next(live)
            previous = ingested.get(record.item_id)
            if record.patch and previous is not None and old is not None and previous.same_embedding(record):
                ingested[record.item_id] = record
                state[old] = (record.attributes, record.available)
                continue
            if old is not None:
                deleted_rows.append(old)
            if vec is None:  # a tombstone: the id keeps pointing at a deleted row (row 0 if it had none)
                ingested.pop(record.item_id, None)
                overlay[record.item_id] = old if old is not None else 0
                continue
            overlay[record.item_id] = row = self._append(record, vec)
            state[row] = (record.attributes, record.available)
            ingested[record.item_id] = record
            gap = self._widened_gap(model, vec, gap)
        deleted = np.zeros(self._tokens.n, dtype=bool)
        deleted[: snap.n] = snap.deleted
        deleted[deleted_rows] = True
        index, index_rows = snap.index, snap.index_rows
        if self._tokens.n - index_rows > self.compact_rows:
            index, index_rows = self._compacted(snap, index_rows)
        attrs = snap.attrs.changed(self._tokens.n, state)
        return self._snapshot(model, snap.seq + 1, deleted, overlay, ingested, index, index_rows, gap, attrs, patched)

    def _append(self, record: ItemRecord, vec: dict[str, np.ndarray]) -> int:
        row = self._tokens.n
        self._tokens.append(vec["tokens"][None])
        for name, seg in self._vectors.items():
            seg.append(vec[name][None])
        for m, seg in self._clusters.items():
            seg.append(np.array([vec[f"{m}_cluster"]], dtype=np.int64))
        if self._id_vectors is not None:  # a cold item has no trained ID: ID-less scoring
            self._id_vectors.append(np.zeros((1, self._id_vectors.base.shape[1]), dtype=np.float32))
        for name, seg in self._half.items():  # float16 copies, their error bound widened to cover the new row
            row32 = vec[name][None] if name in vec else np.zeros((1, seg.base.shape[1]), dtype=np.float32)
            seg.append(row32.astype(np.float16))
            self._half_stats[name] = widened(self._half_stats[name], row32)
        self._ids.append(record.item_id)
        self._texts.append(record.text)
        return row

    @staticmethod
    def _widened_gap(model: ServingModel, vec: dict[str, np.ndarray], gap: float) -> float:
        """Keep the retrieval bound valid for a new item: max_gap covers every row, cold ones included."""
        scorer = model.manifest.scorer
        if len(scorer.modalities) != 2 or scorer.kind != MISSREC_FUSION:
            return gap
        new = measured_max_gap(scorer, {m: vec[m][None] for m in scorer.modalities})
        return max(gap, min(new * (1 + 1e-6), 2.0))

    def _compacted(self, snap: Snapshot, index_rows: int) -> tuple[Any, int]:
        """A copy of the index with the tail rows added (readers keep searching the old one meanwhile)."""
        import faiss

        n = self._tokens.n
        scorer = snap.model.manifest.scorer
        vectors = {k: s.rows(index_rows, n) for k, s in self._vectors.items()}
        ids = self._id_vectors.rows(index_rows, n) if self._id_vectors is not None else None
        cpu = faiss.clone_index(to_cpu(snap.index))
        cpu.add(np.ascontiguousarray(static_vectors(scorer, vectors, ids), dtype=np.float32))
        gpu = type(snap.index).__name__.startswith("Gpu")
        log.info("folded %d ingested rows into the index (%d rows)", n - index_rows, n)
        return (to_device(cpu, "gpu") if gpu else cpu), n
