"""``missrec export``: a checkpoint and its dataset to a serving bundle, written by the family's exporter
(:mod:`missrec.families`: ``model_export.<family>.write_bundle``) into a temporary folder next to ``out`` and
renamed into place at the end, so a failed export leaves nothing behind."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from importlib import import_module
from pathlib import Path
from typing import Any

import onnx
import onnxruntime as ort
import torch
from torch import nn

from missrec.data.dataset import DatasetError, SeqDataset, load_dataset
from missrec.families import FAMILIES, family_of
from missrec.models.checkpoint import CheckpointError, attach_features, load_checkpoint
from model_export.onnx import EXPORTER
from model_export.parity import ExportError
from serving_core.attribute_schema import ATTR_SUFFIX
from serving_core.attributes import attach_attributes, read_attr_file
from serving_core.bundle import Manifest, creation_info, read_manifest, sha256_file

log = logging.getLogger(__name__)


def exportable() -> tuple[str, ...]:
    """The families that have a serving export."""
    return tuple(name for name, f in FAMILIES.items() if f.exporter)


def load_model(checkpoint: Path, data_dir: Path) -> tuple[nn.Module, dict[str, Any], SeqDataset]:
    """Checkpoint + its dataset's features; a model of a family without an exporter is an ExportError."""
    try:
        loaded = load_checkpoint(checkpoint)
        if not FAMILIES[loaded.model_type].exporter:
            names = ", ".join(FAMILIES[f].model for f in exportable())
            raise ExportError(
                f"{checkpoint} holds a {loaded.model_type} model, which has no item tower (ID-only: a new item "
                f"could never be served); only {names} checkpoints can be exported"
            )
        ds = load_dataset(data_dir)
        attach_features(loaded.model, ds, loaded.meta)
    except (CheckpointError, DatasetError) as exc:
        raise ExportError(str(exc)) from exc
    return loaded.model.eval(), loaded.meta, ds


def model_kind(model: nn.Module) -> str:
    return family_of(model).name


def write_bundle(
    model: nn.Module, ds: SeqDataset, root: Path, created: dict[str, Any], exporter: str = EXPORTER
) -> Manifest:
    """Write every bundle file of ``model`` into the (empty) folder ``root`` with its family's exporter."""
    return import_module(family_of(model).exporter or "").write_bundle(model, ds, root, created, exporter)


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
        attr = data_dir / f"{ds.name}{ATTR_SUFFIX}"
        if attr.is_file():  # the atomic format's optional attributes: carried into the bundle
            schema = attach_attributes(tmp, read_attr_file(attr))
            manifest = read_manifest(tmp)
            log.info("attributes from %s: %s", attr, schema)
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
