"""The two towers at serving time: ONNX Runtime sessions over a bundle's tower graphs (no torch).

The graphs' input and output names are data in the manifest (``manifest.graphs``). User tower: internal item-id
histories -> user vectors (B, D). The numpy side truncates to the last ``max_len`` items and gathers the item
tokens (``tokens``, ``lengths``); a graph that also takes ``interests`` / ``interest_lengths`` (MISSRec) gets
the interest ids as ``MISSRec.encode`` builds them (sorted, de-duplicated union of the items' cluster ids, 0
excluded) and their centroid rows. Item tower: raw modality features (B, F_m) -> the graph's named outputs (the
token the user tower gathers, the item vectors, MISSRec's cluster ids), for items that arrive after the bundle
was built (cold start).

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

from serving_core.bundle import (
    ITEM_TOWER,
    ITEM_VECTOR,
    USER_TOWER,
    Bundle,
    BundleError,
    Graph,
    ItemTable,
    Manifest,
    read_bundle,
)

log = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
PROVIDER_PREFERENCES = ("auto", "cpu", "cuda")

# MISSRec's graph interface (model_export writes these names into manifest.graphs; towers read them from there).
USER_INPUTS = ("tokens", "lengths", "interests", "interest_lengths")
PLAIN_USER_INPUTS = ("tokens", "lengths")  # a user tower without interest tokens (inner_product models)
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


def tower_graphs(modalities: tuple[str, ...], inner_product: bool = False) -> dict[str, Graph]:
    """manifest.graphs of a bundle: MISSRec's interface, or an inner_product tower's (user tower on tokens and
    lengths only; item tower -> the token and the item vector ``item``)."""
    inputs = tuple(feature_input(m) for m in modalities)
    if inner_product:
        return {
            "user": Graph(USER_TOWER, PLAIN_USER_INPUTS, (USER_OUTPUT,)),
            "item": Graph(ITEM_TOWER, inputs, (ITEM_TOKENS, ITEM_VECTOR)),
        }
    return {
        "user": Graph(USER_TOWER, USER_INPUTS, (USER_OUTPUT,)),
        "item": Graph(ITEM_TOWER, inputs, tuple(item_tower_outputs(modalities))),
    }


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


SPINNING = "session.intra_op.allow_spinning"  # ORT session config entry: "1" = idle pool threads busy-wait
# Graph optimisation levels by name. The towers default to "basic": measured with loadtest.ort_options on the
# Scientific user tower (docs/benchmarks.md), the extended/all fusions made it slower on this CPU (batch 16, one
# thread: p50 3.05 ms basic vs 3.94 ms all; batch 1: 0.20 vs 0.22 ms).
OPTIMISATION_LEVELS = {
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
DEFAULT_LEVEL = "basic"


def session_options(
    intra_op_threads: int = 0, spinning: bool = False, level: str = DEFAULT_LEVEL
) -> ort.SessionOptions:
    """Graph optimisation ``level`` (basic, extended or all); ``intra_op_threads`` 0 = ONNX Runtime's default (one
    per physical core).

    ``spinning``: whether the intra-op pool's threads busy-wait for work between and after runs (ORT's own default
    is on). Off by default here: on a service whose few cores also run the event loop, spinning threads burn the
    CPU that queued requests wait for (``python -m loadtest.ort_options`` measures its cost). No effect with one
    intra-op thread (no pool)."""
    if intra_op_threads < 0:
        raise ValueError("intra_op_threads must be >= 0")
    if level not in OPTIMISATION_LEVELS:
        raise ValueError(f"optimisation level must be one of {sorted(OPTIMISATION_LEVELS)}, not {level!r}")
    options = ort.SessionOptions()
    options.graph_optimization_level = OPTIMISATION_LEVELS[level]
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = intra_op_threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry(SPINNING, "1" if spinning else "0")
    return options


def open_session(
    path: str | Path,
    providers: str = "auto",
    intra_op_threads: int = 0,
    spinning: bool = False,
    level: str = DEFAULT_LEVEL,
) -> ort.InferenceSession:
    return ort.InferenceSession(
        str(path),
        sess_options=session_options(intra_op_threads, spinning, level),
        providers=choose_providers(providers),
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

    def __init__(
        self,
        session: ort.InferenceSession,
        items: ItemArrays,
        centroids: np.ndarray | None,
        max_len: int,
        graph: Graph | None = None,
    ) -> None:
        names = tuple(i.name for i in session.get_inputs())
        outputs = tuple(o.name for o in session.get_outputs())
        expected = graph or Graph("", USER_INPUTS, (USER_OUTPUT,))
        if set(names) != set(expected.inputs) or outputs != expected.outputs or len(outputs) != 1:
            raise BundleError(
                f"user tower has {names} -> {outputs}, the manifest says {expected.inputs} -> {expected.outputs}"
            )
        self.interests = set(names) == set(USER_INPUTS)
        if not self.interests and set(names) != set(PLAIN_USER_INPUTS):
            raise BundleError(f"user tower inputs {names} are neither {USER_INPUTS} nor {PLAIN_USER_INPUTS}")
        if self.interests and (centroids is None or centroids.ndim != 2 or centroids.shape[1] != items.tokens.shape[1]):
            raise ValueError(f"a user tower with interests needs centroids (K + 1, {items.tokens.shape[1]})")
        self.session = session
        self.output = outputs[0]
        self.centroids = centroids
        self.max_len = max_len
        self._items = items

    @property
    def items(self) -> ItemArrays:
        return self._items

    @property
    def token_dim(self) -> int:
        return int(self._items.tokens.shape[1])

    def replace_items(self, items: ItemArrays) -> None:
        """Swap in grown item arrays (e.g. with cold-start items appended); the modalities must stay the same."""
        if set(items.clusters) != set(self._items.clusters) or items.tokens.shape[1] != self.token_dim:
            raise ValueError("replacement item arrays must keep the modalities and the token width")
        self._items = items

    def inputs(
        self, histories: Sequence[np.ndarray | Sequence[int]], arrays: ItemArrays | None = None
    ) -> dict[str, np.ndarray]:
        """The graph feeds for ``histories`` (internal ids, oldest first): left-aligned, padded to the batch's
        longest history, each truncated to its last ``max_len`` items. ``arrays``: the item arrays to gather
        from (a catalogue snapshot's), else the tower's own."""
        items_now = arrays if arrays is not None else self._items
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
        feeds = {"tokens": items_now.tokens[items], "lengths": lengths}  # (B, L, T), (B,)
        if self.interests:
            ids = interest_ids(items, list(items_now.clusters.values()))  # (B, Q)
            feeds["interests"] = self.centroids[ids]  # (B, Q, D)
            feeds["interest_lengths"] = np.maximum((ids > 0).sum(axis=1), 1).astype(np.int64)
        return feeds

    def run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        return self.session.run([self.output], feeds)[0]

    def encode(self, histories: Sequence[np.ndarray | Sequence[int]], arrays: ItemArrays | None = None) -> np.ndarray:
        """Internal item-id histories (oldest first, each non-empty) -> (B, D) float32 user vectors."""
        return self.run(self.inputs(histories, arrays))

    def warm_up(self, batch_size: int = 1) -> None:
        """Run one max-shape batch (full-length histories) so the first request does not pay for allocation."""
        n = self._items.num_items
        histories = [np.arange(self.max_len, dtype=np.int64) % (n - 1) + 1 for _ in range(batch_size)]
        self.encode(histories)


# ----- item tower --------------------------------------------------------------------------------------------
class ItemTower:
    """item_tower.onnx: raw modality features -> token, normalised vectors and cluster ids of new items."""

    def __init__(self, session: ort.InferenceSession, feature_dims: dict[str, int], graph: Graph | None = None) -> None:
        names = {i.name for i in session.get_inputs()}
        if names != {feature_input(m) for m in feature_dims}:
            raise BundleError(f"item tower has inputs {sorted(names)}, expected one per modality {list(feature_dims)}")
        self.session = session
        self.feature_dims = dict(feature_dims)
        self.outputs = [o.name for o in session.get_outputs()]
        if graph is not None and tuple(self.outputs) != graph.outputs:
            raise BundleError(f"item tower outputs {self.outputs}, the manifest says {list(graph.outputs)}")

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(self.feature_dims)

    def encode(self, text_features: np.ndarray | None, image_features: np.ndarray | None) -> dict[str, np.ndarray]:
        """(B, F_m) float32 features per modality (None = missing: zero rows, as for a missing modality in the
        data) -> the graph's outputs by name (MISSRec: "tokens" (B, D), m: (B, D) unit vectors, "m_cluster" (B,)
        int64 in 1..K; inner_product towers: "tokens" and "item"). Features of a modality the model does not use
        are ignored."""
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

    bundle: Bundle
    user: UserTower
    item: ItemTower

    @property
    def manifest(self) -> Manifest:
        return self.bundle.manifest

    @property
    def table(self) -> ItemTable:
        return self.bundle.table


def open_towers(
    bundle: Bundle,
    providers: str = "auto",
    intra_op_threads: int = 0,
    spinning: bool = False,
    level: str = DEFAULT_LEVEL,
) -> Towers:
    """Open both tower sessions of a bundle read by :func:`serving_core.bundle.read_bundle` (session options:
    :func:`session_options`)."""
    m, root = bundle.manifest, bundle.root
    graphs = m.graphs
    user = UserTower(
        open_session(root / graphs["user"].file, providers, intra_op_threads, spinning, level),
        ItemArrays.from_table(bundle.table),
        bundle.centroids,
        m.max_len,
        graphs["user"],
    )
    item = ItemTower(
        open_session(root / graphs["item"].file, providers, intra_op_threads, spinning, level),
        m.dims.features,
        graphs["item"],
    )
    log.info(
        "towers of bundle %s on %s: %d items, scorer %s", m.version, user.session.get_providers()[0], m.num_items,
        m.scorer.kind,
    )  # fmt: skip
    return Towers(bundle, user, item)


def load_towers(
    root: str | Path,
    providers: str = "auto",
    intra_op_threads: int = 0,
    spinning: bool = False,
    level: str = DEFAULT_LEVEL,
) -> Towers:
    """Validate the bundle at ``root`` (checksums, shapes) and open both towers."""
    return open_towers(read_bundle(root), providers, intra_op_threads, spinning, level)
