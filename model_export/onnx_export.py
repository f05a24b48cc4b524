"""Export a trained MISSRec to a serving bundle: item table, centroids and the two towers as ONNX, parity-checked.

Graphs (their names are written into manifest.graphs, which ``serving_core.towers`` reads)::

    user_tower.onnx  tokens (B, L, D) f32, lengths (B,) i64, interests (B, Q, D) f32, interest_lengths (B,) i64
                     -> user (B, D) f32, L2-normalised.  B, L (1..max_len) and Q are dynamic.
    item_tower.onnx  <m>_features (B, F_m) f32 for each modality m of the model
                     -> tokens (B, D) (adapter sum, no ID embedding: a cold item has none),
                        <m> (B, D) normalised adapter outputs, <m>_cluster (B,) i64 = 1 + nearest of centroids[1:]
                        (squared Euclidean in adapted space, ties to the lowest id; centroids baked in).

Exporter: the torch.export-based one (``dynamo=True``, torch's default), at opset 18, the opset its operator
library is written for (other opsets go through a version converter). The nn.Transformer trap (the legacy exporter
tracing ``nn.MultiheadAttention`` bakes the sequence length into Reshape nodes) does not apply to our layers
(missrec/layers.py has no shape-dependent Python ints): both exporters give graphs that run and match PyTorch at
every history length 1..50 (both checked in tests/test_export.py). The dynamo graph is chosen because it is the
cleaner one (about 160 nodes against about 510 with an ``If`` for the legacy TorchScript exporter, static output
widths, same ONNX Runtime speed), the legacy exporter is deprecated, and torch.export checks the declared dynamic
ranges (hist_len 1..max_len) while tracing, so model code that specialised a length would fail at export time,
not in serving. ``exporter="torchscript"`` stays available for comparison.

Parity is part of export (model_export/parity.py): every graph is run with ONNX Runtime against the PyTorch model
and any difference above ``PARITY_ATOL`` raises :class:`ExportError`; the measured maxima go into the manifest.
A bundle is written to a temporary folder next to ``out`` and renamed into place at the end, so a failed export
leaves nothing behind.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from missrec.baselines import item_popularity
from missrec.checkpoint import CheckpointError, attach_features, load_checkpoint
from missrec.data import DatasetError, SeqDataset, load_dataset
from missrec.mmsrec import MMSRec
from missrec.model import MISSRec
from missrec.msm4sr import MSM4SR
from model_export import seed_export
from model_export.parity import (
    PARITY_ITEMS,
    PARITY_USERS,
    ExportError,
    check_encode_parity,
    check_item_parity,
    check_user_parity,
    stored_cluster_agreement,
)
from serving_core.bundle import (
    FORMAT,
    FORMAT_VERSION,
    INNER_PRODUCT,
    ITEM_TOWER,
    ITEM_VECTOR,
    MISSREC_FUSION,
    USER_TOWER,
    BundleError,
    BundleWriter,
    Dims,
    Graph,
    ItemTable,
    Manifest,
    Scorer,
    creation_info,
    read_bundle,
    sha256_file,
)
from serving_core.towers import (
    USER_INPUTS,
    USER_OUTPUT,
    ItemArrays,
    UserTower,
    feature_input,
    item_tower_outputs,
    open_session,
    tower_graphs,
)

log = logging.getLogger(__name__)

OPSET = 18
EXPORTER = "dynamo"
EXPORTERS = ("dynamo", "torchscript")
ServableModel = MISSRec | MSM4SR | MMSRec


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


@contextmanager
def _quiet_exporter_logs() -> Iterator[None]:
    """The exporter's graph passes log every rewrite at INFO; keep them out of an INFO-level CLI run."""
    loggers = [logging.getLogger(name) for name in ("onnxscript", "onnx_ir")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(max(lg.getEffectiveLevel(), logging.WARNING))
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


# ----- export + checker --------------------------------------------------------------------------------------
def _export(
    module: nn.Module,
    inputs: dict[str, torch.Tensor],
    path: Path,
    outputs: list[str],
    dynamic: dict[str, dict[int, tuple[str, int, int | None]]],
    exporter: str,
) -> None:
    """Export ``module`` called with keyword ``inputs`` (in signature order; the names become the graph's input
    names) at OPSET, with the named dynamic axes ({input: {axis: (name, min, max)}}), then check the file."""
    if exporter not in EXPORTERS:
        raise ValueError(f"exporter must be one of {EXPORTERS}, got {exporter!r}")
    module.eval()
    names = list(inputs)
    with torch.no_grad():
        if exporter == "dynamo":
            specs = {spec[0]: spec[1:] for axes in dynamic.values() for spec in axes.values()}
            dims = {name: torch.export.Dim(name, min=lo, max=hi) for name, (lo, hi) in specs.items()}
            shapes = {name: {axis: dims[spec[0]] for axis, spec in dynamic[name].items()} for name in names}
            with warnings.catch_warnings(), _quiet_exporter_logs():
                # shared axis names (batch) are reported as a rename conflict
                warnings.filterwarnings("ignore", message="# The axis name")
                program = torch.onnx.export(
                    module,
                    (),
                    kwargs=inputs,
                    dynamo=True,
                    input_names=names,
                    output_names=outputs,
                    opset_version=OPSET,
                    dynamic_shapes=shapes,
                    verbose=False,
                )
            program.save(str(path), external_data=False)
        else:
            axes = {name: {axis: spec[0] for axis, spec in dynamic[name].items()} for name in names}
            axes.update({o: {0: "batch"} for o in outputs})
            torch.onnx.export(
                module,
                (),
                str(path),
                kwargs=inputs,
                dynamo=False,
                input_names=names,
                output_names=outputs,
                opset_version=OPSET,
                dynamic_axes=axes,
            )
    proto = onnx.load(str(path))
    try:
        onnx.checker.check_model(proto, full_check=True)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"{path.name} fails the ONNX checker: {exc}") from exc
    opset = {o.domain: o.version for o in proto.opset_import}.get("")
    if opset != OPSET:
        raise ExportError(f"{path.name} was exported at opset {opset}, expected {OPSET}")


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
    _export(UserTowerGraph(model), inputs, path, [USER_OUTPUT], dynamic, exporter)


def export_item_tower(model: MISSRec, path: Path, exporter: str = EXPORTER) -> None:
    cfg = model.cfg
    inputs = {feature_input(m): torch.randn(3, cfg.feature_dim(m)) for m in cfg.modalities}
    dynamic = {name: {0: ("batch", 1, None)} for name in inputs}
    _export(ItemTowerGraph(model), inputs, path, item_tower_outputs(cfg.modalities), dynamic, exporter)


# ----- the bundle --------------------------------------------------------------------------------------------
def load_model(checkpoint: Path, data_dir: Path) -> tuple[ServableModel, dict[str, Any], SeqDataset]:
    """Checkpoint + its dataset's features; anything but a trained MISSRec, MSM4SR or MMSRec is an ExportError."""
    try:
        loaded = load_checkpoint(checkpoint)
        if not isinstance(loaded.model, MISSRec | MSM4SR | MMSRec):
            raise ExportError(
                f"{checkpoint} holds a {loaded.model_type} model, which has no item tower (ID-only: a new item "
                "could never be served); only MISSRec, MSM4SR and MMSRec checkpoints can be exported"
            )
        ds = load_dataset(data_dir)
        attach_features(loaded.model, ds, loaded.meta)
    except (CheckpointError, DatasetError) as exc:
        raise ExportError(str(exc)) from exc
    model = loaded.model.eval()
    if isinstance(model, MISSRec) and model.centroids.shape[0] < 2:
        raise ExportError(f"{checkpoint}: the model has no interest clusters (was it trained?)")
    return model, loaded.meta, ds


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
    model: ServableModel, ds: SeqDataset, root: Path, created: dict[str, Any], exporter: str = EXPORTER
) -> Manifest:
    """Write every bundle file of ``model`` into the (empty) folder ``root``, check parity, finalize."""
    if not isinstance(model, MISSRec):
        return write_inner_product_bundle(model, ds, root, created, exporter)
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


def write_inner_product_bundle(
    model: seed_export.SeedModel, ds: SeqDataset, root: Path, created: dict[str, Any], exporter: str = EXPORTER
) -> Manifest:
    """MSM4SR or MMSRec: an ``inner_product`` bundle (see :mod:`model_export.seed_export`)."""
    cfg = model.cfg
    modalities = tuple(cfg.modalities)
    tokens, vectors = seed_export.catalogue_arrays(model)
    table = ItemTable(
        ids=["", *ds.item_ids],
        tokens=tokens,
        vectors={ITEM_VECTOR: vectors},
        clusters={},
        popularity=item_popularity(ds.train, ds.num_items).astype(np.float32),
        texts=["", *ds.texts] if ds.texts is not None else None,
    )
    widths = {m: cfg.feature_dim(m) for m in modalities}
    dims = Dims(hidden=model.user_dim, token=seed_export.token_dim(model), features=widths)
    scorer = Scorer(INNER_PRODUCT, modalities, blocks=seed_export.blocks(model))
    try:
        table.validate(dims, scorer, 0)
    except BundleError as exc:
        raise ExportError(f"the model's item table is not servable: {exc}") from exc
    writer = BundleWriter(root)
    writer.write_item_table(table)
    graphs = tower_graphs(modalities, inner_product=True)
    user_graph, item_graph = seed_export.graphs(model)
    user_inputs, item_inputs = seed_export.example_inputs(model)
    batch = ("batch", 1, None)
    parity: dict[str, float | int] = {}

    started = time.perf_counter()
    user_dynamic = {"tokens": {0: batch, 1: ("hist_len", 1, seed_export.history_len(model))}, "lengths": {0: batch}}
    _export(user_graph, user_inputs, root / USER_TOWER, [USER_OUTPUT], user_dynamic, exporter)
    session = open_session(root / USER_TOWER, "cpu")
    parity["user_max_abs_diff"] = seed_export.check_user_parity(model, session, tokens)
    tower = UserTower(session, ItemArrays.from_table(table), None, seed_export.history_len(model), graphs["user"])
    rows = min(PARITY_USERS, len(ds.test))
    parity["encode_max_abs_diff"] = seed_export.check_encode_parity(
        model, tower, ds.test.histories[:rows], ds.test.lengths[:rows]
    )
    log.info("user tower exported and checked in %.1fs: %s", time.perf_counter() - started, parity)

    started = time.perf_counter()
    item_dynamic = {name: {0: batch} for name in item_inputs}
    _export(item_graph, item_inputs, root / ITEM_TOWER, list(graphs["item"].outputs), item_dynamic, exporter)
    session = open_session(root / ITEM_TOWER, "cpu")
    features = _parity_features(model, ds)
    parity["item_max_abs_diff"] = seed_export.check_item_parity(model, session, features)
    log.info("item tower exported and checked in %.1fs: %s", time.perf_counter() - started, parity)

    manifest = Manifest(
        format=FORMAT,
        format_version=FORMAT_VERSION,
        model_kind=model_kind(model),
        model=cfg.to_dict(),
        dims=dims,
        scorer=scorer,
        graphs=graphs,
        num_items=table.num_items,
        num_interests=0,
        max_len=seed_export.history_len(model),
        export={"mode": getattr(cfg, "mode", "inductive"), "opset": OPSET, "exporter": exporter, "parity": parity},
        created=created,
    )
    manifest = writer.finalize(manifest)
    read_bundle(root)
    return manifest


def _parity_features(model: ServableModel, ds: SeqDataset) -> dict[str, np.ndarray]:
    """Item-tower parity rows: real items, then one row per missing-modality pattern (all zero; and, with two
    modalities, each modality alone)."""
    mods = model.cfg.modalities
    real = {m: ds.features[m][1 : 1 + PARITY_ITEMS] for m in mods}
    patterns = [dict.fromkeys(mods, False)]
    if len(mods) == 2:
        patterns += [{mods[0]: True, mods[1]: False}, {mods[0]: False, mods[1]: True}]
    extra = {m: np.stack([real[m][i] * p[m] for i, p in enumerate(patterns)]) for m in mods}
    return {m: np.concatenate([real[m], extra[m]]).astype(np.float32) for m in mods}


def model_kind(model: ServableModel) -> str:
    return {MISSRec: "missrec", MSM4SR: "msm4sr", MMSRec: "mmsrec"}[type(model)]


def _make_readable(root: Path) -> None:
    """Give the bundle the permissions of ordinary new files and folders (umask applied): mkdtemp creates 0700 and
    temp-file writers 0600, which a service running as another user could not read."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [root, *root.rglob("*")]:
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def export_bundle(checkpoint: Path, data_dir: Path, out: Path, *, overwrite: bool = False) -> Manifest:
    """Export the MISSRec ``checkpoint`` with the features of the dataset in ``data_dir`` to the bundle ``out``.

    Nothing is left behind on failure; an existing ``out`` is replaced only with ``overwrite``."""
    checkpoint, data_dir, out = Path(checkpoint), Path(data_dir), Path(out)
    if out.exists() and not overwrite:
        raise ExportError(f"{out} already exists (pass overwrite=True to replace it)")
    started = time.perf_counter()
    model, meta, ds = load_model(checkpoint, data_dir)
    created = creation_info(
        "missrec export",
        checkpoint=str(checkpoint),
        checkpoint_sha256=sha256_file(checkpoint),
        dataset=ds.name,
        dataset_fingerprint=ds.fingerprint,
        torch=str(torch.__version__),
        onnx=onnx.__version__,
        onnxruntime=ort.__version__,
        cold_items=len(meta.get("cold_items") or []),
    )
    log.info("exporting %s (%s, %d items) to %s", checkpoint, model_kind(model), ds.num_items, out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        manifest = write_bundle(model, ds, tmp, created)
        _make_readable(tmp)
        if out.exists():  # overwrite: move the old bundle aside, put the new one in place, drop the old
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("bundle %s written to %s in %.1fs", manifest.version, out, time.perf_counter() - started)
    return manifest
