"""Self-describing checkpoints: config, weights, interest centroids and lookups, dataset fingerprint.

Everything in the file is a tensor or a plain Python value, so it loads with ``torch.load(weights_only=True)``;
nothing is unpickled. Item features are data, not weights: attach them with :func:`attach_features`.
"""

from __future__ import annotations

import logging
import platform
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from missrec.data.dataset import SeqDataset
from missrec.families import FAMILIES, family_of

log = logging.getLogger(__name__)

FORMAT = "missrec-checkpoint"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or that does not fit the data it is used with."""


@dataclass
class Checkpoint:
    model: nn.Module
    meta: dict[str, Any]

    @property
    def model_type(self) -> str:
        return str(self.meta["model_type"])


def dataset_info(ds: SeqDataset) -> dict[str, Any]:
    return {
        "name": ds.name,
        "fingerprint": ds.fingerprint,
        "num_items": ds.num_items,
        "num_users": len(ds.user_ids),
        "feature_dims": {m: int(f.shape[1]) for m, f in ds.features.items()},
    }


def save_checkpoint(
    path: str | Path,
    model: nn.Module,
    *,
    dataset: dict[str, Any] | None = None,
    training: dict[str, Any] | None = None,
    cold_items: np.ndarray | None = None,
) -> Path:
    """Write ``model`` (the model of a trainable family, :mod:`missrec.families`) and its metadata to ``path``
    (parent folders created)."""
    try:
        model_type = family_of(model).name
    except TypeError:
        raise TypeError(f"cannot checkpoint {type(model).__name__}") from None
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model_type": model_type,
        "config": model.cfg.to_dict(),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "dataset": dataset or {},
        "training": training or {},
        "cold_items": [int(i) for i in cold_items] if cold_items is not None else None,
        "created": {
            "at": datetime.now(UTC).isoformat(timespec="seconds"),
            "torch": str(torch.__version__),
            "python": platform.python_version(),
        },
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)
    return path


def load_checkpoint(path: str | Path, map_location: str = "cpu") -> Checkpoint:
    """Rebuild the model from a checkpoint written by :func:`save_checkpoint` (weights_only=True)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises several types for truncated or foreign files
        raise CheckpointError(f"{path} is not a readable checkpoint: {exc}") from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a {FORMAT} file")
    if payload.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has format version {payload.get('format_version')}, this code reads {FORMAT_VERSION}"
        )
    kind = FAMILIES.get(str(payload.get("model_type")))
    if kind is None or not kind.trainable:
        raise CheckpointError(f"{path}: unknown model type {payload.get('model_type')!r}")
    model_cls, config_cls = kind.model_class(), kind.config_class()
    try:
        model = model_cls(config_cls.from_dict(payload["config"]))
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: bad {payload['model_type']} config: {exc}") from exc
    try:
        restore_state(model, payload["state_dict"])
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not match the stored config: {exc}") from exc
    model.eval()
    meta = {k: v for k, v in payload.items() if k != "state_dict"}
    return Checkpoint(model=model, meta=meta)


def attach_features(model: nn.Module, ds: SeqDataset, meta: dict[str, Any] | None = None) -> None:
    """Give a model that reads item features (MISSRec, MSM4SR, MMSRec) its dataset's features, checking that the
    dataset fits the checkpoint.

    Item count or feature widths that differ are an error; a different fingerprint with the same shapes
    (e.g. the same catalogue with new splits) is logged as a warning.
    """
    if not hasattr(model, "set_item_features"):
        if ds.num_items != model.cfg.num_items:
            raise CheckpointError(f"dataset has {ds.num_items} item rows, model expects {model.cfg.num_items}")
        return
    cfg = model.cfg
    if ds.num_items != cfg.num_items:
        raise CheckpointError(f"dataset {ds.name} has {ds.num_items} item rows, model expects {cfg.num_items}")
    for m in cfg.modalities:
        if m not in ds.features:
            raise CheckpointError(f"model uses the {m} modality, dataset {ds.name} has no {m} features")
        if ds.features[m].shape[1] != cfg.feature_dim(m):
            raise CheckpointError(
                f"{m} features are {ds.features[m].shape[1]}-d in {ds.name}, model expects {cfg.feature_dim(m)}"
            )
    expected = (meta or {}).get("dataset", {}).get("fingerprint")
    if expected and expected != ds.fingerprint:
        log.warning("dataset fingerprint differs from the checkpoint's (%s vs %s)", ds.fingerprint[:12], expected[:12])
    model.set_item_features({m: torch.from_numpy(ds.features[m]) for m in cfg.modalities})


def restore_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """load_state_dict that also accepts buffers whose shape changed (interest centroids, cluster tables)."""
    own = dict(model.named_buffers())
    for key, value in state.items():
        if key in own and own[key].shape != value.shape:
            module_name, _, buffer_name = key.rpartition(".")
            module = model.get_submodule(module_name) if module_name else model
            setattr(module, buffer_name, torch.empty_like(value))
    model.load_state_dict(state)
