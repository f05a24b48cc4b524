"""MISSRec's recipe: the spec's architecture sized for a dataset, optionally fine-tuned from a multi-domain
pre-trained checkpoint (:mod:`missrec.training.pretrain_missrec`), with the feature-normalisation lever; its
compare runs (inductive, transductive, cold protocol) and its search space."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from missrec.data.dataset import SeqDataset
from missrec.evaluation.cold import TrainingData
from missrec.models.checkpoint import attach_features, load_checkpoint
from missrec.models.config import Mode, forget_unknown_ids
from missrec.models.missrec import MISSRec, MISSRecConfig
from missrec.recipes import COLD_FRACTION, CompareRun, TrainRequest
from missrec.recipes.tuned import Param
from missrec.training.levers import FeatureStats, feature_stats, fold_into_adapters, normalised
from missrec.training.loop import TrainOptions
from missrec.training.run import RunResult, feature_widths, require_features, train_model

log = logging.getLogger(__name__)

# Weights that transfer from pre-training; the rest (ID embeddings, clusters) are domain-specific.
FROZEN_AFTER_PRETRAINING = ("position.", "encoder.", "decoder.")

# Ranges around the spec's values (lr 1e-3, dropout 0.5, tau 0.07, interest ratio 0.5, d 300, no weight decay).
SEARCH_SPACE: tuple[Param, ...] = (
    Param("lr", "training", 2e-4, 5e-3, log=True),
    Param("weight_decay", "training", choices=(0.0, 1e-6, 1e-5, 1e-4)),
    Param("dropout", "architecture", 0.1, 0.6),
    Param("tau", "architecture", 0.03, 0.2, log=True),
    Param("interest_ratio", "architecture", 0.02, 0.5, log=True),
    Param("hidden", "architecture", choices=(128, 200, 300)),
)
# The paper's (spec's) values of every tunable parameter: trial 0.
DEFAULTS: dict[str, Any] = {
    "lr": 1e-3,
    "weight_decay": 0.0,
    "dropout": 0.5,
    "tau": 0.07,
    "interest_ratio": 0.5,
    "hidden": 300,
}


def missrec_config(ds: SeqDataset, mode: Mode = "inductive", **overrides: Any) -> MISSRecConfig:
    """The spec's architecture sized for ``ds`` (item count, feature widths, max length); overrides win."""
    sizes = {"num_items": ds.num_items, **feature_widths(ds), "mode": mode, "max_len": ds.max_len}
    return MISSRecConfig(**(sizes | overrides))


def build_missrec(ds: SeqDataset, mode: Mode = "inductive", seed: int = 0, **overrides: Any) -> MISSRec:
    """A fresh MISSRec for ``ds`` (seeded), with the dataset's item features attached."""
    torch.manual_seed(seed)
    model = MISSRec(missrec_config(ds, mode, **overrides))
    attach_features(model, ds)
    return model


def build(ds: SeqDataset, architecture: dict[str, Any], seed: int, mode: Mode = "inductive") -> MISSRec:
    """A model for a tuning trial."""
    require_features(ds, f"MISSRec ({mode})")
    return build_missrec(ds, mode, seed, **architecture)


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


def train_missrec(
    ds: SeqDataset,
    opts: TrainOptions,
    mode: Mode = "inductive",
    pretrained: str | Path | None = None,
    cold_fraction: float | None = None,
    name: str | None = None,
    config: dict[str, Any] | None = None,
) -> RunResult:
    """Fine-tune MISSRec on ``ds`` and evaluate it (see :func:`missrec.evaluation.report.evaluate_run`;
    ``cold_fraction``: cold protocol).

    config: architecture overrides (MISSRecConfig fields, e.g. from ``missrec tune``); ``opts.feature_norm``:
    the feature-normalisation lever of :mod:`missrec.training.levers` ("none" = the paper)."""
    hybrid = bool((config or {}).get("id_dropout"))
    if cold_fraction and mode != "inductive" and not hybrid:
        raise ValueError(
            "the cold-item protocol needs inductive mode or the hybrid (transductive items need a trained ID; "
            "the hybrid, id_dropout > 0, scores an item without one on its content)"
        )
    require_features(ds, f"MISSRec ({mode})")
    model = build_missrec(ds, mode, opts.seed, **(config or {}))
    params = load_pretrained(model, pretrained) if pretrained else None
    stats: FeatureStats | None = None
    known: torch.Tensor | None = None

    def normalise(model: nn.Module, data: TrainingData) -> None:  # statistics of the items known in training
        nonlocal stats, known
        known = data.known
        stats = feature_stats(ds.features, None if data.known is None else data.known.numpy(), opts.feature_norm)
        if stats is not None:
            model.set_item_features(normalised({m: ds.features[m] for m in model.cfg.modalities}, stats))

    def fold_back(model: nn.Module) -> None:
        forget_unknown_ids(model.item_id, known)  # withheld items have no ID (only transductive models have IDs)
        if stats is not None:
            fold_into_adapters(model, stats)  # back to the spec's format: adapters over raw features
            attach_features(model, ds)

    return train_model(
        ds, model, opts, name or mode, cold_fraction, parameters=params, before_fit=normalise, after_fit=fold_back
    )


def train(ds: SeqDataset, opts: TrainOptions, request: TrainRequest) -> RunResult:
    return train_missrec(
        ds,
        opts,
        request.mode,  # type: ignore[arg-type]
        pretrained=request.pretrained,
        cold_fraction=request.cold_fraction,
        config=request.architecture,
    )


COMPARE: tuple[CompareRun, ...] = (
    CompareRun(
        "missrec_inductive",
        "missrec",
        lambda ds, o, c: train_missrec(ds, o, "inductive", name="missrec_inductive", config=c),
    ),
    CompareRun(
        "missrec_transductive",
        "missrec",
        lambda ds, o, c: train_missrec(ds, o, "transductive", name="missrec_transductive", config=c),
    ),
    CompareRun(
        "missrec_inductive_cold",
        "missrec",
        lambda ds, o, c: train_missrec(
            ds, o, "inductive", cold_fraction=COLD_FRACTION, name="missrec_inductive_cold", config=c
        ),
        cold=True,
    ),
)
