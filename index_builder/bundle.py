"""The serving bundle: one directory with everything serving needs, described and checksummed by manifest.json.

This module is the only owner of the format (reading, writing, validating); it imports numpy and the standard
library only (no torch, no onnxruntime, no faiss), so every writer and reader can use it.

Layout::

    manifest.json          format version, model config, dimensions, fusion, item count, sha256 of every file
    user_tower.onnx        (tokens, lengths, interests, interest_lengths) -> unit user vector
    item_tower.onnx        raw modality features -> token, normalised modality vectors, interest cluster ids
    items/ids.json         external item ids, row r -> ids[r]; row 0 is padding ("")
    items/tokens.npy       float32 (N, D) history-position token per item (adapter sum, + ID in transductive mode)
    items/text.npy         float32 (N, D) normalised adapted text vectors (absent modality: no file)
    items/image.npy        float32 (N, D) normalised adapted image vectors
    items/text_cluster.npy int64 (N,) interest cluster of the text side (1..K; 0 = padding)
    items/image_cluster.npy
    items/id_vectors.npy   float32 (N, D) normalised ID embeddings (transductive only)
    items/popularity.npy   float32 (N,) training interaction counts (fallback for users without history)
    items/texts.json       optional item texts (for GET /v1/items)
    centroids.npy          float32 (K + 1, D) interest centroids, row 0 = padding
    index/                 FAISS index over the static retrieval vectors (written by build-index)

Row r of every item array is internal item id r; it is also the FAISS id.

Scoring (spec section 5) in the general form used for retrieval: for a user vector u,
    score_i = u . static_i + c * (s_i - m_i),   |s_i - m_i| <= tanh(|alpha|)
with static_i = (t_i + v_i) / 2 and c = 1 (inductive), static_i = (e_i + t_i + v_i) / 3 and c = 2/3
(transductive), and c = 0 with a single modality. ``Fusion.bound`` = c * tanh(|alpha|).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import tempfile
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

FORMAT = "missrec-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
USER_TOWER = "user_tower.onnx"
ITEM_TOWER = "item_tower.onnx"
INDEX_DIR = "index"
MODALITIES = ("text", "image")


class BundleError(ValueError):
    """A bundle that is missing files, fails its checksums, or does not agree with itself."""


@dataclass(frozen=True)
class Fusion:
    """Dynamic-fusion parameters and the retrieval bound derived from them."""

    modalities: tuple[str, ...]
    alpha: float
    tau: float
    transductive: bool

    @property
    def rescore_weight(self) -> float:
        """c in score = u . static + c (s - m)."""
        if len(self.modalities) < 2:
            return 0.0
        return 2.0 / 3.0 if self.transductive else 1.0

    @property
    def bound(self) -> float:
        """Largest possible |score - u . static| for a unit user vector."""
        return self.rescore_weight * math.tanh(abs(self.alpha))


@dataclass
class Manifest:
    format: str
    format_version: int
    model: dict[str, Any]
    dims: dict[str, int]
    fusion: dict[str, Any]
    num_items: int
    num_interests: int
    max_len: int
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    created: dict[str, Any] = field(default_factory=dict)
    onnx: dict[str, Any] = field(default_factory=dict)
    index: dict[str, Any] | None = None
    digest: str = ""  # sha256 of this manifest's canonical JSON without this field (detects edits/corruption)

    def compute_digest(self) -> str:
        data = asdict(self)
        data.pop("digest")
        # through JSON once, so tuples, int keys etc. hash the same before writing and after reading
        canonical = json.dumps(json.loads(json.dumps(data)), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(self.fusion["modalities"])

    @property
    def fusion_params(self) -> Fusion:
        f = self.fusion
        return Fusion(tuple(f["modalities"]), float(f["alpha"]), float(f["tau"]), bool(f["transductive"]))

    @property
    def version(self) -> str:
        """A short stable identifier of this bundle (changes whenever any file changes)."""
        digest = hashlib.sha256(json.dumps(self.files, sort_keys=True).encode()).hexdigest()
        return f"{self.model.get('mode', 'missrec')}-{digest[:12]}"

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"


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

    @property
    def num_items(self) -> int:
        return len(self.ids)

    def validate(self, dim: int, modalities: tuple[str, ...], num_interests: int) -> None:
        n = self.num_items
        if self.ids and self.ids[0] != "":
            raise BundleError("item row 0 is padding and must have the empty id")
        if len(set(self.ids)) != n:
            raise BundleError("external item ids must be unique")
        _check(self.tokens, (n, dim), np.float32, "items/tokens.npy")
        _check(self.popularity, (n,), np.float32, "items/popularity.npy")
        if set(self.vectors) != set(modalities) or set(self.clusters) != set(modalities):
            raise BundleError(f"item vectors/clusters must cover exactly the modalities {modalities}")
        for m in modalities:
            _check(self.vectors[m], (n, dim), np.float32, f"items/{m}.npy")
            _check(self.clusters[m], (n,), np.int64, f"items/{m}_cluster.npy")
            c = self.clusters[m]
            if c[0] != 0 or (c[1:] < 1).any() or (c > num_interests).any():
                raise BundleError(f"items/{m}_cluster.npy: ids must be in 1..{num_interests} (0 only for padding)")
        if self.id_vectors is not None:
            _check(self.id_vectors, (n, dim), np.float32, "items/id_vectors.npy")
        if self.texts is not None and len(self.texts) != n:
            raise BundleError("items/texts.json must have one entry per item row")

    def static_vectors(self, fusion: Fusion) -> np.ndarray:
        """(N, D) float32 retrieval vectors: u . static_i is the score up to the fusion bound."""
        parts = [self.vectors[m] for m in fusion.modalities]
        if fusion.transductive:
            if self.id_vectors is None:
                raise BundleError("transductive bundle without items/id_vectors.npy")
            parts.append(self.id_vectors)
            if len(fusion.modalities) == 1:  # (e + 2 s_t) / 3
                return ((self.id_vectors + 2.0 * self.vectors[fusion.modalities[0]]) / 3.0).astype(np.float32)
        return (np.sum(parts, axis=0) / len(parts)).astype(np.float32)


def _check(arr: np.ndarray, shape: tuple[int, ...], dtype: type, name: str) -> None:
    if arr.shape != shape:
        raise BundleError(f"{name}: shape {arr.shape}, expected {shape}")
    if arr.dtype != dtype:
        raise BundleError(f"{name}: dtype {arr.dtype}, expected {np.dtype(dtype)}")
    if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
        raise BundleError(f"{name}: contains NaN or inf")


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


def write_item_table(root: Path, table: ItemTable) -> list[str]:
    """Write items/*.npy|json; returns the relative paths written."""
    items = root / "items"
    written = {"items/ids.json": lambda p: _write_json(p, table.ids)}
    written["items/tokens.npy"] = lambda p: _save_npy(p, table.tokens)
    written["items/popularity.npy"] = lambda p: _save_npy(p, table.popularity)
    for m, vec in table.vectors.items():
        written[f"items/{m}.npy"] = lambda p, v=vec: _save_npy(p, v)
        written[f"items/{m}_cluster.npy"] = lambda p, c=table.clusters[m]: _save_npy(p, c)
    if table.id_vectors is not None:
        written["items/id_vectors.npy"] = lambda p: _save_npy(p, table.id_vectors)
    if table.texts is not None:
        written["items/texts.json"] = lambda p: _write_json(p, table.texts)
    items.mkdir(parents=True, exist_ok=True)
    for rel, write in written.items():
        write(root / rel)
    return list(written)


def _load_npy(root: Path, rel: str) -> np.ndarray:
    path = root / rel
    if not path.is_file():
        raise BundleError(f"bundle file {rel} is missing")
    try:
        return np.load(path, allow_pickle=False)  # never unpickle
    except ValueError as exc:
        raise BundleError(f"{rel}: not a plain .npy array ({exc})") from None


def read_item_table(root: Path, manifest: Manifest) -> ItemTable:
    ids_path = root / "items/ids.json"
    if not ids_path.is_file():
        raise BundleError("bundle file items/ids.json is missing")
    ids = json.loads(ids_path.read_text(encoding="utf-8"))
    texts_path = root / "items/texts.json"
    table = ItemTable(
        ids=[str(i) for i in ids],
        tokens=_load_npy(root, "items/tokens.npy"),
        vectors={m: _load_npy(root, f"items/{m}.npy") for m in manifest.modalities},
        clusters={m: _load_npy(root, f"items/{m}_cluster.npy") for m in manifest.modalities},
        popularity=_load_npy(root, "items/popularity.npy"),
        id_vectors=_load_npy(root, "items/id_vectors.npy") if manifest.fusion["transductive"] else None,
        texts=json.loads(texts_path.read_text(encoding="utf-8")) if texts_path.is_file() else None,
    )
    table.validate(manifest.dims["hidden"], manifest.modalities, manifest.num_interests)
    if table.num_items != manifest.num_items:
        raise BundleError(f"item table has {table.num_items} rows, manifest says {manifest.num_items}")
    return table


def read_centroids(root: Path, manifest: Manifest) -> np.ndarray:
    centroids = _load_npy(root, "centroids.npy")
    _check(centroids, (manifest.num_interests + 1, manifest.dims["hidden"]), np.float32, "centroids.npy")
    return centroids


def creation_info(tool: str, **extra: Any) -> dict[str, Any]:
    return {
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
        "by": tool,
        "python": platform.python_version(),
        "numpy": np.__version__,
        **extra,
    }


def write_centroids(root: Path, centroids: np.ndarray) -> str:
    _save_npy(root / "centroids.npy", centroids.astype(np.float32))
    return "centroids.npy"


def bundle_files(root: Path) -> list[str]:
    """Every regular file under root except the manifest, as sorted relative POSIX paths."""
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and p.name != MANIFEST)


def finalize(root: Path, manifest: Manifest) -> Manifest:
    """Record size and sha256 of every file in the bundle and write manifest.json (atomically)."""
    manifest.files = {
        rel: {"sha256": sha256_file(root / rel), "bytes": (root / rel).stat().st_size} for rel in bundle_files(root)
    }
    manifest.digest = manifest.compute_digest()
    tmp = root / (MANIFEST + ".tmp")
    tmp.write_text(manifest.to_json(), encoding="utf-8")
    os.replace(tmp, root / MANIFEST)
    return manifest


def read_manifest(root: str | Path) -> Manifest:
    root = Path(root)
    path = root / MANIFEST
    if not path.is_file():
        raise BundleError(f"{root} is not a bundle: {MANIFEST} is missing")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        manifest = Manifest(**data)
    except (json.JSONDecodeError, TypeError) as exc:
        raise BundleError(f"{path}: unreadable manifest ({exc})") from None
    if manifest.format != FORMAT:
        raise BundleError(f"{path}: format {manifest.format!r}, expected {FORMAT!r}")
    if manifest.format_version != FORMAT_VERSION:
        raise BundleError(f"{path}: format version {manifest.format_version}, this code reads {FORMAT_VERSION}")
    if manifest.digest != manifest.compute_digest():
        raise BundleError(f"{path}: manifest digest mismatch (the manifest was edited or corrupted)")
    for m in manifest.modalities:
        if m not in MODALITIES:
            raise BundleError(f"{path}: unknown modality {m!r}")
    return manifest


def verify_checksums(root: str | Path, manifest: Manifest | None = None) -> Manifest:
    """Check that the files on disk are exactly the files in the manifest, with matching sha256."""
    root = Path(root)
    manifest = manifest or read_manifest(root)
    on_disk = set(bundle_files(root))
    listed = set(manifest.files)
    if missing := sorted(listed - on_disk):
        raise BundleError(f"bundle {root} is missing files: {', '.join(missing)}")
    if extra := sorted(on_disk - listed):
        raise BundleError(f"bundle {root} has files not in its manifest: {', '.join(extra)}")
    for rel, info in manifest.files.items():
        actual = sha256_file(root / rel)
        if actual != info["sha256"]:
            raise BundleError(
                f"bundle file {rel} fails its checksum (sha256 {actual[:12]}…, manifest {info['sha256'][:12]}…)"
            )
    return manifest


def load_validated(root: str | Path) -> tuple[Manifest, ItemTable, np.ndarray]:
    """Manifest + item table + centroids, after checksum, shape and consistency checks."""
    root = Path(root)
    manifest = verify_checksums(root)
    for required in (USER_TOWER, ITEM_TOWER):
        if required not in manifest.files:
            raise BundleError(f"bundle {root} has no {required}")
    return manifest, read_item_table(root, manifest), read_centroids(root, manifest)
