"""Recipes for MSM4SR and MMSRec through the one training path (:func:`missrec.runs.train_model`): build the
model for a dataset, pre-train where the model has it, fine-tune with its optimiser settings, evaluate."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import torch
from torch import nn

from missrec.checkpoint import attach_features
from missrec.config import MMSRecConfig, Mode, MSM4SRConfig
from missrec.data import Interactions, SeqDataset
from missrec.mmsrec import MMSRec
from missrec.mmsrec_pretrain import pretrain_items
from missrec.msm4sr import MSM4SR
from missrec.msm4sr_pretrain import MSM4SRPretraining
from missrec.runs import RunResult, require_features, train_model
from missrec.train import TrainOptions, fit

# Optimiser settings of each model's spec, applied on top of the run options.
MSM4SR_OPTIMISER: dict[str, Any] = {"grad_clip": 5.0}  # Adam; clip 5 (spec: pre-training; kept for fine-tuning)
MMSREC_OPTIMISER: dict[str, Any] = {"decoupled_weight_decay": True, "weight_decay": 0.01, "grad_clip": 1.0}
# Pre-training's in-batch negatives must span the whole batch: never cut it into chunks.
WHOLE_BATCH = 1 << 40


def _widths(ds: SeqDataset) -> dict[str, int]:
    return {f"{m}_dim": (ds.features[m].shape[1] if m in ds.features else 0) for m in ("text", "image")}


def msm4sr_config(ds: SeqDataset, mode: Mode = "inductive", **overrides: Any) -> MSM4SRConfig:
    """The spec's MSM4SR sized for ``ds`` (items, feature widths, max length); overrides win."""
    sizes = {"num_items": ds.num_items, "mode": mode, "max_len": ds.max_len, **_widths(ds)}
    return MSM4SRConfig(**(sizes | overrides))


def mmsrec_config(ds: SeqDataset, **overrides: Any) -> MMSRecConfig:
    """The spec's MMSRec sized for ``ds`` (items, feature widths; L stays 20 as on Amazon data); overrides win."""
    return MMSRecConfig(**({"num_items": ds.num_items, **_widths(ds)} | overrides))


def build_msm4sr(ds: SeqDataset, mode: Mode = "inductive", seed: int = 0, **overrides: Any) -> MSM4SR:
    torch.manual_seed(seed)
    model = MSM4SR(msm4sr_config(ds, mode, **overrides))
    attach_features(model, ds)
    return model


def build_mmsrec(ds: SeqDataset, seed: int = 0, **overrides: Any) -> MMSRec:
    torch.manual_seed(seed)
    model = MMSRec(mmsrec_config(ds, **overrides))
    attach_features(model, ds)
    return model


def _stage_info(result: Any) -> dict[str, Any]:
    return {
        "best_epoch": result.best_epoch,
        "epochs_run": len(result.history),
        "seconds": round(result.seconds, 1),
        "best_valid_ndcg@10": result.best_valid.get("ndcg@10"),
        "history": result.history,
    }


def train_msm4sr(
    ds: SeqDataset,
    opts: TrainOptions,
    mode: Mode = "inductive",
    pretrain_epochs: int = 0,
    cold_fraction: float | None = None,
    name: str | None = None,
    **overrides: Any,
) -> RunResult:
    """MSM4SR: ``pretrain_epochs`` of mixup + item-drop pre-training (early stopping on validation NDCG@10, same
    patience), then full-softmax fine-tuning of everything."""
    if cold_fraction and mode != "inductive":
        raise ValueError("the cold-item protocol needs the inductive (no-ID) MSM4SR")
    require_features(ds, f"MSM4SR ({mode})")
    opts = replace(opts, **MSM4SR_OPTIMISER)
    model = build_msm4sr(ds, mode, opts.seed, **overrides)

    def pretrain(model: nn.Module, train: Interactions, valid: Interactions, known: torch.Tensor | None) -> dict:
        stage = replace(opts, epochs=pretrain_epochs, chunk_tokens=WHOLE_BATCH, train_exclude_history=False)
        result = fit(MSM4SRPretraining(model), train, valid, stage, known_items=known, name="msm4sr_pretrain")
        return _stage_info(result)

    name = name or f"msm4sr_{mode}"
    return train_model(ds, model, opts, name, cold_fraction, pretrain=pretrain if pretrain_epochs > 0 else None)


def train_mmsrec(
    ds: SeqDataset,
    opts: TrainOptions,
    pretrain_epochs: int = 0,
    cold_fraction: float | None = None,
    name: str | None = None,
    **overrides: Any,
) -> RunResult:
    """MMSRec: optional item-level multi-view pre-training over the items of the training rows (warm items only
    under the cold protocol), then masked-item fine-tuning (AdamW 1e-3, weight decay 0.01, clip 1)."""
    require_features(ds, "MMSRec")
    opts = replace(opts, **MMSREC_OPTIMISER)
    model = build_mmsrec(ds, opts.seed, **overrides)

    def pretrain(model: nn.Module, train: Interactions, valid: Interactions, known: torch.Tensor | None) -> dict:
        seen = np.union1d(np.unique(train.histories[train.histories > 0]), np.unique(train.targets))
        return pretrain_items(model, seen, opts, pretrain_epochs)  # type: ignore[arg-type]

    return train_model(
        ds, model, opts, name or "mmsrec", cold_fraction, pretrain=pretrain if pretrain_epochs > 0 else None
    )
