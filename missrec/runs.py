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
from missrec.evaluate import compute_ranks, metrics_from_ranks, protocol_name
from missrec.levers import FeatureStats, feature_stats, fold_into_adapters, normalised
from missrec.model import MISSRec
from missrec.protocol import banned_items
from missrec.train import FitResult, TrainOptions, fit

log = logging.getLogger(__name__)

METRIC_KEYS = ("recall@10", "ndcg@10", "recall@50", "ndcg@50")
FEW_INTERACTIONS = 2  # the few-interaction cold view: targets with 1..2 training interactions
# Weights that transfer from pre-training; the rest (ID embeddings, clusters) are domain-specific.
FROZEN_AFTER_PRETRAINING = ("position.", "encoder.", "decoder.")


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


@dataclass(frozen=True)
class TrainingData:
    """What a model may see while training and validating (the cold protocol removes the withheld items).

    withheld: (N,) bool or None; train/valid: rows without withheld items (valid: warm targets only).
    """

    train: Interactions
    valid: Interactions
    withheld: np.ndarray | None = None

    @property
    def known(self) -> torch.Tensor | None:
        """(N,) bool: items that exist while training (padding excluded); None = every item."""
        if self.withheld is None:
            return None
        known = ~self.withheld
        known[0] = False
        return torch.from_numpy(known)


def training_data(ds: SeqDataset, cold_fraction: float | None, seed: int) -> TrainingData:
    """The full training data, or the cold-protocol split (``cold_fraction`` of the items withheld)."""
    if not cold_fraction:
        return TrainingData(ds.train, ds.valid)
    split = withhold_items(ds, cold_fraction, seed)
    log.info(
        "cold protocol: %d withheld items, %d/%d training rows kept, %d/%d valid rows kept",
        split.cold.sum(),
        len(split.train),
        len(ds.train),
        len(split.valid),
        len(ds.valid),
    )
    return TrainingData(split.train, split.valid, split.cold)


def _metrics_only(m: dict[str, float]) -> dict[str, float]:
    return {k: m[k] for k in METRIC_KEYS}


def evaluate_run(
    model: Any, ds: SeqDataset, data: TrainingData, opts: TrainOptions
) -> tuple[dict[str, dict[str, float]], dict[str, Any], dict[str, np.ndarray]]:
    """The same report for every model: (metrics by split, group sizes, test ranks by protocol).

    valid: the validation rows the model was early-stopped on, withheld items banned from the candidates;
    test: every item ranked (withheld ones included); both under the headline protocol (``opts``), plus
    test under the other protocol. Target groups on test: test_few (a warm target with 1 or 2 interactions
    in the training rows used), and under the cold protocol test_cold (withheld target) / test_warm (the rest).
    """
    headline = protocol_name(opts.exclude_history)
    other = protocol_name(not opts.exclude_history)
    banned = banned_items(ds.num_items, data.withheld) if data.withheld is not None else None
    valid_ranks = compute_ranks(model, data.valid, opts.eval_batch_size, opts.device, banned)[headline]
    test_ranks = compute_ranks(model, ds.test, opts.eval_batch_size, opts.device)
    metrics = {
        "valid": metrics_from_ranks(valid_ranks),
        "test": metrics_from_ranks(test_ranks[headline]),
        f"test_{other}": metrics_from_ranks(test_ranks[other]),
    }
    counts = item_popularity(data.train, ds.num_items)[ds.test.targets]
    warm = np.ones(len(ds.test), dtype=bool) if data.withheld is None else ~data.withheld[ds.test.targets]
    groups = {"few": warm & (counts >= 1) & (counts <= FEW_INTERACTIONS)}
    if data.withheld is not None:
        groups |= {"cold": ~warm, "warm": warm}
    info: dict[str, Any] = {"protocol": headline, "valid_rows": len(data.valid)}
    for group, mask in groups.items():
        metrics[f"test_{group}"] = metrics_from_ranks(test_ranks[headline][mask])
        info[f"test_{group}_users"] = int(mask.sum())
    return {k: _metrics_only(v) for k, v in metrics.items()}, info, test_ranks


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
    before_fit: Callable[[nn.Module, TrainingData], None] | None = None,
    after_fit: Callable[[nn.Module], None] | None = None,
) -> RunResult:
    """The one training and evaluation path of every model: optional pre-training (on the same training rows),
    fine-tuning by :func:`missrec.train.fit` (the protocol: withheld items masked out of the training softmax and
    the validation candidates, validation as served), then :func:`evaluate_run` (valid + test, both protocols,
    test_few, and test_cold / test_warm under the cold-item protocol, which withholds ``cold_fraction`` of the
    items from every stage of training). before_fit(model, data) / after_fit(model): set up and undo what a lever
    changes (feature normalisation), around pre-training and fine-tuning."""
    data = training_data(ds, cold_fraction, opts.seed)
    if before_fit is not None:
        before_fit(model, data)
    pretraining = None if pretrain is None else pretrain(model, data.train, data.valid, data.known)
    result = fit(model, data.train, data.valid, opts, known_items=data.known, parameters=parameters, name=name)
    if after_fit is not None:
        after_fit(model)
    run = _finish(model, ds, data, opts, result)
    if pretraining is not None:
        run.info["pretraining"] = pretraining
    return run


def train_missrec(
    ds: SeqDataset,
    opts: TrainOptions,
    mode: Mode = "inductive",
    pretrained: str | Path | None = None,
    cold_fraction: float | None = None,
    name: str | None = None,
    config: dict[str, Any] | None = None,
) -> RunResult:
    """Fine-tune MISSRec on ``ds`` and evaluate it (see :func:`evaluate_run`; ``cold_fraction``: cold protocol).

    config: architecture overrides (MISSRecConfig fields, e.g. from ``missrec tune``); ``opts.feature_norm``:
    the feature-normalisation lever of :mod:`missrec.levers` ("none" = the paper)."""
    if cold_fraction and mode != "inductive":
        raise ValueError("the cold-item protocol needs inductive mode (transductive items need a trained ID)")
    require_features(ds, f"MISSRec ({mode})")
    model = build_missrec(ds, mode, opts.seed, **(config or {}))
    params = load_pretrained(model, pretrained) if pretrained else None
    stats: FeatureStats | None = None

    def normalise(model: nn.Module, data: TrainingData) -> None:  # statistics of the items known in training
        nonlocal stats
        stats = feature_stats(ds.features, None if data.known is None else data.known.numpy(), opts.feature_norm)
        if stats is not None:
            model.set_item_features(normalised({m: ds.features[m] for m in model.cfg.modalities}, stats))

    def fold_back(model: nn.Module) -> None:
        if stats is not None:
            fold_into_adapters(model, stats)  # back to the spec's format: adapters over raw features
            attach_features(model, ds)

    return train_model(
        ds, model, opts, name or mode, cold_fraction, parameters=params, before_fit=normalise, after_fit=fold_back
    )


def train_sasrec(ds: SeqDataset, opts: TrainOptions, config: dict[str, Any] | None = None) -> RunResult:
    """Train the ID-only SASRec baseline (config: SASRecConfig overrides)."""
    torch.manual_seed(opts.seed)
    model = SASRec(SASRecConfig(**({"num_items": ds.num_items, "max_len": ds.max_len} | (config or {}))))
    return train_model(ds, model, opts, "sasrec")


def popularity(ds: SeqDataset, opts: TrainOptions | None = None) -> RunResult:
    """Training interaction counts, evaluated like every other model."""
    opts = opts or TrainOptions()
    data = training_data(ds, None, opts.seed)
    model = Popularity(item_popularity(data.train, ds.num_items))
    return _finish(model, ds, data, opts, None)


def _finish(model: Any, ds: SeqDataset, data: TrainingData, opts: TrainOptions, result: FitResult | None) -> RunResult:
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
