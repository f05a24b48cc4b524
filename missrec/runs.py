"""Training recipes used by the CLI: one path (:func:`train_model`) that pre-trains where the model has it,
fine-tunes, and evaluates any model, optionally under the cold-item protocol; MISSRec (optionally from a pre-trained
checkpoint) and SASRec recipes, popularity, and saving a run. MSM4SR and MMSRec recipes: :mod:`missrec.seed_runs`."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from missrec.baselines import Popularity, SASRec, item_popularity
from missrec.checkpoint import attach_features, dataset_info, load_checkpoint, save_checkpoint
from missrec.cold import withhold_items
from missrec.config import MISSRecConfig, Mode, SASRecConfig
from missrec.data import Interactions, SeqDataset
from missrec.evaluate import evaluate
from missrec.model import MISSRec
from missrec.train import FitResult, TrainOptions, fit

log = logging.getLogger(__name__)

METRIC_KEYS = ("recall@10", "ndcg@10", "recall@50", "ndcg@50")
# Weights that transfer from pre-training; the rest (ID embeddings, clusters) are domain-specific.
FROZEN_AFTER_PRETRAINING = ("position.", "encoder.", "decoder.")


@dataclass
class RunResult:
    model: Any
    metrics: dict[str, dict[str, float]]
    fit: FitResult | None = None
    cold_items: np.ndarray | None = None
    info: dict[str, Any] = field(default_factory=dict)


def _metrics_only(m: dict[str, float]) -> dict[str, float]:
    return {k: m[k] for k in METRIC_KEYS}


def missrec_config(ds: SeqDataset, mode: Mode = "inductive", **overrides: Any) -> MISSRecConfig:
    """The spec's architecture sized for ``ds`` (item count, feature widths, max length); overrides win."""
    sizes = {
        "num_items": ds.num_items,
        "text_dim": ds.features["text"].shape[1] if "text" in ds.features else 0,
        "image_dim": ds.features["image"].shape[1] if "image" in ds.features else 0,
        "mode": mode,
        "max_len": ds.max_len,
    }
    return MISSRecConfig(**(sizes | overrides))


def build_missrec(ds: SeqDataset, mode: Mode = "inductive", seed: int = 0, **overrides: Any) -> MISSRec:
    """A fresh MISSRec for ``ds`` (seeded), with the dataset's item features attached."""
    torch.manual_seed(seed)
    model = MISSRec(missrec_config(ds, mode, **overrides))
    attach_features(model, ds)
    return model


def load_pretrained(model: MISSRec, path: str | Path) -> list[nn.Parameter]:
    """Copy transferable weights from a pre-trained checkpoint and freeze the position embeddings and the
    Transformer, as the authors do. Returns the parameters left to fine-tune (adapters, LayerNorm, alpha, IDs).

    Adapters whose input width differs from the checkpoint's stay freshly initialised (logged).
    """
    source = load_checkpoint(path).model
    if not isinstance(source, MISSRec):
        raise ValueError(f"{path} is not a MISSRec checkpoint")
    own = model.state_dict()
    loaded, skipped = [], []
    for name, tensor in source.state_dict().items():
        if name.startswith("item_id.") or name == "centroids" or name.endswith("_cluster"):
            continue
        if name in own and own[name].shape == tensor.shape:
            own[name] = tensor
            loaded.append(name)
        else:
            skipped.append(name)
    model.load_state_dict(own)
    if skipped:
        log.warning("pre-trained weights not transferred (shape or name differs): %s", ", ".join(skipped))
    log.info("transferred %d tensors from %s", len(loaded), path)
    for name, p in model.named_parameters():
        if name.startswith(FROZEN_AFTER_PRETRAINING):
            p.requires_grad_(False)
    return [p for p in model.parameters() if p.requires_grad]


PretrainHook = Callable[[nn.Module, Interactions, Interactions, torch.Tensor | None], dict[str, Any]]


def train_model(
    ds: SeqDataset,
    model: nn.Module,
    opts: TrainOptions,
    name: str,
    cold_fraction: float | None = None,
    parameters: list[nn.Parameter] | None = None,
    pretrain: PretrainHook | None = None,
) -> RunResult:
    """The one training and evaluation path of every model: optional pre-training (on the same training rows),
    fine-tuning with early stopping on validation NDCG@10, then valid + test metrics (+ test_cold/test_warm under
    the cold-item protocol, which withholds ``cold_fraction`` of the items from every stage of training)."""
    train_rows, valid_rows, known, cold = ds.train, ds.valid, None, None
    if cold_fraction:
        split = withhold_items(ds, cold_fraction, opts.seed)
        train_rows, valid_rows, cold = split.train, split.valid, split.cold
        known = torch.from_numpy(split.known)
        log.info(
            "cold protocol: %d cold items, %d/%d training rows kept, %d/%d valid rows with warm targets",
            cold.sum(),
            len(train_rows),
            len(ds.train),
            len(valid_rows),
            len(ds.valid),
        )
    info: dict[str, Any] = {}
    if pretrain is not None:
        info["pretraining"] = pretrain(model, train_rows, valid_rows, known)
    result = fit(model, train_rows, valid_rows, opts, known_items=known, parameters=parameters, name=name)
    metrics = {
        "valid": _metrics_only(evaluate(model, valid_rows, opts.eval_batch_size, opts.device)["all"]),
    }
    if cold is not None:
        groups = {"cold": cold[ds.test.targets], "warm": ~cold[ds.test.targets]}
        test = evaluate(model, ds.test, opts.eval_batch_size, opts.device, groups)
        metrics["test"] = _metrics_only(test["all"])
        metrics["test_cold"] = _metrics_only(test["cold"])
        metrics["test_warm"] = _metrics_only(test["warm"])
        info.update(test_cold_users=test["cold"]["n"], test_warm_users=test["warm"]["n"])
    else:
        metrics["test"] = _metrics_only(evaluate(model, ds.test, opts.eval_batch_size, opts.device)["all"])
    info.update(best_epoch=result.best_epoch, epochs_run=len(result.history), seconds=round(result.seconds, 1))
    return RunResult(model=model, metrics=metrics, fit=result, cold_items=cold, info=info)


def train_missrec(
    ds: SeqDataset,
    opts: TrainOptions,
    mode: Mode = "inductive",
    pretrained: str | Path | None = None,
    cold_fraction: float | None = None,
    name: str | None = None,
) -> RunResult:
    """Fine-tune MISSRec on ``ds`` and evaluate it (valid + test; + test_cold/test_warm under the cold protocol)."""
    if cold_fraction and mode != "inductive":
        raise ValueError("the cold-item protocol needs inductive mode (transductive items need a trained ID)")
    model = build_missrec(ds, mode, opts.seed)
    params = load_pretrained(model, pretrained) if pretrained else None
    return train_model(ds, model, opts, name or mode, cold_fraction, parameters=params)


def train_sasrec(ds: SeqDataset, opts: TrainOptions) -> RunResult:
    torch.manual_seed(opts.seed)
    model = SASRec(SASRecConfig(num_items=ds.num_items, max_len=ds.max_len))
    return train_model(ds, model, opts, "sasrec")


def popularity(ds: SeqDataset) -> RunResult:
    model = Popularity(item_popularity(ds.train, ds.num_items))
    metrics = {split: _metrics_only(evaluate(model, ds.split(split))["all"]) for split in ("valid", "test")}
    return RunResult(model=model, metrics=metrics)


def save_run(run: RunResult, ds: SeqDataset, out_dir: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """RUN_DIR/checkpoint.pt + RUN_DIR/metrics.json."""
    import json

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
