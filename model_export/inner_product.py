"""The ``inner_product`` serving export shared by MSM4SR (:mod:`model_export.msm4sr`) and MMSRec
(:mod:`model_export.mmsrec`): the item table, both towers as ONNX, parity-checked.

Both models score with one inner product of a user vector and a static item vector, so the service ranks with the
index alone (bound 0) and needs no fusion. What is exported (graph names in ``serving_core.towers``: the user tower
takes ``tokens`` (B, L, T) and ``lengths`` (B,), the item tower takes ``<m>_features`` (B, F_m) and returns
``tokens`` (B, T) and ``item`` (B, D)):

- **MSM4SR**: an item's token is its per-modality item vectors z (M, D) flattened, T = M * D (the transductive
  variant's table rows include the ID embedding; the item tower, for items without an ID, does not). The user
  tower unflattens them and runs the shared SASRec encoder per modality: user = [n(h_t); n(h_v)]. The item vector
  is [n(z_t); n(z_v)], so u . x = cos_t + cos_v; the manifest names the blocks (one per modality, D wide) and the
  service explains a score by each block's share of it (cos_t / (cos_t + cos_v)).
- **MMSRec**: an item's token is its projected modality tokens LN(Linear(x_m)) (M, D) flattened, followed by M
  presence flags (1.0 where the item has that modality), T = M * D + M: the encoder masks a missing modality's
  token, which the projected token alone cannot tell. The user tower right-aligns the left-aligned history (the
  model's positions count back from the [MASK] slot at L - 1), appends [MASK] and reads its output; the manifest's
  ``max_len`` is L - 1 (history items) so the service truncates exactly as the model does. The item vector is the
  one-item-sequence output, unit norm: one cosine, nothing to split, so MMSRec recommendations carry no
  explanation.

Parity is part of export, as for MISSRec (:mod:`model_export.parity`): the user graph at lengths x batches on
random histories of real items, ``UserTower.encode`` end to end against ``model.encode`` on real test histories,
and the item graph against the model on real items plus missing-modality rows.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Generic, TypeVar

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from missrec.data.dataset import SeqDataset
from missrec.models.popularity import item_popularity
from model_export.onnx import EXPORTER, OPSET, export_graph
from model_export.parity import (
    PARITY_BATCHES,
    PARITY_ITEMS,
    PARITY_LENGTHS,
    PARITY_USERS,
    ExportError,
    max_abs_diff,
    random_histories,
    require_parity,
)
from serving_core.bundle import (
    FORMAT,
    FORMAT_VERSION,
    INNER_PRODUCT,
    ITEM_TOWER,
    ITEM_VECTOR,
    USER_TOWER,
    Block,
    BundleError,
    BundleWriter,
    Dims,
    ItemTable,
    Manifest,
    Scorer,
    read_bundle,
)
from serving_core.towers import (
    ITEM_TOKENS,
    PLAIN_USER_INPUTS,
    USER_OUTPUT,
    ItemArrays,
    UserTower,
    feature_input,
    open_session,
    tower_graphs,
)

log = logging.getLogger(__name__)
Model = TypeVar("Model", bound=nn.Module)


# ----- the exported modules ------------------------------------------------------------------------------------
class ModelGraph(nn.Module):
    """A graph module around the model (its parameters are the model's)."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model


class ItemGraph(ModelGraph):
    """Raw features (B, F_m) of the model's modalities -> (item token, item vector)."""

    def forward(
        self, text_features: torch.Tensor | None = None, image_features: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        feats = {
            m: f for m, f in (("text", text_features), ("image", image_features)) if m in self.model.cfg.modalities
        }
        return self.encode(feats)  # type: ignore[arg-type]

    def encode(self, feats: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


class InnerProductExport(Generic[Model]):
    """What one family puts in an ``inner_product`` bundle; a subclass per family (in ``model_export.<family>``).

    The item token is the per-modality part (M, D) flattened, followed by ``flags`` presence flags."""

    kind: str  # the family (the manifest's model_kind)
    user_graph: type[nn.Module]
    item_graph: type[nn.Module]
    flags: bool = False  # M presence flags after the token (the user tower masks a missing modality)
    blocks_per_modality: bool = False  # explanation blocks: one per modality, D wide

    def __init__(self, model: Model) -> None:
        self.model = model

    @property
    def token_dim(self) -> int:
        m, d = len(self.model.cfg.modalities), self.model.cfg.hidden
        return m * d + (m if self.flags else 0)

    @property
    def history_len(self) -> int:
        """History items the user tower takes (the manifest's max_len)."""
        return self.model.cfg.max_len

    def graphs(self) -> tuple[nn.Module, nn.Module]:
        """(user graph, item graph) modules of the model."""
        return self.user_graph(self.model), self.item_graph(self.model)

    def blocks(self) -> tuple[Block, ...]:
        """Explanation blocks of the item vector (none: one score, nothing to split)."""
        if not self.blocks_per_modality:
            return ()
        d = self.model.cfg.hidden
        return tuple(Block(m, i * d, (i + 1) * d) for i, m in enumerate(self.model.cfg.modalities))

    @torch.no_grad()
    def catalogue_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """(tokens (N, T), item vectors (N, D)) of every catalogue item, row 0 zero."""
        tokens, vectors = self.catalogue_tensors()
        tokens, vectors = tokens.numpy().astype(np.float32), vectors.numpy().astype(np.float32)
        tokens[0], vectors[0] = 0.0, 0.0
        return tokens, vectors

    def catalogue_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def example_inputs(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Export examples (distinct sizes > 1, so nothing is specialised): user graph feeds, item graph feeds."""
        length = min(7, self.history_len)
        tokens = torch.randn(3, length, self.token_dim)
        if self.flags:
            tokens[..., -len(self.model.cfg.modalities) :] = 1.0
        user = dict(zip(PLAIN_USER_INPUTS, (tokens, torch.tensor([length, 2, 1], dtype=torch.long)), strict=True))
        item = {feature_input(m): torch.randn(3, self.model.cfg.feature_dim(m)) for m in self.model.cfg.modalities}
        return user, item


# ----- parity ------------------------------------------------------------------------------------------------
@torch.no_grad()
def check_user_parity(
    spec: InnerProductExport, session: ort.InferenceSession, tokens: np.ndarray, seed: int = 0
) -> float:
    """Max |ORT - torch| of the user vector over lengths x batches (random histories of real items, their real
    tokens): the graph against the model's own encoder on the same history."""
    model = spec.model
    rng = np.random.default_rng(seed)
    worst = 0.0
    for length in sorted({min(n, spec.history_len) for n in PARITY_LENGTHS}):
        for batch in PARITY_BATCHES:
            items = torch.from_numpy(random_histories(rng, batch, length, model.cfg.num_items))
            lengths = (items > 0).sum(dim=1)
            expected = model.encode(items, lengths).numpy()
            got = session.run([USER_OUTPUT], {"tokens": tokens[items.numpy()], "lengths": lengths.numpy()})[0]
            diff = require_parity(f"the user vector (length {length}, batch {batch})", max_abs_diff(got, expected))
            worst = max(worst, diff)
    return worst


@torch.no_grad()
def check_encode_parity(
    spec: InnerProductExport, tower: UserTower, histories: np.ndarray, lengths: np.ndarray
) -> float:
    """UserTower.encode (the service's truncation + ORT) vs model.encode on real histories (R, L), lengths (R,)."""
    expected = spec.model.encode(torch.from_numpy(histories), torch.from_numpy(lengths)).numpy()
    got = tower.encode([h[:n] for h, n in zip(histories, lengths, strict=True)])
    return require_parity("UserTower.encode vs model.encode", max_abs_diff(got, expected))


@torch.no_grad()
def check_item_parity(
    spec: InnerProductExport, session: ort.InferenceSession, features: dict[str, np.ndarray]
) -> float:
    """Item graph on ``features`` (modality -> (B, F_m)) under ONNX Runtime vs the same module in PyTorch."""
    feeds = {feature_input(m): np.ascontiguousarray(features[m], dtype=np.float32) for m in spec.model.cfg.modalities}
    got = session.run([ITEM_TOKENS, ITEM_VECTOR], feeds)
    want = spec.graphs()[1](**{name: torch.from_numpy(f) for name, f in feeds.items()})
    worst = max(max_abs_diff(g, w.numpy()) for g, w in zip(got, want, strict=True))
    return require_parity("the item tower outputs", worst)


# ----- the bundle --------------------------------------------------------------------------------------------
def write_bundle(
    spec: InnerProductExport, ds: SeqDataset, root: Path, created: dict[str, Any], exporter: str = EXPORTER
) -> Manifest:
    """Write the ``inner_product`` bundle of ``spec.model`` into the (empty) folder ``root``, check parity, finalize."""
    model = spec.model
    cfg = model.cfg
    modalities = tuple(cfg.modalities)
    tokens, vectors = spec.catalogue_arrays()
    table = ItemTable(
        ids=["", *ds.item_ids],
        tokens=tokens,
        vectors={ITEM_VECTOR: vectors},
        clusters={},
        popularity=item_popularity(ds.train, ds.num_items).astype(np.float32),
        texts=["", *ds.texts] if ds.texts is not None else None,
    )
    widths = {m: cfg.feature_dim(m) for m in modalities}
    dims = Dims(hidden=model.user_dim, token=spec.token_dim, features=widths)
    scorer = Scorer(INNER_PRODUCT, modalities, blocks=spec.blocks())
    try:
        table.validate(dims, scorer, 0)
    except BundleError as exc:
        raise ExportError(f"the model's item table is not servable: {exc}") from exc
    writer = BundleWriter(root)
    writer.write_item_table(table)
    graphs = tower_graphs(modalities, inner_product=True)
    user_graph, item_graph = spec.graphs()
    user_inputs, item_inputs = spec.example_inputs()
    batch = ("batch", 1, None)
    parity: dict[str, float | int] = {}

    started = time.perf_counter()
    user_dynamic = {"tokens": {0: batch, 1: ("hist_len", 1, spec.history_len)}, "lengths": {0: batch}}
    export_graph(user_graph, user_inputs, root / USER_TOWER, [USER_OUTPUT], user_dynamic, exporter)
    session = open_session(root / USER_TOWER, "cpu")
    parity["user_max_abs_diff"] = check_user_parity(spec, session, tokens)
    tower = UserTower(session, ItemArrays.from_table(table), None, spec.history_len, graphs["user"])
    rows = min(PARITY_USERS, len(ds.test))
    parity["encode_max_abs_diff"] = check_encode_parity(spec, tower, ds.test.histories[:rows], ds.test.lengths[:rows])
    log.info("user tower exported and checked in %.1fs: %s", time.perf_counter() - started, parity)

    started = time.perf_counter()
    item_dynamic = {name: {0: batch} for name in item_inputs}
    export_graph(item_graph, item_inputs, root / ITEM_TOWER, list(graphs["item"].outputs), item_dynamic, exporter)
    session = open_session(root / ITEM_TOWER, "cpu")
    features = parity_features(model, ds)
    parity["item_max_abs_diff"] = check_item_parity(spec, session, features)
    log.info("item tower exported and checked in %.1fs: %s", time.perf_counter() - started, parity)

    manifest = Manifest(
        format=FORMAT,
        format_version=FORMAT_VERSION,
        model_kind=spec.kind,
        model=cfg.to_dict(),
        dims=dims,
        scorer=scorer,
        graphs=graphs,
        num_items=table.num_items,
        num_interests=0,
        max_len=spec.history_len,
        export={"mode": getattr(cfg, "mode", "inductive"), "opset": OPSET, "exporter": exporter, "parity": parity},
        created=created,
    )
    manifest = writer.finalize(manifest)
    read_bundle(root)
    return manifest


def parity_features(model: nn.Module, ds: SeqDataset) -> dict[str, np.ndarray]:
    """Item-tower parity rows: real items, then one row per missing-modality pattern (all zero; and, with two
    modalities, each modality alone)."""
    mods = model.cfg.modalities
    real = {m: ds.features[m][1 : 1 + PARITY_ITEMS] for m in mods}
    patterns = [dict.fromkeys(mods, False)]
    if len(mods) == 2:
        patterns += [{mods[0]: True, mods[1]: False}, {mods[0]: False, mods[1]: True}]
    extra = {m: np.stack([real[m][i] * p[m] for i, p in enumerate(patterns)]) for m in mods}
    return {m: np.concatenate([real[m], extra[m]]).astype(np.float32) for m in mods}
