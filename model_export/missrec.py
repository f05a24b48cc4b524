"""MISSRec's serving export: item table, interest centroids and the two towers as ONNX, parity-checked.

Graphs (their names are written into manifest.graphs, which ``serving_core.towers`` reads)::

    user_tower.onnx  tokens (B, L, D) f32, lengths (B,) i64, interests (B, Q, D) f32, interest_lengths (B,) i64
                     -> user (B, D) f32, L2-normalised.  B, L (1..max_len) and Q are dynamic.
    item_tower.onnx  <m>_features (B, F_m) f32 for each modality m of the model
                     -> tokens (B, D) (adapter sum, no ID embedding: a cold item has none),
                        <m> (B, D) normalised adapter outputs, <m>_cluster (B,) i64 = 1 + nearest of centroids[1:]
                        (squared Euclidean in adapted space, ties to the lowest id; centroids baked in).

Parity is part of export: the user tower at history lengths PARITY_LENGTHS x batches PARITY_BATCHES (random
histories of real items, with their real tokens and interest centroids); :class:`serving_core.towers.UserTower`
end to end (numpy interest ids + ONNX) against ``model.encode`` on real histories; the item tower against the
model's adapters and the nearest-centroid rule of :func:`missrec.nn.interests.assign_nearest`. Any difference
above ``PARITY_ATOL`` raises :class:`~model_export.parity.ExportError`; the measured maxima go into the manifest.
How the bundle is put in place: :mod:`model_export.bundle`.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
import torch.nn.functional as F
from torch import nn

from missrec.data.dataset import SeqDataset
from missrec.models.missrec import MISSRec
from missrec.models.popularity import item_popularity
from missrec.nn.interests import assign_in_batches
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
    ITEM_TOWER,
    MISSREC_FUSION,
    USER_TOWER,
    BundleError,
    BundleWriter,
    Dims,
    Graph,
    ItemTable,
    Manifest,
    Scorer,
    read_bundle,
)
from serving_core.towers import (
    ITEM_TOKENS,
    USER_INPUTS,
    USER_OUTPUT,
    ItemArrays,
    UserTower,
    cluster_output,
    feature_input,
    item_tower_outputs,
    open_session,
)

log = logging.getLogger(__name__)


# ----- the exported modules ------------------------------------------------------------------------------------
class UserTowerGraph(nn.Module):
    """``model.user_tower`` returning only the user vector (the encoder outputs are a training-time by-product)."""

    def __init__(self, model: MISSRec) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, tokens: torch.Tensor, lengths: torch.Tensor, interests: torch.Tensor, interest_lengths: torch.Tensor
    ) -> torch.Tensor:
        return self.model.user_tower(tokens, lengths, interests, interest_lengths)[0]  # (B, D)


class ItemTowerGraph(nn.Module):
    """``model.encode_items`` as a graph: raw features of new items -> token, unit modality vectors, clusters."""

    def __init__(self, model: MISSRec) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, text_features: torch.Tensor | None = None, image_features: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, ...]:
        """Features (B, F_m) of the model's modalities (the graph has inputs for those only)."""
        given = {"text": text_features, "image": image_features}
        out = self.model.encode_items({m: given[m] for m in self.model.cfg.modalities})
        mods = self.model.cfg.modalities
        return (out.tokens, *(out.normed[m] for m in mods), *(out.clusters[m] for m in mods))


def export_user_tower(model: MISSRec, path: Path, exporter: str = EXPORTER) -> None:
    cfg = model.cfg
    b, length, q = 3, min(7, cfg.max_len), 5  # distinct example sizes > 1: nothing gets specialised
    example = (
        torch.randn(b, length, cfg.hidden),
        torch.tensor([length, 2, 1], dtype=torch.long),
        torch.randn(b, q, cfg.hidden),
        torch.tensor([q, 3, 1], dtype=torch.long),
    )
    inputs = dict(zip(USER_INPUTS, example, strict=True))  # tokens, lengths, interests, interest_lengths
    batch = ("batch", 1, None)
    dynamic = {
        "tokens": {0: batch, 1: ("hist_len", 1, cfg.max_len)},
        "lengths": {0: batch},
        "interests": {0: batch, 1: ("n_interests", 1, None)},
        "interest_lengths": {0: batch},
    }
    export_graph(UserTowerGraph(model), inputs, path, [USER_OUTPUT], dynamic, exporter)


def export_item_tower(model: MISSRec, path: Path, exporter: str = EXPORTER) -> None:
    cfg = model.cfg
    inputs = {feature_input(m): torch.randn(3, cfg.feature_dim(m)) for m in cfg.modalities}
    dynamic = {name: {0: ("batch", 1, None)} for name in inputs}
    export_graph(ItemTowerGraph(model), inputs, path, item_tower_outputs(cfg.modalities), dynamic, exporter)


# ----- the bundle --------------------------------------------------------------------------------------------
@torch.no_grad()
def build_item_table(model: MISSRec, ds: SeqDataset) -> ItemTable:
    tables = model.item_tables()
    return ItemTable(
        ids=["", *ds.item_ids],
        tokens=tables.tokens.numpy().astype(np.float32),
        vectors={m: v.numpy().astype(np.float32) for m, v in tables.normed.items()},
        clusters={m: getattr(model, f"{m}_cluster").numpy().astype(np.int64) for m in model.cfg.modalities},
        popularity=item_popularity(ds.train, ds.num_items).astype(np.float32),
        id_vectors=tables.ids.numpy().astype(np.float32) if tables.ids is not None else None,
        texts=["", *ds.texts] if ds.texts is not None else None,
    )


def write_bundle(
    model: MISSRec, ds: SeqDataset, root: Path, created: dict[str, Any], exporter: str = EXPORTER
) -> Manifest:
    """Write every bundle file of the MISSRec ``model`` into the (empty) folder ``root``, check parity, finalize."""
    if model.centroids.shape[0] < 2:
        raise ExportError(
            f"{created.get('checkpoint', 'the checkpoint')}: the model has no interest clusters (was it trained?)"
        )
    cfg = model.cfg
    k = int(model.centroids.shape[0]) - 1
    table = build_item_table(model, ds)
    centroids = model.centroids.numpy().astype(np.float32)
    dims = Dims(hidden=cfg.hidden, token=cfg.hidden, features={m: cfg.feature_dim(m) for m in cfg.modalities})
    try:
        table.validate(dims, Scorer(MISSREC_FUSION, tuple(cfg.modalities), transductive=cfg.mode == "transductive"), k)
    except BundleError as exc:
        raise ExportError(f"the model's item table is not servable: {exc}") from exc
    writer = BundleWriter(root)
    writer.write_item_table(table)
    writer.write_centroids(centroids)
    parity: dict[str, float | int] = {}

    started = time.perf_counter()
    export_user_tower(model, root / USER_TOWER, exporter)
    session = open_session(root / USER_TOWER, "cpu")
    parity["user_max_abs_diff"] = check_user_parity(model, session)
    tower = UserTower(session, ItemArrays.from_table(table), centroids, cfg.max_len)
    rows = min(PARITY_USERS, len(ds.test))
    parity["encode_max_abs_diff"] = check_encode_parity(model, tower, ds.test.histories[:rows], ds.test.lengths[:rows])
    log.info("user tower exported and checked in %.1fs: %s", time.perf_counter() - started, parity)

    started = time.perf_counter()
    export_item_tower(model, root / ITEM_TOWER, exporter)
    session = open_session(root / ITEM_TOWER, "cpu")
    rows = slice(1, 1 + PARITY_ITEMS)
    # real items, plus all-zero rows: what a missing modality looks like
    features = {
        m: np.concatenate([ds.features[m][rows], np.zeros((2, cfg.feature_dim(m)), np.float32)]) for m in cfg.modalities
    }
    parity.update(check_item_parity(model, session, features))
    stored_is_nearest = stored_cluster_agreement(model, rows)
    log.info("item tower exported and checked in %.1fs: %s", time.perf_counter() - started, parity)

    modalities = tuple(cfg.modalities)
    manifest = Manifest(
        format=FORMAT,
        format_version=FORMAT_VERSION,
        model_kind="missrec",
        model=cfg.to_dict(),
        dims=Dims(hidden=cfg.hidden, token=cfg.hidden, features={m: cfg.feature_dim(m) for m in modalities}),
        scorer=Scorer(
            kind=MISSREC_FUSION,
            modalities=modalities,
            alpha=float(model.alpha.detach()),
            tau=cfg.tau,
            transductive=cfg.mode == "transductive",
        ),
        graphs={
            "user": Graph(USER_TOWER, USER_INPUTS, (USER_OUTPUT,)),
            "item": Graph(
                ITEM_TOWER, tuple(feature_input(m) for m in modalities), tuple(item_tower_outputs(modalities))
            ),
        },
        num_items=table.num_items,
        num_interests=k,
        max_len=cfg.max_len,
        export={
            "mode": cfg.mode,
            "opset": OPSET,
            "exporter": exporter,
            "parity": parity,
            "stored_cluster_is_nearest": stored_is_nearest,
        },
        created=created,
    )
    manifest = writer.finalize(manifest)
    read_bundle(root)  # read back what was written: the bundle must pass its own gate
    return manifest


# ----- parity ------------------------------------------------------------------------------------------------
@torch.no_grad()
def check_user_parity(model: MISSRec, session: ort.InferenceSession, seed: int = 0) -> float:
    """Max |ORT - torch| of the user vector over lengths PARITY_LENGTHS x batches PARITY_BATCHES (random
    histories of real items, their real interest tokens); raises ExportError above PARITY_ATOL."""
    rng = np.random.default_rng(seed)
    tokens = model.item_tables().tokens
    worst = 0.0
    for length in sorted({min(n, model.cfg.max_len) for n in PARITY_LENGTHS}):
        for batch in PARITY_BATCHES:
            items = torch.from_numpy(random_histories(rng, batch, length, model.cfg.num_items))
            lengths = (items > 0).sum(dim=1)
            ids = model.interest_ids(items)
            feeds = {
                "tokens": tokens[items],
                "lengths": lengths,
                "interests": model.centroids[ids],
                "interest_lengths": (ids > 0).sum(dim=1).clamp(min=1),
            }
            expected = model.user_tower(*feeds.values())[0].numpy()
            got = session.run([USER_OUTPUT], {k: v.numpy() for k, v in feeds.items()})[0]
            diff = require_parity(f"the user vector (length {length}, batch {batch})", max_abs_diff(got, expected))
            worst = max(worst, diff)
    return worst


@torch.no_grad()
def check_encode_parity(model: MISSRec, tower: UserTower, histories: np.ndarray, lengths: np.ndarray) -> float:
    """UserTower.encode (numpy interest ids + ORT) vs model.encode on real histories (R, L) with lengths (R,)."""
    expected = model.encode(torch.from_numpy(histories), torch.from_numpy(lengths))[0].numpy()
    got = tower.encode([h[:n] for h, n in zip(histories, lengths, strict=True)])
    return require_parity("UserTower.encode vs model.encode", max_abs_diff(got, expected))


@torch.no_grad()
def check_item_parity(
    model: MISSRec, session: ort.InferenceSession, features: dict[str, np.ndarray]
) -> dict[str, float | int]:
    """Item tower on ``features`` (modality -> (B, F_m)) vs the model's adapters and ``assign_nearest`` rule.

    Vectors must agree within PARITY_ATOL; cluster ids must be identical except at exact-arithmetic ties (the
    two candidate centroids' distances within 1e-5 relative), which are counted, not failed."""
    modalities = model.cfg.modalities
    feeds = {feature_input(m): np.ascontiguousarray(features[m], dtype=np.float32) for m in modalities}
    got = dict(zip(item_tower_outputs(modalities), session.run(None, feeds), strict=True))
    centroids = model.centroids[1:]
    adapted = {m: model.adapters[m](torch.from_numpy(feeds[feature_input(m)])) for m in modalities}
    worst = max_abs_diff(got[ITEM_TOKENS], torch.stack(list(adapted.values())).sum(dim=0).numpy())
    ties = 0
    for m, a in adapted.items():
        worst = max(worst, max_abs_diff(got[m], F.normalize(a, dim=-1).numpy()))
        expected = assign_in_batches(a, centroids) + 1
        onnx_ids = torch.from_numpy(got[cluster_output(m)])
        differ = torch.nonzero(onnx_ids != expected).squeeze(1)
        if differ.numel():
            dist = torch.cdist(a[differ].double(), centroids.double()) ** 2  # (n, K)
            picked = dist.gather(1, onnx_ids[differ, None] - 1).squeeze(1)
            best = dist.gather(1, expected[differ, None] - 1).squeeze(1)
            if not torch.all(picked - best <= 1e-5 * best.abs().clamp(min=1.0)):
                raise ExportError(f"item tower assigns {differ.numel()} {m} vectors to a different interest cluster")
            ties += differ.numel()
    return {"item_max_abs_diff": require_parity("the item tower outputs", worst), "item_cluster_ties": ties}


@torch.no_grad()
def stored_cluster_agreement(model: MISSRec, rows: slice) -> float:
    """Fraction of (item, modality) pairs in ``rows`` whose stored cluster lookup is still the nearest centroid.

    The lookups are refreshed at the start of each epoch and the adapters move during it, so a trained model's
    stored clusters lag its adapters a little. Serving uses the stored lookups for known items (as the model does)
    and the nearest-centroid rule only for new items; this number says how often the two differ. Diagnostic only.
    """
    adapted = model.adapted()
    same = [
        (assign_in_batches(a[rows], model.centroids[1:]) + 1 == getattr(model, f"{m}_cluster")[rows]).double().mean()
        for m, a in adapted.items()
    ]
    return round(float(torch.stack(same).mean()), 4)
