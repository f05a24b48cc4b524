"""The one training and evaluation path of every model (:func:`train_model`): optional pre-training, fine-tuning
by :func:`missrec.training.loop.fit`, then :func:`missrec.evaluation.report.evaluate_run`, optionally under the
cold-item protocol; and saving a run (checkpoint + metrics). The families' recipes (:mod:`missrec.recipes`) build
their model and call it."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from missrec.data.dataset import Interactions, SeqDataset
from missrec.evaluation.cold import TrainingData, training_data
from missrec.evaluation.report import evaluate_run
from missrec.models.checkpoint import dataset_info, save_checkpoint
from missrec.training.loop import FitResult, TrainOptions, fit

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    model: Any
    metrics: dict[str, dict[str, float]]
    fit: FitResult | None = None
    cold_items: np.ndarray | None = None
    info: dict[str, Any] = field(default_factory=dict)
    test_ranks: dict[str, np.ndarray] = field(default_factory=dict)  # protocol -> (R,) test target ranks


class MissingFeatures(ValueError):
    """A model that needs item features was asked to train on a dataset without them."""


PretrainHook = Callable[[nn.Module, Interactions, Interactions, torch.Tensor | None], dict[str, Any]]


def train_model(
    ds: SeqDataset,
    model: nn.Module,
    opts: TrainOptions,
    name: str,
    cold_fraction: float | None = None,
    parameters: list[nn.Parameter] | None = None,
    pretrain: PretrainHook | None = None,
    before_fit: Callable[[nn.Module, TrainingData], None] | None = None,
    after_fit: Callable[[nn.Module], None] | None = None,
) -> RunResult:
    """The one training and evaluation path of every model: optional pre-training (on the same training rows),
    fine-tuning by :func:`missrec.training.loop.fit` (the protocol: withheld items masked out of the training
    softmax and the validation candidates, validation as served), then :func:`evaluate_run` (valid + test, both
    protocols, test_few, and test_cold / test_warm under the cold-item protocol, which withholds ``cold_fraction``
    of the items from every stage of training). before_fit(model, data) / after_fit(model): set up and undo what a lever
    changes (feature normalisation), around pre-training and fine-tuning."""
    data = training_data(ds, cold_fraction, opts.seed)
    if before_fit is not None:
        before_fit(model, data)
    pretraining = None if pretrain is None else pretrain(model, data.train, data.valid, data.known)
    result = fit(model, data.train, data.valid, opts, known_items=data.known, parameters=parameters, name=name)
    if after_fit is not None:
        after_fit(model)
    run = finish(model, ds, data, opts, result)
    if pretraining is not None:
        run.info["pretraining"] = pretraining
    return run


def finish(model: Any, ds: SeqDataset, data: TrainingData, opts: TrainOptions, result: FitResult | None) -> RunResult:
    metrics, info, ranks = evaluate_run(model, ds, data, opts)
    if result is not None:
        info.update(best_epoch=result.best_epoch, epochs_run=len(result.history), seconds=round(result.seconds, 1))
    return RunResult(model=model, metrics=metrics, fit=result, cold_items=data.withheld, info=info, test_ranks=ranks)


def require_features(ds: SeqDataset, model: str) -> None:
    """Raise :class:`MissingFeatures` when ``ds`` has no item features (ID-only data)."""
    if not ds.features:
        raise MissingFeatures(
            f"{model} needs item features (text or image: {ds.name}.feat1CLS / .feat3CLS), and dataset "
            f"{ds.name} has none; ID-only data can train SASRec and popularity"
        )


def save_run(run: RunResult, ds: SeqDataset, out_dir: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """RUN_DIR/checkpoint.pt + RUN_DIR/metrics.json."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    training = {**run.info, **(extra or {}), "history": run.fit.history if run.fit else []}
    save_checkpoint(
        out / "checkpoint.pt",
        run.model,
        dataset=dataset_info(ds),
        training=training,
        cold_items=np.flatnonzero(run.cold_items) if run.cold_items is not None else None,
    )
    (out / "metrics.json").write_text(json.dumps({**run.metrics, "info": run.info}, indent=2) + "\n")
    return out


def feature_widths(ds: SeqDataset) -> dict[str, int]:
    """``text_dim`` / ``image_dim`` of a feature model sized for ``ds`` (0 for a modality it lacks)."""
    return {f"{m}_dim": (ds.features[m].shape[1] if m in ds.features else 0) for m in ("text", "image")}


def stage_info(result: Any) -> dict[str, Any]:
    """What a run records of one stage (e.g. pre-training): best epoch, epochs run, seconds, curve."""
    return {
        "best_epoch": result.best_epoch,
        "epochs_run": len(result.history),
        "seconds": round(result.seconds, 1),
        "best_valid_ndcg@10": result.best_valid.get("ndcg@10"),
        "history": result.history,
    }
