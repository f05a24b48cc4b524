"""The recommend path: a live item table over the bundle, the FAISS index, the towers, exact fused top-k.

No torch here (ONNX Runtime + FAISS + numpy). All CPU work runs in worker threads; one lock serialises table
mutations (ingest/delete) against searches, so a search never sees a half-added item.

Live item table: the bundle's rows first, then cold-start items appended in order. Re-ingesting an id appends
a new row and tombstones the old one; deleting tombstones the row. Row r is the FAISS id and internal item id.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from index_builder.build import load_index
from index_builder.bundle import BundleError, ItemTable, Manifest
from index_builder.retrieval import fused_topk, is_exact_index
from index_builder.towers import ItemArrays, Towers, load_towers
from service.metrics import Metrics
from service.settings import Settings
from service.store import ItemRecord

log = logging.getLogger(__name__)


class IncompatibleItem(ValueError):
    """An item stored in Redis that this bundle cannot serve (vector sizes of another model, or corrupt)."""


@dataclass
class Query:
    history: np.ndarray  # (L,) internal ids, oldest first; empty = no history
    k: int
    exclude: set[int] = field(default_factory=set)
    explain: bool = False


@dataclass
class RecommendedRow:
    item_id: str
    score: float
    explanation: dict[str, Any] | None = None


@dataclass
class Recommendation:
    items: list[RecommendedRow]
    exact: bool
    fallback: str | None = None


class Growable:
    """A numpy array with amortised O(1) appends along axis 0; ``view`` is the live part."""

    def __init__(self, initial: np.ndarray) -> None:
        self._data = initial.copy()
        self.n = initial.shape[0]

    def append(self, rows: np.ndarray) -> None:
        need = self.n + rows.shape[0]
        if need > self._data.shape[0]:
            grown = np.zeros((max(need, 2 * self._data.shape[0]), *self._data.shape[1:]), dtype=self._data.dtype)
            grown[: self.n] = self._data[: self.n]
            self._data = grown
        self._data[self.n : need] = rows
        self.n = need

    @property
    def view(self) -> np.ndarray:
        return self._data[: self.n]


class Engine:
    """Everything the recommend path needs, loaded from one bundle."""

    def __init__(
        self, towers: Towers, index: Any, index_info: dict[str, Any], settings: Settings, metrics: Metrics
    ) -> None:
        self.manifest: Manifest = towers.manifest
        self.towers = towers
        self.fusion = towers.manifest.fusion_params
        self.index = index
        self.index_exact = is_exact_index(index)
        self.max_candidates = None if self.index_exact else settings.max_candidates
        # An IVF search scans the same nprobe lists whatever the width: one search of the whole cap beats widening
        # 32 -> 128 -> 512 -> 1024 (4 scans; measured in docs/benchmarks.md). HNSW's cost grows with the width.
        ivf = "IVF" in str(index_info.get("factory", ""))
        self.initial_width = self.max_candidates if ivf and self.max_candidates else None
        # max_i ||t_i - v_i|| over the table: the tight fusion bound of the exactness proof. Cold items can only
        # raise it (see _append), never lower it.
        self.max_gap = float(index_info.get("retrieval", {}).get("max_gap", 2.0))
        self.metrics = metrics
        self.settings = settings
        table: ItemTable = towers.table
        self.modalities = self.manifest.modalities
        self.ids: list[str] = list(table.ids)
        self.row_of: dict[str, int] = {item: r for r, item in enumerate(self.ids) if r > 0}
        self.n_bundle = len(self.ids)
        self.tokens = Growable(table.tokens)
        self.vectors = {m: Growable(v) for m, v in table.vectors.items()}
        self.clusters = {m: Growable(c) for m, c in table.clusters.items()}
        self.id_vectors = Growable(table.id_vectors) if table.id_vectors is not None else None
        self.deleted = Growable(np.zeros(self.n_bundle, dtype=bool))
        self.deleted._data[0] = True  # padding is never recommended
        self.texts: list[str] = list(table.texts) if table.texts is not None else [""] * self.n_bundle
        self.versions: dict[str, int] = {}
        self.ingested: dict[str, ItemRecord] = {}
        popularity = table.popularity.copy()
        popularity[0] = -np.inf
        self.popular_order = np.argsort(-popularity, kind="stable")  # bundle rows by popularity
        self.lock = threading.RLock()
        self.metrics.live_items.set(self.live_count())

    @classmethod
    def load(cls, bundle: Path, settings: Settings, metrics: Metrics) -> Engine:
        towers = load_towers(bundle, settings.onnx_provider, settings.onnx_threads)
        try:
            index, info = load_index(bundle, settings.faiss_device, settings.index_params)
        except ValueError as exc:  # a search parameter that does not apply to this index
            raise BundleError(f"MISSREC_INDEX_PARAMS: {exc}") from None
        log.info("loaded bundle %s: %d items, index %s", bundle, towers.table.num_items, info.get("factory"))
        return cls(towers, index, info, settings, metrics)

    # ----- properties -----------------------------------------------------------------------------------
    @property
    def version(self) -> str:
        return self.manifest.version

    @property
    def max_len(self) -> int:
        return self.manifest.max_len

    def feature_dim_expected(self) -> int:
        dims = {self.manifest.dims[f"{m}_feature"] for m in self.modalities}
        return dims.pop() if len(dims) == 1 else -1

    def live_count(self) -> int:
        return int((~self.deleted.view).sum())

    # ----- ids ----------------------------------------------------------------------------------------------
    def rows_for(self, item_ids: list[str]) -> tuple[list[int], list[str]]:
        """Live rows of external ids, and the ids that are unknown or deleted."""
        rows, unknown = [], []
        with self.lock:
            for item in item_ids:
                row = self.row_of.get(item)
                if row is None or self.deleted.view[row]:
                    unknown.append(item)
                else:
                    rows.append(row)
        return rows, unknown

    def known_rows(self, item_ids: list[str]) -> list[int]:
        """Rows of the ids that are still live (histories may mention items deleted since)."""
        return self.rows_for(item_ids)[0]

    def has_item(self, item_id: str) -> bool:
        with self.lock:
            row = self.row_of.get(item_id)
            return row is not None and not self.deleted.view[row]

    def is_newer(self, item_id: str, version: int) -> bool:
        return version > self.versions.get(item_id, 0)

    def item_info(self, item_id: str) -> dict[str, Any] | None:
        with self.lock:
            row = self.row_of.get(item_id)
            if row is None or self.deleted.view[row]:
                return None
            record = self.ingested.get(item_id)
            clusters = {m: int(self.clusters[m].view[row]) for m in self.modalities}
            return {
                "item_id": item_id,
                "source": "ingested" if record else "bundle",
                "text": self.texts[row] if row < len(self.texts) else None,
                "version": record.version if record else None,
                "text_cluster": clusters.get("text"),
                "image_cluster": clusters.get("image"),
                "created_at": record.created_at if record else None,
            }

    # ----- cold-start items ----------------------------------------------------------------------------------
    def embed_item(self, encoder: Any, item_id: str, text: str, image: bytes | None) -> ItemRecord:
        """open_clip features -> item tower -> an ItemRecord ready to persist (runs in a worker thread)."""
        feats = encoder.encode_item(text or None, image)
        out = self.towers.item.encode(
            feats["text"][None] if "text" in self.modalities else None,
            feats["image"][None] if "image" in self.modalities else None,
        )
        arrays = {f"feature_{m}": feats[m].astype(np.float32).tobytes() for m in self.modalities}
        arrays["tokens"] = out["tokens"][0].astype(np.float32).tobytes()
        for m in self.modalities:
            arrays[f"vector_{m}"] = out[m][0].astype(np.float32).tobytes()
        ints = {f"{m}_cluster": int(out[f"{m}_cluster"][0]) for m in self.modalities}
        return ItemRecord(
            item_id=item_id, text=text, created_at=time.time(), bundle_version=self.version, arrays=arrays, ints=ints
        )

    def _vectors_of(self, record: ItemRecord) -> dict[str, np.ndarray]:
        """Token, vectors and clusters of a record; recomputed from its raw features if another bundle made it."""
        d = self.manifest.dims["hidden"]
        if record.bundle_version != self.version:
            feats = {m: np.frombuffer(record.arrays[f"feature_{m}"], dtype=np.float32)[None] for m in self.modalities}
            out = self.towers.item.encode(feats.get("text"), feats.get("image"))
            return {
                "tokens": out["tokens"][0],
                **{m: out[m][0] for m in self.modalities},
                **{f"{m}_cluster": np.int64(out[f"{m}_cluster"][0]) for m in self.modalities},
            }
        vec = {"tokens": np.frombuffer(record.arrays["tokens"], dtype=np.float32).reshape(d)}
        for m in self.modalities:
            vec[m] = np.frombuffer(record.arrays[f"vector_{m}"], dtype=np.float32).reshape(d)
            vec[f"{m}_cluster"] = np.int64(record.ints[f"{m}_cluster"])
        return vec

    def record_problem(self, record: ItemRecord) -> str | None:
        """Why a stored item cannot be served by this bundle (wrong or missing vector sizes), or None.

        Records written by another bundle version are re-encoded from their raw CLIP features, so only those
        must match; records of this version must also carry tokens and vectors of the hidden size."""
        if record.deleted:
            return None
        dims = self.manifest.dims
        need = {f"feature_{m}": int(dims[f"{m}_feature"]) for m in self.modalities}
        if record.bundle_version == self.version:
            need |= {"tokens": int(dims["hidden"])} | {f"vector_{m}": int(dims["hidden"]) for m in self.modalities}
            missing = [f"{m}_cluster" for m in self.modalities if f"{m}_cluster" not in record.ints]
            if missing:
                return f"stored item {record.item_id!r} has no {', '.join(missing)}"
        for name, size in need.items():
            raw = record.arrays.get(name)
            if raw is None or len(raw) != 4 * size:
                got = "missing" if raw is None else f"{len(raw) / 4:g}-d"
                return (
                    f"stored item {record.item_id!r} (written by bundle {record.bundle_version or '?'}): {name} is "
                    f"{got}, bundle {self.version} expects {size}-d"
                )
        return None

    def apply_records(self, records: list[ItemRecord]) -> int:
        """Apply stored item changes (ingest or delete) newer than what this replica has; returns how many.

        Raises :class:`IncompatibleItem` (and applies none of ``records``) when one cannot be served."""
        for record in records:
            if problem := self.record_problem(record):
                raise IncompatibleItem(problem)
        applied = 0
        with self.lock:
            for record in sorted(records, key=lambda r: r.version):
                if not self.is_newer(record.item_id, record.version):
                    continue
                self.versions[record.item_id] = record.version
                old = self.row_of.get(record.item_id)
                if old is not None:
                    self.deleted.view[old] = True
                if record.deleted:
                    self.ingested.pop(record.item_id, None)
                else:
                    self._append(record)
                applied += 1
            self.towers.user.replace_items(ItemArrays(self.tokens.view, {m: c.view for m, c in self.clusters.items()}))
            self.metrics.live_items.set(self.live_count())
        return applied

    def _append(self, record: ItemRecord) -> None:
        vec = self._vectors_of(record)
        row = self.tokens.n
        self.tokens.append(vec["tokens"][None])
        for m in self.modalities:
            self.vectors[m].append(vec[m][None])
            self.clusters[m].append(np.array([vec[f"{m}_cluster"]], dtype=np.int64))
        if self.id_vectors is not None:  # a cold item has no trained ID: ID-less scoring
            self.id_vectors.append(np.zeros((1, self.id_vectors.view.shape[1]), dtype=np.float32))
        self.deleted.append(np.array([False]))
        self.ids.append(record.item_id)
        self.texts.append(record.text)
        self.row_of[record.item_id] = row
        self.ingested[record.item_id] = record
        if len(self.modalities) == 2:  # keep the retrieval bound valid for the new item
            gap = float(np.linalg.norm(vec[self.modalities[0]] - vec[self.modalities[1]]))
            self.max_gap = max(self.max_gap, min(gap * (1 + 1e-6), 2.0))
        static = self._static_rows(row)
        self.index.add(static)
        if self.index.ntotal != self.tokens.n:
            raise RuntimeError(f"index has {self.index.ntotal} vectors, item table {self.tokens.n} rows")

    def _static_rows(self, row: int) -> np.ndarray:
        sl = slice(row, row + 1)
        table = ItemTable(
            ids=["x"],
            tokens=self.tokens.view[sl],
            vectors={m: v.view[sl] for m, v in self.vectors.items()},
            clusters={m: c.view[sl] for m, c in self.clusters.items()},
            popularity=np.zeros(1, np.float32),
            id_vectors=self.id_vectors.view[sl] if self.id_vectors is not None else None,
        )
        return np.ascontiguousarray(table.static_vectors(self.fusion), dtype=np.float32)

    # ----- recommend --------------------------------------------------------------------------------------------
    def recommend(self, queries: list[Query]) -> list[Recommendation | Exception]:
        """One micro-batch (runs in a worker thread)."""
        results: list[Recommendation | Exception] = [None] * len(queries)  # type: ignore[list-item]
        with self.lock:
            personal = [i for i, q in enumerate(queries) if q.history.size]
            for i, q in enumerate(queries):
                if not q.history.size:
                    results[i] = self._popular(q)
            if personal:
                with self.metrics.timed("user_tower"):
                    users = self.towers.user.encode([queries[i].history for i in personal])
                by_k: dict[int, list[int]] = {}
                for j, i in enumerate(personal):
                    by_k.setdefault(queries[i].k, []).append(j)
                for k, members in by_k.items():
                    self._search(
                        users[members],
                        k,
                        [queries[personal[j]] for j in members],
                        [personal[j] for j in members],
                        results,
                    )
        return results

    def _search(self, users: np.ndarray, k: int, queries: list[Query], slots: list[int], results: list[Any]) -> None:
        vectors = {m: v.view for m, v in self.vectors.items()}
        ids = self.id_vectors.view if self.id_vectors is not None else None
        explain = any(q.explain for q in queries)
        with self.metrics.timed("search"):
            found = fused_topk(
                users,
                k,
                self.index,
                vectors,
                self.fusion,
                id_vectors=ids,
                exclude=[q.exclude for q in queries],
                deleted=self.deleted.view,
                exact_index=self.index_exact,
                max_gap=self.max_gap,
                max_candidates=self.max_candidates,
                initial_width=self.initial_width,
                explain=explain,
            )
        for b, (q, slot) in enumerate(zip(queries, slots, strict=True)):
            rows, scores = found.row(b)
            notes = [None] * len(rows)
            if q.explain and found.weights is not None:
                notes = [self._explanation(int(r), found.weights[b, c]) for c, r in enumerate(rows)]
            results[slot] = Recommendation(
                items=[RecommendedRow(self.ids[r], float(s), e) for r, s, e in zip(rows, scores, notes, strict=True)],
                exact=bool(found.user_exact[b]),
            )

    def _explanation(self, row: int, weights: np.ndarray) -> dict[str, Any]:
        """Text/image fusion weights of an item for this user and the interest cluster of the leading modality."""
        w = {m: float(weights[j]) for j, m in enumerate(self.modalities)}
        lead = max(w, key=lambda m: w[m])
        return {
            "text_weight": w.get("text", 0.0),
            "image_weight": w.get("image", 0.0),
            "interest": int(self.clusters[lead].view[row]),
        }

    def _popular(self, q: Query) -> Recommendation:
        """Fallback for an empty history: the most popular live items (bundle popularity)."""
        dead = self.deleted.view
        picked: list[int] = []
        for r in itertools.chain(self.popular_order, range(self.n_bundle, self.tokens.n)):  # then ingested items
            if not dead[r] and r not in q.exclude:
                picked.append(int(r))
                if len(picked) == q.k:
                    break
        pop = self.towers.table.popularity
        items = [RecommendedRow(self.ids[r], float(pop[r]) if r < self.n_bundle else 0.0) for r in picked]
        return Recommendation(items=items, exact=True, fallback="popular")

    def warmup(self) -> None:
        """A max-shape batch through the user tower and the search before traffic."""
        size = self.settings.max_batch_size
        self.towers.user.warm_up(size)
        n = self.tokens.n
        history = (np.arange(self.max_len) % (n - 1) + 1).astype(np.int64)
        self.recommend([Query(history=history, k=min(100, n - 1)) for _ in range(min(size, 8))])
