"""The model families, written once: name -> model and config class, training recipe, ONNX exporter.

Every list of families in the code (what a checkpoint may hold, what ``missrec train --model`` and ``missrec tune
--model`` accept, the runs of ``missrec compare``, what ``missrec export`` can write) is read from here. The
classes, recipes and exporters are named by module path and imported on first use, so reading the registry
imports no torch (the CLI starts fast) and ``missrec`` imports nothing of ``model_export`` (the exporter module
is imported by ``model_export`` itself).

A family's files carry its name: ``missrec/models/<name>.py`` (model + config), ``missrec/training/pretrain_<name>.py``
(its pre-training, where it has one), ``missrec/recipes/<name>.py`` (how it is built, trained, tuned and compared)
and ``model_export/<name>.py`` (its serving export).
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import import_module
from types import ModuleType
from typing import Any


@dataclass(frozen=True)
class Family:
    """One model family.

    model / config: class names in ``missrec.models.<name>`` ("" = none: popularity has no weights);
    modes: the ``--mode`` values it trains in; features: it scores items from their features (it can serve new
    items and run under the cold-item protocol); exporter: the ``model_export`` module that writes its bundle
    (None: not servable, e.g. ID-only SASRec); pretraining: the ``missrec.training`` module of its pre-training."""

    name: str
    model: str = ""
    config: str = ""
    modes: tuple[str, ...] = ("inductive",)
    features: bool = True
    exporter: str | None = None
    pretraining: str | None = None
    tunable: bool = False  # its recipe has a search space (``missrec tune --model``, ``--config`` files)

    @property
    def models_module(self) -> str:
        return f"missrec.models.{self.name}"

    @property
    def recipe_module(self) -> str:
        return f"missrec.recipes.{self.name}"

    @property
    def trainable(self) -> bool:
        """Has weights: trained by ``missrec train``, saved in checkpoints."""
        return bool(self.model)

    def model_class(self) -> type:
        return getattr(import_module(self.models_module), self.model)

    def config_class(self) -> type:
        return getattr(import_module(self.models_module), self.config)

    def recipe(self) -> ModuleType:
        """The recipe module (see :mod:`missrec.recipes`)."""
        return import_module(self.recipe_module)


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family(
            "missrec",
            "MISSRec",
            "MISSRecConfig",
            modes=("inductive", "transductive"),
            exporter="model_export.missrec",
            pretraining="missrec.training.pretrain_missrec",
            tunable=True,
        ),
        Family(
            "msm4sr",
            "MSM4SR",
            "MSM4SRConfig",
            modes=("inductive", "transductive"),
            exporter="model_export.msm4sr",
            pretraining="missrec.training.pretrain_msm4sr",
        ),
        Family(
            "mmsrec",
            "MMSRec",
            "MMSRecConfig",
            exporter="model_export.mmsrec",
            pretraining="missrec.training.pretrain_mmsrec",
        ),
        Family("sasrec", "SASRec", "SASRecConfig", features=False, tunable=True),
        Family("popularity", features=False),
    )
}


def family(name: str) -> Family:
    """The family called ``name``; ValueError naming the known ones otherwise."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown model family {name!r}; choose from {', '.join(FAMILIES)}") from None


def trainable() -> tuple[str, ...]:
    """Families with weights (``missrec train --model``, checkpoints)."""
    return tuple(name for name, f in FAMILIES.items() if f.trainable)


def tunable() -> tuple[str, ...]:
    """Families with a search space (``missrec tune --model``, ``--config`` files)."""
    return tuple(name for name, f in FAMILIES.items() if f.tunable)


def family_of(model: Any) -> Family:
    """The family whose model class ``model`` is an instance of (exact type)."""
    for f in FAMILIES.values():
        if f.trainable and type(model) is f.model_class():
            return f
    raise TypeError(f"{type(model).__name__} is not the model of any family")
