"""The serving bundle contract: one directory, described and checksummed by a typed manifest.json.

The only owner of the format (with serving_core.manifest, its typed manifest): every writer (``model_export``,
``index_builder``, ``loadtest.scale_bundle``) goes through :class:`BundleWriter`, every reader (the service,
benchmarks) through :func:`read_bundle`. numpy and the standard library only (no torch, onnxruntime or faiss).

Layout::

    manifest.json          typed :class:`Manifest`: format version, model kind, dims, scorer, graphs, index, sha256s
    user_tower.onnx        graph inputs/outputs named in manifest.graphs["user"]
    item_tower.onnx        graph inputs/outputs named in manifest.graphs["item"]
    items/ids.json         external item ids, row r -> ids[r]; row 0 is padding ("")
    items/tokens.npy       float32 (N, T) what the user tower gathers per history position
    items/<v>.npy          float32 (N, D) item vectors: one per modality (missrec_fusion) or "item" (inner_product)
    items/<m>_cluster.npy  int64 (N,) interest cluster per modality (missrec_fusion; 1..K, 0 = padding)
    items/id_vectors.npy   float32 (N, D) normalised ID embeddings (transductive MISSRec only)
    items/<v>.f16.npy      optional float16 copies of the vector tables for re-scoring (serving_core.compact)
    items/popularity.npy   float32 (N,) training interaction counts (fallback for users without history)
    items/texts.json       optional item texts
    centroids.npy          float32 (K + 1, D) interest centroids, row 0 = padding (missrec_fusion only)
    index/index.faiss      FAISS index over the static retrieval vectors (written by build-index; described
                           once, in manifest.index)

Row r of every item array is internal item id r; it is also the FAISS id.

Scorers (data, so a new tower needs no service change):

- ``missrec_fusion`` (MISSRec's dynamic fusion, spec section 5): score_i = u . static_i + c (s_i - m_i) with
  |c (s_i - m_i)| <= c tanh(|alpha|); static_i = (t_i + v_i) / 2, c = 1 (inductive), (e_i + t_i + v_i) / 3,
  c = 2/3 (transductive), c = 0 with one modality. The index ranks by u . static_i; candidates are re-scored exactly.
- ``inner_product``: score_i = u . x_i with x_i = items/item.npy: the index itself is exact (bound 0). Optional
  ``blocks`` name contiguous slices of x (e.g. a text and an image part) whose partial inner products explain a score.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import mmap as _mmap
import os
import platform
import tempfile
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from serving_core.compact import half_path
from serving_core.manifest import (
    FORMAT,
    FORMAT_VERSION,
    INDEX_DIR,
    INDEX_FILE,
    INNER_PRODUCT,
    ITEM_TOWER,
    ITEM_VECTOR,
    MANIFEST,
    MISSREC_FUSION,
    MODALITIES,
    REBUILD_HINT,
    SCORERS,
    USER_TOWER,
    Block,
    BundleError,
    Dims,
    FileEntry,
    Fusion,
    Graph,
    IndexInfo,
    Manifest,
    Scorer,
)

__all__ = [  # the contract's names, importable from here (the typed manifest lives in serving_core.manifest)
    "FORMAT", "FORMAT_VERSION", "INDEX_DIR", "INDEX_FILE", "INNER_PRODUCT", "ITEM_TOWER", "ITEM_VECTOR", "MANIFEST",
    "MISSREC_FUSION", "MODALITIES", "SCORERS", "USER_TOWER", "Block", "Bundle", "BundleError", "BundleWriter", "Dims",
    "FileEntry", "Fusion", "Graph", "IndexInfo", "ItemTable", "Manifest", "Scorer", "creation_info", "read_bundle",
    "read_centroids", "read_item_table", "read_manifest", "sha256_file", "static_vectors", "verify_checksums",
]  # fmt: skip


# ----- the item table ----------------------------------------------------------------------------------------------
@dataclass
class ItemTable:
    """The arrays under items/ (see the module docstring); row 0 is padding."""

    ids: list[str]
    tokens: np.ndarray
    vectors: dict[str, np.ndarray]
    clusters: dict[str, np.ndarray]
    popularity: np.ndarray
    id_vectors: np.ndarray | None = None
    texts: list[str] | None = None
    half: dict[str, np.ndarray] = field(default_factory=dict)  # float16 copies by table name (may be empty)

    @property
    def num_items(self) -> int:
        return len(self.ids)

    def half_tables(self) -> dict[str, np.ndarray]:  # the tables a float16 copy stands for: vectors, id_vectors
        return {**self.vectors, **({"id_vectors": self.id_vectors} if self.id_vectors is not None else {})}

    def validate(self, dims: Dims, scorer: Scorer, num_interests: int) -> None:
        n = self.num_items
        if self.ids and self.ids[0] != "":
            raise BundleError("item row 0 is padding and must have the empty id")
        if len(set(self.ids)) != n:
            raise BundleError("external item ids must be unique")
        _check(self.tokens, (n, dims.token), np.float32, "items/tokens.npy")
        _check(self.popularity, (n,), np.float32, "items/popularity.npy")
        names = scorer.vector_names
        if set(self.vectors) != set(names):
            raise BundleError(f"item vectors must be exactly {names}, got {sorted(self.vectors)}")
        for name in names:
            _check(self.vectors[name], (n, dims.hidden), np.float32, f"items/{name}.npy")
        clustered = scorer.modalities if scorer.kind == MISSREC_FUSION else ()
        if set(self.clusters) != set(clustered):
            raise BundleError(f"item clusters must cover exactly {clustered}, got {sorted(self.clusters)}")
        for m in clustered:
            _check(self.clusters[m], (n,), np.int64, f"items/{m}_cluster.npy")
            c = self.clusters[m]
            if c[0] != 0 or (c[1:] < 1).any() or (c > num_interests).any():
                raise BundleError(f"items/{m}_cluster.npy: ids must be in 1..{num_interests} (0 only for padding)")
        if scorer.transductive != (self.id_vectors is not None):
            raise BundleError("items/id_vectors.npy must exist exactly for transductive MISSRec bundles")
        if self.id_vectors is not None:
            _check(self.id_vectors, (n, dims.hidden), np.float32, "items/id_vectors.npy")
        if self.texts is not None and len(self.texts) != n:
            raise BundleError("items/texts.json must have one entry per item row")
        if self.half and set(self.half) != set(self.half_tables()):
            raise BundleError(f"float16 copies must cover {sorted(self.half_tables())}, got {sorted(self.half)}")
        for name, arr in self.half.items():
            _check(arr, (n, dims.hidden), np.float16, half_path(name))


def static_vectors(scorer: Scorer, vectors: dict[str, np.ndarray], id_vectors: np.ndarray | None = None) -> np.ndarray:
    """(N, D) float32 retrieval vectors: u . static_i is the score up to the scorer's bound (0: exact)."""
    if scorer.kind == INNER_PRODUCT:
        return np.ascontiguousarray(vectors[ITEM_VECTOR], dtype=np.float32)
    parts = [vectors[m] for m in scorer.modalities]
    if scorer.transductive:
        if id_vectors is None:
            raise BundleError("transductive bundle without items/id_vectors.npy")
        if len(parts) == 1:  # (e + 2 s_t) / 3
            return ((id_vectors + 2.0 * parts[0]) / 3.0).astype(np.float32)
        parts.append(id_vectors)
    return (np.sum(parts, axis=0) / len(parts)).astype(np.float32)


def _check(arr: np.ndarray, shape: tuple[int, ...], dtype: type, name: str) -> None:
    if arr.shape != shape:
        raise BundleError(f"{name}: shape {arr.shape}, expected {shape}")
    if arr.dtype != dtype:
        raise BundleError(f"{name}: dtype {arr.dtype}, expected {np.dtype(dtype)}")
    if np.issubdtype(arr.dtype, np.floating) and not _all_finite(arr):
        raise BundleError(f"{name}: contains NaN or inf")
    _drop_resident(arr)  # a mapped array: what the check read leaves the RSS now, not after every array is read


def _all_finite(arr: np.ndarray, chunk_bytes: int = 1 << 26) -> bool:
    """np.isfinite(arr).all() in row chunks of ~64 MB: no full-size temporary (a 1M x 300 table is 1.2 GB)."""
    if arr.ndim == 0:
        return bool(np.isfinite(arr))
    step = max(1, chunk_bytes // max(1, arr[:1].nbytes))
    return all(bool(np.isfinite(arr[i : i + step]).all()) for i in range(0, arr.shape[0], step))


def _drop_resident(arr: np.ndarray) -> None:
    """Unmap the pages of a read-only memory-mapped array from this process (they stay in the page cache and fault
    back in on access): what validating it read does not stay in the RSS. A no-op for other arrays."""
    mapping = getattr(arr, "_mmap", None)
    advice = getattr(_mmap, "MADV_DONTNEED", None)
    if isinstance(mapping, _mmap.mmap) and advice is not None:
        with contextlib.suppress(OSError, ValueError):  # unsupported: the pages go only under memory pressure
            mapping.madvise(advice)


# ----- files -------------------------------------------------------------------------------------------------------
def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _umask_mode() -> int:
    """0o666 minus the process umask: what a plain open() would create (NamedTemporaryFile uses 0o600)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp", encoding="utf-8") as fh:
        json.dump(data, fh, ensure_ascii=False)
        tmp = fh.name
    os.chmod(tmp, _umask_mode())
    os.replace(tmp, path)


def _save_npy(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npy")
    np.save(tmp, arr, allow_pickle=False)
    os.replace(tmp, path)


def _load_npy(root: Path, rel: str, mmap: bool = False) -> np.ndarray:
    path = root / rel
    if not path.is_file():
        raise BundleError(f"bundle file {rel} is missing")
    try:
        return np.load(path, allow_pickle=False, mmap_mode="r" if mmap else None)  # never unpickle
    except ValueError as exc:
        raise BundleError(f"{rel}: not a plain .npy array ({exc})") from None


def bundle_files(root: Path) -> list[str]:
    """Every regular file under root except the manifest, as sorted relative POSIX paths."""
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and p.name != MANIFEST)


def creation_info(tool: str, **extra: Any) -> dict[str, Any]:
    return {
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
        "by": tool,
        "python": platform.python_version(),
        "numpy": np.__version__,
        **extra,
    }


# ----- writing ------------------------------------------------------------------------------------------------------
class BundleWriter:
    """Writes the files of a bundle in ``root`` and, last, its manifest (every file listed with its sha256)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, rel: str) -> Path:
        target = self.root / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        return target

    def write_item_table(self, table: ItemTable) -> None:
        _write_json(self.path("items/ids.json"), table.ids)
        _save_npy(self.path("items/tokens.npy"), table.tokens)
        _save_npy(self.path("items/popularity.npy"), table.popularity)
        for name, vec in table.vectors.items():
            _save_npy(self.path(f"items/{name}.npy"), vec)
        for m, c in table.clusters.items():
            _save_npy(self.path(f"items/{m}_cluster.npy"), c)
        if table.id_vectors is not None:
            _save_npy(self.path("items/id_vectors.npy"), table.id_vectors)
        if table.texts is not None:
            _write_json(self.path("items/texts.json"), table.texts)

    def write_centroids(self, centroids: np.ndarray) -> None:
        _save_npy(self.path("centroids.npy"), centroids.astype(np.float32))

    def finalize(self, manifest: Manifest) -> Manifest:
        """Record size and sha256 of every file under root and write manifest.json atomically."""
        files = {
            rel: FileEntry(sha256_file(self.root / rel), (self.root / rel).stat().st_size)
            for rel in bundle_files(self.root)
        }
        manifest = replace(manifest, files=files, digest="")
        manifest = replace(manifest, digest=manifest.compute_digest())
        tmp = self.root / (MANIFEST + ".tmp")
        tmp.write_text(manifest.to_json(), encoding="utf-8")
        os.replace(tmp, self.root / MANIFEST)
        return manifest


# ----- reading ------------------------------------------------------------------------------------------------------
def _confined(root: Path, rel: str) -> None:
    """Refuse a bundle file that resolves outside the bundle directory (a symlink out of it, or through a linked
    folder), before anything is read from it: a bundle can name only its own files."""
    try:
        inside = (root / rel).resolve().is_relative_to(root.resolve())
    except (OSError, RuntimeError) as exc:  # a symlink loop
        raise BundleError(f"bundle file {rel}: {type(exc).__name__}") from None
    if not inside:
        raise BundleError(f"bundle file {rel} is a link out of the bundle directory {root}: refused (not read)")


def read_manifest(root: str | Path) -> Manifest:
    """The manifest of ``root``, checked: format, version (older ones are refused with how to rebuild), digest."""
    root = Path(root)
    path = root / MANIFEST
    if not path.is_file():
        raise BundleError(f"{root} is not a bundle: {MANIFEST} is missing")
    _confined(root, MANIFEST)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{path}: unreadable manifest ({exc})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        got = data.get("format") if isinstance(data, dict) else None
        raise BundleError(f"{path}: format {got!r}, expected {FORMAT!r}")
    version = data.get("format_version")
    if version != FORMAT_VERSION:
        if isinstance(version, int) and version < FORMAT_VERSION:
            raise BundleError(
                f"{path}: bundle format version {version} is older than the {FORMAT_VERSION} this code reads; "
                + REBUILD_HINT
            )
        raise BundleError(f"{path}: format version {version}, this code reads {FORMAT_VERSION}")
    try:
        manifest = Manifest.from_dict(data)
    except (TypeError, KeyError, ValueError) as exc:
        raise BundleError(f"{path}: malformed manifest ({exc})") from None
    if manifest.digest != manifest.compute_digest():
        raise BundleError(f"{path}: manifest digest mismatch (the manifest was edited or corrupted)")
    _check_manifest(manifest, path)
    return manifest


def _check_manifest(m: Manifest, path: Path) -> None:
    if m.scorer.kind not in SCORERS:
        raise BundleError(f"{path}: unknown scorer {m.scorer.kind!r} (this code serves {', '.join(SCORERS)})")
    for mod in m.modalities:
        if mod not in MODALITIES:
            raise BundleError(f"{path}: unknown modality {mod!r}")
    if set(m.dims.features) != set(m.modalities):
        raise BundleError(f"{path}: feature widths {sorted(m.dims.features)} do not match modalities {m.modalities}")
    for name in ("user", "item"):
        if name not in m.graphs:
            raise BundleError(f"{path}: no {name} tower graph")
    for b in m.scorer.blocks:
        if not 0 <= b.start < b.stop <= m.dims.hidden:
            raise BundleError(f"{path}: block {b.name} [{b.start}, {b.stop}) outside 0..{m.dims.hidden}")


def verify_checksums(root: str | Path, manifest: Manifest | None = None) -> Manifest:
    """Check that the files on disk are exactly the files in the manifest, with matching sha256."""
    root = Path(root)
    manifest = manifest or read_manifest(root)
    on_disk = set(bundle_files(root))
    listed = set(manifest.files)
    for rel in sorted(on_disk | listed):
        _confined(root, rel)
    if missing := sorted(listed - on_disk):
        raise BundleError(f"bundle {root} is missing files: {', '.join(missing)}")
    if extra := sorted(on_disk - listed):
        raise BundleError(f"bundle {root} has files not in its manifest: {', '.join(extra)}")
    for rel, entry in manifest.files.items():
        actual = sha256_file(root / rel)
        if actual != entry.sha256:
            raise BundleError(
                f"bundle file {rel} fails its checksum (sha256 {actual[:12]}…, manifest {entry.sha256[:12]}…)"
            )
    return manifest


def read_item_table(root: str | Path, manifest: Manifest, mmap: bool = False, half: bool = True) -> ItemTable:
    """The validated item table; ``mmap`` maps the large arrays (tokens, vectors, ID vectors) read-only instead of
    reading them: np.memmap arrays whose pages are read on first access and are shared with the page cache (the
    files must not be rewritten in place while mapped: BundleWriter replaces files); half: the float16 copies too."""
    root = Path(root)
    ids_path = root / "items/ids.json"
    if not ids_path.is_file():
        raise BundleError("bundle file items/ids.json is missing")
    ids = json.loads(ids_path.read_text(encoding="utf-8"))
    texts_path = root / "items/texts.json"
    scorer = manifest.scorer
    clustered = scorer.modalities if scorer.kind == MISSREC_FUSION else ()
    table = ItemTable(
        ids=[str(i) for i in ids],
        tokens=_load_npy(root, "items/tokens.npy", mmap),
        vectors={name: _load_npy(root, f"items/{name}.npy", mmap) for name in scorer.vector_names},
        clusters={m: _load_npy(root, f"items/{m}_cluster.npy") for m in clustered},
        popularity=_load_npy(root, "items/popularity.npy"),
        id_vectors=_load_npy(root, "items/id_vectors.npy", mmap) if scorer.transductive else None,
        texts=json.loads(texts_path.read_text(encoding="utf-8")) if texts_path.is_file() else None,
    )
    table.half = {name: _load_npy(root, half_path(name), mmap) for name in manifest.rescore_vectors if half}
    table.validate(manifest.dims, scorer, manifest.num_interests)
    if table.num_items != manifest.num_items:
        raise BundleError(f"item table has {table.num_items} rows, manifest says {manifest.num_items}")
    return table  # validation read every page of the mapped arrays and left none resident (see _check)


def read_centroids(root: str | Path, manifest: Manifest) -> np.ndarray | None:
    """(K + 1, D) interest centroids of a missrec_fusion bundle; None for other scorers."""
    if manifest.scorer.kind != MISSREC_FUSION:
        return None
    centroids = _load_npy(Path(root), "centroids.npy")
    _check(centroids, (manifest.num_interests + 1, manifest.dims.hidden), np.float32, "centroids.npy")
    return centroids


@dataclass(frozen=True)
class Bundle:
    """A bundle read and validated: manifest, item table, centroids (None unless missrec_fusion)."""

    root: Path
    manifest: Manifest
    table: ItemTable
    centroids: np.ndarray | None


def read_bundle(root: str | Path, *, mmap: bool = False, half: bool = True) -> Bundle:
    """Manifest + item table + centroids, after checksum, shape and consistency checks (the start-up gate)."""
    root = Path(root)
    manifest = verify_checksums(root)
    for name, graph in manifest.graphs.items():
        if graph.file not in manifest.files:
            raise BundleError(f"bundle {root} has no {graph.file} ({name} tower)")
    return Bundle(root, manifest, read_item_table(root, manifest, mmap, half), read_centroids(root, manifest))
