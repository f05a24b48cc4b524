"""The two towers at serving time: ONNX Runtime sessions over a bundle's user_tower.onnx / item_tower.onnx (no torch).

User tower: internal item-id histories -> unit user vectors (B, D). The numpy side does what ``MISSRec.encode`` does
around the network: truncate to the last ``max_len`` items, gather item tokens, build the interest ids (sorted,
de-duplicated union of the items' text and image cluster ids, 0 excluded) and gather their centroid rows; the graph
does the rest. Item tower: raw modality features (B, F_m) -> token (B, D), normalised modality vectors (B, D) and
interest cluster ids (B,), for items that arrive after the bundle was built (cold start).

The item arrays the user tower reads (tokens, cluster ids) can grow while serving: build a new :class:`ItemArrays`
(for instance views of a larger preallocated buffer) and hand it to :meth:`UserTower.replace_items`. Each
``encode`` call reads the arrays once, so a concurrent replacement is seen either entirely or not at all.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from index_builder.bundle import ITEM_TOWER, USER_TOWER, BundleError, ItemTable, Manifest, load_validated

log = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
PROVIDER_PREFERENCES = ("auto", "cpu", "cuda")

# The graph interfaces (model_export.onnx_export writes them; the names are part of the bundle contract).
USER_INPUTS = ("tokens", "lengths", "interests", "interest_lengths")
USER_OUTPUT = "user"
ITEM_TOKENS = "tokens"


def feature_input(modality: str) -> str:
    """Item-tower input name of a modality's raw features."""
    return f"{modality}_features"


def cluster_output(modality: str) -> str:
    """Item-tower output name of a modality's interest cluster ids (the vector output is named ``modality``)."""
    return f"{modality}_cluster"


def item_tower_outputs(modalities: tuple[str, ...]) -> list[str]:
    """Item-tower output names, in graph order, for a model with ``modalities``."""
    return [ITEM_TOKENS, *modalities, *(cluster_output(m) for m in modalities)]


class TowerError(ValueError):
    """Input the towers cannot encode: an empty history, an unknown item id, features of the wrong shape."""


# ----- sessions ----------------------------------------------------------------------------------------------
def choose_providers(preference: str = "auto") -> list[str]:
    """ONNX Runtime execution providers for ``preference``: "auto" (CUDA when this onnxruntime build has it,
    else CPU), "cpu", or "cuda" (an error when unavailable). CPU is always last, as the fallback for any
    operator the CUDA provider lacks."""
    if preference not in PROVIDER_PREFERENCES:
        raise ValueError(f"provider preference must be one of {PROVIDER_PREFERENCES}, got {preference!r}")
    available = ort.get_available_providers()
    if preference == "cpu":
        return [CPU]
    if CUDA in available:
        return [CUDA, CPU]
    if preference == "cuda":
        raise RuntimeError(
            f"ONNX Runtime provider {CUDA} was requested but this onnxruntime build offers only "
            f"{', '.join(available)} (install onnxruntime-gpu with a matching CUDA, or choose 'cpu' or 'auto')"
        )
    return [CPU]


def session_options(intra_op_threads: int = 0) -> ort.SessionOptions:
    """All graph optimisations on; ``intra_op_threads`` 0 = ONNX Runtime's default (one per physical core)."""
    if intra_op_threads < 0:
        raise ValueError("intra_op_threads must be >= 0")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = intra_op_threads
    options.inter_op_num_threads = 1
    return options


def open_session(path: str | Path, providers: str = "auto", intra_op_threads: int = 0) -> ort.InferenceSession:
    return ort.InferenceSession(
        str(path), sess_options=session_options(intra_op_threads), providers=choose_providers(providers)
    )


# ----- user tower --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ItemArrays:
    """What the user tower reads per item: tokens (N, D) float32 and cluster ids modality -> (N,) int64, row 0
    padding. Row r is internal item id r."""

    tokens: np.ndarray
    clusters: dict[str, np.ndarray]

    def __post_init__(self) -> None:
        n = self.tokens.shape[0]
        if self.tokens.ndim != 2 or self.tokens.dtype != np.float32:
            raise ValueError(f"tokens must be float32 (N, D), got {self.tokens.dtype} {self.tokens.shape}")
        for m, c in self.clusters.items():
            if c.shape != (n,) or c.dtype != np.int64:
                raise ValueError(f"{m} cluster ids must be int64 ({n},), got {c.dtype} {c.shape}")

    @property
    def num_items(self) -> int:
        return int(self.tokens.shape[0])

    @classmethod
    def from_table(cls, table: ItemTable) -> ItemArrays:
        return cls(tokens=table.tokens, clusters=dict(table.clusters))


def interest_ids(items: np.ndarray, clusters: Sequence[np.ndarray]) -> np.ndarray:
    """(B, L) item ids (0 = padding) -> (B, Q) interest ids, 0 = padding: numpy twin of ``MISSRec.interest_ids``.

    Per row the de-duplicated cluster ids of all modalities, in descending order (the model's order; the result
    does not depend on it, but the float rounding does), left-aligned; Q = the largest count in the batch, >= 1.
    """
    ids = np.concatenate([c[items] for c in clusters], axis=1)  # (B, M * L)
    ids = -np.sort(-ids, axis=1)
    dup = np.zeros(ids.shape, dtype=bool)
    dup[:, 1:] = ids[:, 1:] == ids[:, :-1]
    ids[dup] = 0
    ids = -np.sort(-ids, axis=1)
    q = max(1, int((ids > 0).sum(axis=1).max()))
    return ids[:, :q]


class UserTower:
    """user_tower.onnx plus the item arrays and centroids it needs: id histories -> unit user vectors."""

    def __init__(self, session: ort.InferenceSession, items: ItemArrays, centroids: np.ndarray, max_len: int) -> None:
        names = tuple(i.name for i in session.get_inputs())
        if set(names) != set(USER_INPUTS) or [o.name for o in session.get_outputs()] != [USER_OUTPUT]:
            raise BundleError(f"user tower has inputs {names}, expected {USER_INPUTS} -> {USER_OUTPUT!r}")
        if centroids.ndim != 2 or centroids.shape[1] != items.tokens.shape[1]:
            raise ValueError(f"centroids {centroids.shape} do not match tokens {items.tokens.shape}")
        self.session = session
        self.centroids = centroids
        self.max_len = max_len
        self._items = items

    @property
    def items(self) -> ItemArrays:
        return self._items

    @property
    def dim(self) -> int:
        return int(self.centroids.shape[1])

    def replace_items(self, items: ItemArrays) -> None:
        """Swap in grown item arrays (e.g. with cold-start items appended); the modalities must stay the same."""
        if set(items.clusters) != set(self._items.clusters) or items.tokens.shape[1] != self.dim:
            raise ValueError("replacement item arrays must keep the modalities and the token width")
        self._items = items

    def inputs(self, histories: Sequence[np.ndarray | Sequence[int]]) -> dict[str, np.ndarray]:
        """The graph feeds for ``histories`` (internal ids, oldest first): left-aligned, padded to the batch's
        longest history, each truncated to its last ``max_len`` items."""
        items_now = self._items  # read once: a concurrent replace_items is seen entirely or not at all
        if not histories:
            raise TowerError("no histories to encode")
        try:
            rows = [np.asarray(h, dtype=np.int64).reshape(-1)[-self.max_len :] for h in histories]
        except (TypeError, ValueError, OverflowError) as exc:
            raise TowerError(f"histories must be lists of integer item ids ({exc})") from None
        lengths = np.array([r.size for r in rows], dtype=np.int64)
        if (lengths == 0).any():
            raise TowerError(f"history {int(np.argmin(lengths))} is empty")
        items = np.zeros((len(rows), int(lengths.max())), dtype=np.int64)  # (B, L), 0 = padding
        for b, r in enumerate(rows):
            items[b, : r.size] = r
        real = items[np.arange(items.shape[1])[None, :] < lengths[:, None]]
        if real.min() < 1 or real.max() >= items_now.num_items:
            raise TowerError(f"item ids must be in 1..{items_now.num_items - 1}")
        ids = interest_ids(items, list(items_now.clusters.values()))  # (B, Q)
        return {
            "tokens": items_now.tokens[items],  # (B, L, D)
            "lengths": lengths,
            "interests": self.centroids[ids],  # (B, Q, D)
            "interest_lengths": np.maximum((ids > 0).sum(axis=1), 1).astype(np.int64),
        }

    def run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        return self.session.run([USER_OUTPUT], feeds)[0]

    def encode(self, histories: Sequence[np.ndarray | Sequence[int]]) -> np.ndarray:
        """Internal item-id histories (oldest first, each non-empty) -> (B, D) float32 unit user vectors."""
        return self.run(self.inputs(histories))

    def warm_up(self, batch_size: int = 1) -> None:
        """Run one max-shape batch (full-length histories) so the first request does not pay for allocation."""
        n = self._items.num_items
        histories = [np.arange(self.max_len, dtype=np.int64) % (n - 1) + 1 for _ in range(batch_size)]
        self.encode(histories)


# ----- item tower --------------------------------------------------------------------------------------------
class ItemTower:
    """item_tower.onnx: raw modality features -> token, normalised vectors and cluster ids of new items."""

    def __init__(self, session: ort.InferenceSession, feature_dims: dict[str, int]) -> None:
        names = {i.name for i in session.get_inputs()}
        if names != {feature_input(m) for m in feature_dims}:
            raise BundleError(f"item tower has inputs {sorted(names)}, expected one per modality {list(feature_dims)}")
        self.session = session
        self.feature_dims = dict(feature_dims)
        self.outputs = [o.name for o in session.get_outputs()]

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(self.feature_dims)

    def encode(self, text_features: np.ndarray | None, image_features: np.ndarray | None) -> dict[str, np.ndarray]:
        """(B, F_m) float32 features per modality (None = missing: zero rows, as for a missing modality in the
        data) -> {"tokens": (B, D), m: (B, D) unit vectors, "m_cluster": (B,) int64 in 1..K} for the model's
        modalities. Features of a modality the model does not use are ignored."""
        given = {"text": text_features, "image": image_features}
        used = {m: given[m] for m in self.modalities if given[m] is not None}
        if not used:
            raise TowerError(f"no features for any of the model's modalities {self.modalities}")
        batch = {np.shape(f)[0] if np.ndim(f) == 2 else -1 for f in used.values()}
        if len(batch) != 1 or -1 in batch:
            raise TowerError("features must be 2-D (B, width) with the same B for every modality")
        b = batch.pop()
        feeds = {}
        for m, width in self.feature_dims.items():
            f = used.get(m)
            f = np.zeros((b, width), dtype=np.float32) if f is None else np.ascontiguousarray(f, dtype=np.float32)
            if f.shape[1] != width:
                raise TowerError(f"{m} features are {f.shape[1]}-d, the model expects {width}")
            if not np.isfinite(f).all():
                raise TowerError(f"{m} features contain NaN or inf")
            feeds[feature_input(m)] = f
        return dict(zip(self.outputs, self.session.run(self.outputs, feeds), strict=True))


# ----- loading a bundle ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Towers:
    """A validated bundle with both tower sessions open."""

    manifest: Manifest
    table: ItemTable
    centroids: np.ndarray
    user: UserTower
    item: ItemTower


def load_towers(root: str | Path, providers: str = "auto", intra_op_threads: int = 0) -> Towers:
    """Validate the bundle at ``root`` (checksums, shapes) and open both towers."""
    root = Path(root)
    manifest, table, centroids = load_validated(root)
    feature_dims = {m: int(manifest.dims[f"{m}_feature"]) for m in manifest.modalities}
    user = UserTower(
        open_session(root / USER_TOWER, providers, intra_op_threads),
        ItemArrays.from_table(table),
        centroids,
        manifest.max_len,
    )
    item = ItemTower(open_session(root / ITEM_TOWER, providers, intra_op_threads), feature_dims)
    log.info(
        "towers of bundle %s on %s: %d items, %d interests",
        manifest.version,
        user.session.get_providers()[0],
        manifest.num_items,
        manifest.num_interests,
    )
    return Towers(manifest, table, centroids, user, item)
