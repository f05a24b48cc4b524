"""MMSRec's recipe (seed-towers spec B): the spec's model sized for a dataset, optional item-level multi-view
pre-training (:mod:`missrec.training.pretrain_mmsrec`), masked-item fine-tuning with the spec's AdamW settings;
its compare runs (warm, cold protocol)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import torch
from torch import nn

from missrec.data.dataset import Interactions, SeqDataset
from missrec.models.checkpoint import attach_features
from missrec.models.mmsrec import MMSRec, MMSRecConfig
from missrec.recipes import COLD_FRACTION, CompareRun, Recipe, TrainRequest
from missrec.training.loop import TrainOptions
from missrec.training.pretrain_mmsrec import pretrain_items
from missrec.training.run import RunResult, feature_widths, require_features, train_model

# The spec's optimiser, applied on top of the run options.
MMSREC_OPTIMISER: dict[str, Any] = {"decoupled_weight_decay": True, "weight_decay": 0.01, "grad_clip": 1.0}
PRETRAIN_EPOCHS = 0  # `missrec train --model mmsrec` default
# MMSRec (d 512, its item tower over the whole catalogue every step) costs ~1-3 min per epoch on the 2-core machine:
# cap its epochs so the whole compare stays within 45 minutes -- when `compare --epochs` is left at its default
# (TrainOptions.epochs); an explicit `--epochs N` is honoured for MMSRec as for every other model.
MMSREC_MAX_EPOCHS = 8


def mmsrec_config(ds: SeqDataset, **overrides: Any) -> MMSRecConfig:
    """The spec's MMSRec sized for ``ds`` (items, feature widths; L stays 20 as on Amazon data); overrides win."""
    return MMSRecConfig(**({"num_items": ds.num_items, **feature_widths(ds)} | overrides))


def build_mmsrec(ds: SeqDataset, seed: int = 0, **overrides: Any) -> MMSRec:
    torch.manual_seed(seed)
    model = MMSRec(mmsrec_config(ds, **overrides))
    attach_features(model, ds)
    return model


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


def train(ds: SeqDataset, opts: TrainOptions, request: TrainRequest) -> RunResult:
    pre = PRETRAIN_EPOCHS if request.pretrain_epochs is None else request.pretrain_epochs
    return train_mmsrec(ds, opts, pre, request.cold_fraction)


def _compare(name: str, cold_fraction: float | None = None) -> Recipe:
    def recipe(ds: SeqDataset, opts: TrainOptions, config: dict[str, Any] | None) -> RunResult:
        default = opts.epochs == TrainOptions.epochs  # the budget's cap, unless the caller chose the epochs
        capped = replace(opts, epochs=MMSREC_MAX_EPOCHS) if default else opts
        return train_mmsrec(ds, capped, cold_fraction=cold_fraction, name=name, **(config or {}))

    return recipe


COMPARE: tuple[CompareRun, ...] = (
    CompareRun("mmsrec", "mmsrec", _compare("mmsrec")),
    CompareRun("mmsrec_cold", "mmsrec", _compare("mmsrec_cold", COLD_FRACTION), cold=True),
)
