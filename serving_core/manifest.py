"""The typed manifest of a serving bundle: frozen dataclasses, read strictly (unknown fields are errors).

Part of the bundle contract with serving_core.bundle (which writes and reads the files and re-exports these
names); numpy-free, so any tool can describe a bundle.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from serving_core.attribute_schema import InvalidAttributes, check_schema

FORMAT = "missrec-bundle"
FORMAT_VERSION = 2
MANIFEST = "manifest.json"
USER_TOWER = "user_tower.onnx"
ITEM_TOWER = "item_tower.onnx"
INDEX_DIR = "index"
INDEX_FILE = f"{INDEX_DIR}/index.faiss"
MODALITIES = ("text", "image")
MISSREC_FUSION = "missrec_fusion"
INNER_PRODUCT = "inner_product"
SCORERS = (MISSREC_FUSION, INNER_PRODUCT)
ITEM_VECTOR = "item"  # the vector name of an inner_product bundle
REBUILD_HINT = (
    "rebuild it with this version: `missrec export --checkpoint RUN/checkpoint.pt --data DATA --out BUNDLE` "
    "then `missrec build-index --bundle BUNDLE`"
)


class BundleError(ValueError):
    """A bundle that is missing files, fails its checksums, or does not agree with itself."""


# ----- the typed manifest ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Fusion:
    """MISSRec's dynamic-fusion parameters and the retrieval bound derived from them."""

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


@dataclass(frozen=True)
class Block:
    """A named contiguous slice [start, stop) of an inner_product item vector (explanations)."""

    name: str
    start: int
    stop: int


@dataclass(frozen=True)
class Scorer:
    """How an item is scored for a user vector (see the module docstring)."""

    kind: str
    modalities: tuple[str, ...]  # the modalities whose raw features the item tower takes
    alpha: float = 0.0
    tau: float = 1.0
    transductive: bool = False
    blocks: tuple[Block, ...] = ()

    @property
    def fusion(self) -> Fusion:
        if self.kind != MISSREC_FUSION:
            raise BundleError(f"a {self.kind} scorer has no MISSRec fusion parameters")
        return Fusion(self.modalities, self.alpha, self.tau, self.transductive)

    @property
    def vector_names(self) -> tuple[str, ...]:
        """The items/<name>.npy vector arrays this scorer reads."""
        return self.modalities if self.kind == MISSREC_FUSION else (ITEM_VECTOR,)


@dataclass(frozen=True)
class Graph:
    """An ONNX graph of the bundle and the names of its inputs and outputs (in graph order)."""

    file: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


@dataclass(frozen=True)
class Dims:
    hidden: int  # user and item vector width D
    token: int  # width T of items/tokens.npy
    features: dict[str, int]  # raw feature width per modality the item tower takes

    def feature(self, modality: str) -> int:
        return int(self.features.get(modality, 0))


@dataclass(frozen=True)
class IndexInfo:
    """The FAISS index over the static vectors, as built (stored once: here)."""

    factory: str
    ntotal: int
    dim: int
    exact: bool
    params: dict[str, float]
    max_gap: float  # max_i ||t_i - v_i|| (missrec_fusion with two modalities; else 2.0, unused)
    metric: str = "inner_product"
    details: dict[str, Any] = field(default_factory=dict)  # build timings, bounds, recall report


@dataclass(frozen=True)
class FileEntry:
    sha256: str
    bytes: int


@dataclass(frozen=True)
class Manifest:
    format: str
    format_version: int
    model_kind: str  # missrec, msm4sr, mmsrec, ... (what made the towers)
    model: dict[str, Any]  # the model's own config (informational)
    dims: Dims
    scorer: Scorer
    graphs: dict[str, Graph]  # "user", "item"
    num_items: int  # rows, padding included
    num_interests: int  # K (missrec_fusion), 0 otherwise
    max_len: int
    export: dict[str, Any] = field(default_factory=dict)  # exporter, opset, measured parity
    created: dict[str, Any] = field(default_factory=dict)
    index: IndexInfo | None = None
    files: dict[str, FileEntry] = field(default_factory=dict)
    attributes: dict[str, str] = field(default_factory=dict)  # item attribute schema (serving_core.attribute_schema)
    # float16 copies of the vector tables for the re-scoring (serving_core.compact), by table name (the vector names,
    # "id_vectors"): {"dtype": "float16", "error": max_i ||x_i - h_i||, "max_norm": max_i ||x_i||}; empty: none
    rescore_vectors: dict[str, dict[str, Any]] = field(default_factory=dict)
    digest: str = ""  # sha256 of the canonical JSON without this field (detects edits and corruption)

    @property
    def modalities(self) -> tuple[str, ...]:
        return self.scorer.modalities

    @property
    def version(self) -> str:
        """A short stable identifier of this bundle: it changes whenever any file or field changes."""
        return f"{self.model_kind}-{self.digest[:12]}"

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for optional in ("attributes", "rescore_vectors"):  # without them a bundle keeps the manifest (and digest)
            if not data[optional]:  # it always had
                data.pop(optional)
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def compute_digest(self) -> str:
        data = self.to_dict()
        data.pop("digest")
        canonical = json.dumps(json.loads(json.dumps(data)), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        d = _known(cls, data, "manifest")
        d["dims"] = Dims(**_known(Dims, d["dims"], "dims"))
        scorer = _known(Scorer, d["scorer"], "scorer")
        scorer["modalities"] = tuple(scorer["modalities"])
        scorer["blocks"] = tuple(Block(**_known(Block, b, "block")) for b in scorer.get("blocks", ()))
        d["scorer"] = Scorer(**scorer)
        d["graphs"] = {
            name: Graph(g["file"], tuple(g["inputs"]), tuple(g["outputs"]))
            for name, g in ((n, _known(Graph, g, f"graph {n}")) for n, g in d["graphs"].items())
        }
        if d.get("index") is not None:
            d["index"] = IndexInfo(**_known(IndexInfo, d["index"], "index"))
        d["files"] = {rel: FileEntry(**_known(FileEntry, f, rel)) for rel, f in d.get("files", {}).items()}
        for name, desc in d.get("rescore_vectors", {}).items():
            if not isinstance(desc, dict) or desc.get("dtype") != "float16" or not {"error", "max_norm"} <= set(desc):
                raise BundleError(f"manifest rescore_vectors {name}: expected dtype float16, error and max_norm")
        try:
            d["attributes"] = check_schema(d.get("attributes", {}))
        except InvalidAttributes as exc:
            raise BundleError(f"manifest attributes: {exc}") from None
        return cls(**d)


def _known(cls: type, data: Any, what: str) -> dict[str, Any]:
    """``data`` as keyword arguments of the dataclass ``cls``: unknown or missing required keys are errors."""
    if not isinstance(data, dict):
        raise BundleError(f"manifest {what}: expected an object, got {type(data).__name__}")
    names = {f.name for f in fields(cls)}
    if unknown := sorted(set(data) - names):
        raise BundleError(f"manifest {what}: unknown field(s) {', '.join(unknown)}")
    return dict(data)
