"""Tuned configurations as files: what ``missrec tune`` writes and ``train`` / ``compare --config`` read, and the
search-space entry (:class:`Param`) the tunable recipes declare their spaces with."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

from missrec.families import family, tunable

# TrainOptions fields a config file may set
TRAINING_KEYS: tuple[str, ...] = (
    "lr",
    "weight_decay",
    "batch_size",
    "train_exclude_history",
    "feature_norm",
    "logit_adjust",
)
DATA_KEYS: tuple[str, ...] = ("num_items", "text_dim", "image_dim", "max_len", "mode")  # sized from the dataset


@dataclass(frozen=True)
class Param:
    """One tunable hyper-parameter: a float range (log-scaled or not) or a list of choices.

    where: "architecture" (a field of the model's config) or "training" (a TrainOptions field)."""

    name: str
    where: Literal["architecture", "training"]
    low: float = 0.0
    high: float = 0.0
    log: bool = False
    choices: tuple[Any, ...] = ()


@dataclass(frozen=True)
class TunedConfig:
    """A model family's architecture overrides and training hyper-parameters, as a JSON file.

    ``{"model": "missrec", "architecture": {"tau": 0.05, ...}, "training": {"lr": 0.002, ...}}``; unknown keys
    and dataset-sized fields (item count, feature widths, mode) are refused."""

    model: str
    architecture: dict[str, Any]
    training: dict[str, Any]
    notes: dict[str, Any] | None = None  # free-form provenance (trials, valid NDCG@10, budget)

    def __post_init__(self) -> None:
        if self.model not in tunable():
            raise ValueError(f"config model must be one of {tunable()}, got {self.model!r}")
        allowed = {f.name for f in fields(family(self.model).config_class())} - set(DATA_KEYS)
        bad = set(self.architecture) - allowed
        if bad:
            raise ValueError(f"unknown or dataset-sized {self.model} architecture keys: {sorted(bad)}")
        bad = set(self.training) - set(TRAINING_KEYS)
        if bad:
            raise ValueError(f"unknown training keys {sorted(bad)}; allowed: {TRAINING_KEYS}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TunedConfig:
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown config keys: {sorted(unknown)}")
        return cls(
            model=data.get("model", ""),
            architecture=dict(data.get("architecture", {})),
            training=dict(data.get("training", {})),
            notes=data.get("notes"),
        )
