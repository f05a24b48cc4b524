"""MSM4SR's recipe (seed-towers spec A): the spec's model sized for a dataset, pre-training by complementary
sequence mixup and item drop (:mod:`missrec.training.pretrain_msm4sr`, early stopping on validation NDCG@10), then
full-softmax fine-tuning of everything; its compare runs (inductive, cold protocol)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from torch import nn

from missrec.data.dataset import Interactions, SeqDataset
from missrec.evaluation.cold import TrainingData
from missrec.models.checkpoint import attach_features
from missrec.models.config import Mode, forget_unknown_ids
from missrec.models.msm4sr import MSM4SR, MSM4SRConfig
from missrec.recipes import COLD_FRACTION, CompareRun, Recipe, TrainRequest
from missrec.training.loop import TrainOptions, fit
from missrec.training.pretrain_msm4sr import MSM4SRPretraining
from missrec.training.run import RunResult, feature_widths, require_features, stage_info, train_model

# The spec's optimiser, applied on top of the run options: Adam; clip 5 (spec: pre-training; kept for fine-tuning).
MSM4SR_OPTIMISER: dict[str, Any] = {"grad_clip": 5.0}
# Pre-training's in-batch negatives must span the whole batch: never cut it into chunks.
WHOLE_BATCH = 1 << 40
PRETRAIN_EPOCHS = 20  # `missrec train --model msm4sr` default; at most this many in compare (early stopping)


def msm4sr_config(ds: SeqDataset, mode: Mode = "inductive", **overrides: Any) -> MSM4SRConfig:
    """The spec's MSM4SR sized for ``ds`` (items, feature widths, max length); overrides win."""
    sizes = {"num_items": ds.num_items, "mode": mode, "max_len": ds.max_len, **feature_widths(ds)}
    return MSM4SRConfig(**(sizes | overrides))


def build_msm4sr(ds: SeqDataset, mode: Mode = "inductive", seed: int = 0, **overrides: Any) -> MSM4SR:
    torch.manual_seed(seed)
    model = MSM4SR(msm4sr_config(ds, mode, **overrides))
    attach_features(model, ds)
    return model


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
    if cold_fraction and mode != "inductive" and not overrides.get("id_dropout"):
        raise ValueError("the cold-item protocol needs the inductive (no-ID) MSM4SR or the hybrid (id_dropout > 0)")
    require_features(ds, f"MSM4SR ({mode})")
    opts = replace(opts, **MSM4SR_OPTIMISER)
    model = build_msm4sr(ds, mode, opts.seed, **overrides)
    known: torch.Tensor | None = None

    def remember(model: nn.Module, data: TrainingData) -> None:
        nonlocal known
        known = data.known

    def forget(model: nn.Module) -> None:  # withheld items have no ID (cold protocol, hybrid)
        forget_unknown_ids(model.item_id, known)

    def pretrain(model: nn.Module, train: Interactions, valid: Interactions, known: torch.Tensor | None) -> dict:
        stage = replace(opts, epochs=pretrain_epochs, chunk_tokens=WHOLE_BATCH, train_exclude_history=False)
        result = fit(MSM4SRPretraining(model), train, valid, stage, known_items=known, name="msm4sr_pretrain")
        return stage_info(result)

    name = name or f"msm4sr_{mode}"
    return train_model(
        ds,
        model,
        opts,
        name,
        cold_fraction,
        pretrain=pretrain if pretrain_epochs > 0 else None,
        before_fit=remember,
        after_fit=forget,
    )


def train(ds: SeqDataset, opts: TrainOptions, request: TrainRequest) -> RunResult:
    pre = PRETRAIN_EPOCHS if request.pretrain_epochs is None else request.pretrain_epochs
    return train_msm4sr(
        ds,
        opts,
        request.mode,
        pre,
        request.cold_fraction,
        **(request.architecture or {}),  # type: ignore[arg-type]
    )


def _compare(name: str, cold_fraction: float | None = None) -> Recipe:
    def recipe(ds: SeqDataset, opts: TrainOptions, config: dict[str, Any] | None) -> RunResult:
        pre = min(PRETRAIN_EPOCHS, opts.epochs)
        return train_msm4sr(ds, opts, "inductive", pre, cold_fraction=cold_fraction, name=name, **(config or {}))

    return recipe


COMPARE: tuple[CompareRun, ...] = (
    CompareRun("msm4sr_inductive", "msm4sr", _compare("msm4sr_inductive")),
    CompareRun("msm4sr_inductive_cold", "msm4sr", _compare("msm4sr_inductive_cold", COLD_FRACTION), cold=True),
)
