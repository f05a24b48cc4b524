"""How each model family is built, trained, tuned and compared: one module per family (named after it, see
:mod:`missrec.families`), plus ``compare`` (every family side by side) and ``tune`` (Optuna over a family's search
space). Every recipe module provides:

- ``train(ds, opts, request: TrainRequest) -> RunResult``: what ``missrec train --model <family>`` runs;
- ``COMPARE``: its runs in ``missrec compare`` (:class:`CompareRun`: warm ones, and cold-protocol ones);
- tunable families also ``SEARCH_SPACE`` (ranges around the paper's values), ``DEFAULTS`` (the paper's values:
  the first trial) and ``build(ds, architecture, seed, mode)`` (a fresh model for a trial).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from missrec.data.dataset import SeqDataset
    from missrec.training.loop import TrainOptions
    from missrec.training.run import RunResult

COLD_FRACTION = 0.15  # the cold-item protocol's share of withheld items in `missrec compare`


@dataclass(frozen=True)
class TrainRequest:
    """The options of ``missrec train`` beyond the run options: mode, a pre-trained checkpoint (MISSRec), the
    pre-training epochs (None: the family's default), the cold protocol's fraction, architecture overrides."""

    mode: str = "inductive"
    pretrained: Path | None = None
    pretrain_epochs: int | None = None
    cold_fraction: float | None = None
    architecture: dict[str, Any] | None = None


# (dataset, run options, architecture overrides or None) -> the evaluated run
Recipe = Callable[["SeqDataset", "TrainOptions", dict[str, Any] | None], "RunResult"]


@dataclass(frozen=True)
class CompareRun:
    """One run of ``missrec compare``: its name (the column of the table), the family whose tuned ``--config`` it
    takes, whether it is a cold-protocol run (trained without the withheld items; listed after the warm runs and
    left out of the paired intervals against SASRec), and the recipe."""

    name: str
    family: str
    recipe: Recipe
    cold: bool = False
