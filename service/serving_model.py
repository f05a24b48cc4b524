"""The loaded model: one bundle's towers, FAISS index and scorer, frozen after loading (no torch).

A :class:`ServingModel` never changes once built; the live catalogue (service.catalogue) builds its snapshots
over one, and a model swap is a new ServingModel in a new snapshot. It also turns raw item features into the
vectors of a stored item record (cold start) and says whether a stored record can be served by this bundle.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from service.settings import Settings
from service.store import ItemRecord
from serving_core.attribute_schema import InvalidAttributes
from serving_core.attributes import AttributeIndex, read_attributes
from serving_core.bundle import MISSREC_FUSION, Bundle, BundleError, Manifest, read_bundle
from serving_core.index import is_ivf, load_index
from serving_core.topk import SearchOptions, is_exact_index
from serving_core.towers import Towers, open_towers

if TYPE_CHECKING:
    from clip_features.preprocess import ImageInput, ItemEncoder

log = logging.getLogger(__name__)


REEMBED_BATCH = 256  # records per item-tower call when another bundle's items are re-embedded


class IncompatibleItem(ValueError):
    """An item stored in Redis that this bundle cannot serve (vector sizes of another model, or corrupt)."""


@dataclass(frozen=True)
class ServingModel:
    bundle: Bundle
    towers: Towers
    index: Any  # FAISS index over the bundle rows' static vectors; never mutated once loaded
    options: SearchOptions
    popular_order: np.ndarray  # bundle rows by training popularity, most popular first (row 0 last)
    bundle_rows: dict[str, int]  # external id -> row of the bundle's items (row 0, padding, excluded)
    version: str
    attributes: AttributeIndex  # the bundle rows' attributes (items/attributes.jsonl; none: every row {})
    rescore_half: bool = False  # the re-scoring reads the bundle's float16 copies first (MISSREC_RESCORE_DTYPE)

    @classmethod
    def load(cls, root: Path, settings: Settings) -> ServingModel:
        """Read and check the bundle (checksums, shapes, index), open the towers and the index. The item arrays are
        memory-mapped read-only unless ``settings.mmap_items`` is off (the catalogue never copies them)."""
        bundle = read_bundle(root, mmap=settings.mmap_items, half=settings.rescore_dtype != "float32")
        towers = open_towers(
            bundle, settings.onnx_provider, settings.onnx_threads, settings.onnx_spinning, settings.onnx_optimisation
        )
        try:
            index, info = load_index(root, bundle.manifest, settings.faiss_device, settings.index_params)
        except BundleError:
            raise
        except ValueError as exc:  # a search parameter that does not apply to this index
            raise BundleError(f"MISSREC_INDEX_PARAMS: {exc}") from None
        exact = is_exact_index(index)
        cap = None if exact else settings.max_candidates
        # An IVF search scans the same nprobe lists whatever the width: one search of the whole cap beats widening
        # 32 -> 128 -> 512 -> 1024 (4 scans; measured in docs/benchmarks.md). HNSW's cost grows with the width.
        width = cap if cap and is_ivf(index) else None
        try:
            base = read_attributes(root, bundle.manifest.attributes, bundle.table.num_items)
        except InvalidAttributes as exc:
            raise BundleError(str(exc)) from None
        has_half = bool(bundle.manifest.rescore_vectors)  # (not loaded with MISSREC_RESCORE_DTYPE=float32)
        if settings.rescore_dtype == "float16" and not has_half:
            raise BundleError(
                "MISSREC_RESCORE_DTYPE=float16 but the bundle has no float16 copies of its item vectors "
                "(items/*.f16.npy): write them with `missrec build-index --bundle BUNDLE`, or set auto or float32"
            )
        popularity = bundle.table.popularity.astype(np.float64).copy()
        popularity[0] = -np.inf
        log.info("loaded bundle %s: %d items, index %s, float16 copies: %s", root, bundle.table.num_items,
                 info.factory, "yes" if has_half else "no")  # fmt: skip
        return cls(
            bundle=bundle,
            towers=towers,
            index=index,
            options=SearchOptions(exact_index=exact, max_candidates=cap, initial_width=width),
            popular_order=np.argsort(-popularity, kind="stable"),
            bundle_rows={item: r for r, item in enumerate(bundle.table.ids) if r > 0},
            version=bundle.manifest.version,
            attributes=AttributeIndex.build(bundle.manifest.attributes, base),
            rescore_half=has_half and settings.rescore_dtype != "float32",
        )

    @property
    def manifest(self) -> Manifest:
        return self.bundle.manifest

    @property
    def max_len(self) -> int:
        return self.manifest.max_len

    @property
    def kind(self) -> str:
        return self.manifest.model_kind

    def feature_dim_expected(self) -> int:
        """The raw feature width every modality of the item tower takes (-1 when they differ)."""
        dims = {self.manifest.dims.feature(m) for m in self.manifest.modalities}
        return dims.pop() if len(dims) == 1 else -1

    # ----- cold-start items ----------------------------------------------------------------------------------
    def embed(self, encoder: ItemEncoder, item_id: str, text: str, image: ImageInput | None) -> ItemRecord:
        """CLIP features (open_clip or its ONNX graphs) -> item tower -> an ItemRecord to persist (worker thread).
        ``image``: bytes, or the picture the ingest path decoded (the encoders take either)."""
        feats = encoder.encode_item(text or None, image)
        out = self._item_tower({m: feats[m][None] for m in self.manifest.modalities})
        # every modality's raw features, not only this bundle's: a later bundle may take others (a swap re-embeds)
        arrays = {f"feature_{m}": feats[m].astype(np.float32).tobytes() for m in feats}
        arrays["tokens"] = out["tokens"][0].astype(np.float32).tobytes()
        for name in self.manifest.scorer.vector_names:
            arrays[f"vector_{name}"] = out[name][0].astype(np.float32).tobytes()
        ints = {f"{m}_cluster": int(out[f"{m}_cluster"][0]) for m in self._clustered}
        return ItemRecord(
            item_id=item_id, text=text, created_at=time.time(), bundle_version=self.version, arrays=arrays, ints=ints
        )

    @property
    def _clustered(self) -> tuple[str, ...]:
        return self.manifest.modalities if self.manifest.scorer.kind == MISSREC_FUSION else ()

    def _item_tower(self, feats: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.towers.item.encode(feats.get("text"), feats.get("image"))

    def vectors_of(self, record: ItemRecord) -> dict[str, np.ndarray]:
        """Token, vectors and clusters of a record; recomputed from its raw features if another bundle made it."""
        return self.vectors_of_many([record])[0]

    def vectors_of_many(self, records: list[ItemRecord], batch: int = REEMBED_BATCH) -> list[dict[str, np.ndarray]]:
        """:meth:`vectors_of` of every (live) record; the records another bundle wrote go through this bundle's
        item tower from their stored raw features, ``batch`` at a time."""
        out: list[dict[str, np.ndarray] | None] = [None] * len(records)
        foreign = [i for i, r in enumerate(records) if r.bundle_version != self.version]
        for start in range(0, len(foreign), batch):
            chunk = foreign[start : start + batch]
            for i, vec in zip(chunk, self._reembedded([records[i] for i in chunk]), strict=True):
                out[i] = vec
        for i, r in enumerate(records):
            if out[i] is None:
                out[i] = self._stored_vectors(r)
        return out  # type: ignore[return-value]

    def _reembedded(self, records: list[ItemRecord]) -> list[dict[str, np.ndarray]]:
        mods, names = self.manifest.modalities, self.manifest.scorer.vector_names
        raw = lambda r, m: np.frombuffer(r.arrays[f"feature_{m}"], dtype=np.float32)  # noqa: E731
        feats = {m: np.stack([raw(r, m) for r in records]) for m in mods}
        out = self._item_tower(feats)
        return [
            {"tokens": out["tokens"][j], **{n: out[n][j] for n in names}}
            | {f"{m}_cluster": np.int64(out[f"{m}_cluster"][j]) for m in self._clustered}
            for j in range(len(records))
        ]

    def _stored_vectors(self, record: ItemRecord) -> dict[str, np.ndarray]:
        names = self.manifest.scorer.vector_names
        dims = self.manifest.dims
        vec = {"tokens": np.frombuffer(record.arrays["tokens"], dtype=np.float32).reshape(dims.token)}
        for n in names:
            vec[n] = np.frombuffer(record.arrays[f"vector_{n}"], dtype=np.float32).reshape(dims.hidden)
        return vec | {f"{m}_cluster": np.int64(record.ints[f"{m}_cluster"]) for m in self._clustered}

    def swap_problem(self, encoder_dim: int | None, records: list[ItemRecord]) -> str | None:
        """Why this bundle cannot take over from the serving one, or None: the ingestion encoder's feature width
        (``None``: ingestion disabled) must be the one its item tower takes, and every live ingested item must
        carry raw features it can re-embed."""
        dims = self.manifest.dims
        if encoder_dim is not None:
            for m in self.manifest.modalities:
                if dims.feature(m) != encoder_dim:
                    return (
                        f"bundle {self.version} takes {dims.feature(m)}-d {m} features, the ingestion encoder gives "
                        f"{encoder_dim}-d: new items could not be embedded"
                    )
        for record in records:
            if problem := self.record_problem(record):
                return problem
        return None

    def record_problem(self, record: ItemRecord) -> str | None:
        """Why a stored item cannot be served by this bundle (wrong or missing vector sizes), or None.

        Records written by another bundle are re-encoded from their raw features, so only those must match;
        records of this bundle must also carry the token and vectors of this bundle's sizes."""
        if record.deleted or record.bundle_patch:
            return None
        dims = self.manifest.dims
        need = {f"feature_{m}": dims.feature(m) for m in self.manifest.modalities}
        if record.bundle_version == self.version:
            need |= {"tokens": dims.token} | {f"vector_{n}": dims.hidden for n in self.manifest.scorer.vector_names}
            missing = [f"{m}_cluster" for m in self._clustered if f"{m}_cluster" not in record.ints]
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
