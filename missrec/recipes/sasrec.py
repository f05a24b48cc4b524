"""SASRec's recipe: the ID-only baseline sized for a dataset; its compare run and its search space (tuned with
the same budget as MISSRec before any claim of a lead)."""

from __future__ import annotations

from typing import Any

import torch

from missrec.data.dataset import SeqDataset
from missrec.models.sasrec import SASRec, SASRecConfig
from missrec.recipes import CompareRun, TrainRequest
from missrec.recipes.tuned import Param
from missrec.training.loop import TrainOptions
from missrec.training.run import RunResult, train_model

SEARCH_SPACE: tuple[Param, ...] = (
    Param("lr", "training", 2e-4, 5e-3, log=True),
    Param("weight_decay", "training", choices=(0.0, 1e-6, 1e-5, 1e-4)),
    Param("dropout", "architecture", 0.1, 0.6),
    Param("hidden", "architecture", choices=(64, 128, 300)),
    Param("n_layers", "architecture", choices=(1, 2)),
)
# The paper's values of every tunable parameter: trial 0.
DEFAULTS: dict[str, Any] = {"lr": 1e-3, "weight_decay": 0.0, "dropout": 0.5, "hidden": 300, "n_layers": 2}


def build(ds: SeqDataset, architecture: dict[str, Any], seed: int, mode: str = "inductive") -> SASRec:
    """A fresh SASRec for ``ds`` (seeded); ``mode`` is ignored (SASRec has IDs only)."""
    torch.manual_seed(seed)
    return SASRec(SASRecConfig(**({"num_items": ds.num_items, "max_len": ds.max_len} | architecture)))


def train_sasrec(ds: SeqDataset, opts: TrainOptions, config: dict[str, Any] | None = None) -> RunResult:
    """Train the ID-only SASRec baseline (config: SASRecConfig overrides)."""
    model = build(ds, config or {}, opts.seed)
    return train_model(ds, model, opts, "sasrec")


def train(ds: SeqDataset, opts: TrainOptions, request: TrainRequest) -> RunResult:
    if request.cold_fraction:
        raise ValueError("the cold-item protocol needs a model that scores items from features (not sasrec)")
    return train_sasrec(ds, opts, config=request.architecture)


COMPARE: tuple[CompareRun, ...] = (CompareRun("sasrec", "sasrec", lambda ds, o, c: train_sasrec(ds, o, config=c)),)
