"""Cold-item protocol: withhold a random fraction of items from training and validation, then rank all items at
test time, as an item ingested after training is. The loop masks the withheld items out of the training softmax
and the validation candidates (:mod:`missrec.nn.protocol`); here they leave the training and validation rows."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from missrec.data.dataset import Interactions, SeqDataset

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ColdSplit:
    """cold (N,) bool over internal ids (padding False); train / valid: rows with the cold items removed from
    the histories and rows with a cold target dropped (valid is used for early stopping)."""

    cold: np.ndarray
    train: Interactions
    valid: Interactions

    @property
    def cold_items(self) -> np.ndarray:
        return np.flatnonzero(self.cold)

    @property
    def known(self) -> np.ndarray:
        """Items allowed to shape training (and interest clusters): not cold, not padding."""
        known = ~self.cold
        known[0] = False
        return known


def remove_items(rows: Interactions, drop: np.ndarray) -> Interactions:
    """Remove items flagged in ``drop`` (N,) from every history (compacting left) and drop rows whose target
    is flagged or whose history becomes empty."""
    hist = rows.histories
    keep = (hist > 0) & ~drop[hist]
    order = np.argsort(~keep, axis=1, kind="stable")  # kept positions first, in their original order
    compact = np.take_along_axis(np.where(keep, hist, 0), order, axis=1)
    lengths = keep.sum(axis=1)
    row_ok = (lengths > 0) & ~drop[rows.targets]
    return Interactions(rows.users[row_ok], compact[row_ok], lengths[row_ok], rows.targets[row_ok])


def withhold_items(ds: SeqDataset, fraction: float, seed: int = 0) -> ColdSplit:
    """Pick round(fraction * n_items) cold items at random (seeded) and build the cold training split."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"cold fraction must be in (0, 1), got {fraction}")
    n_real = ds.num_items - 1
    rng = np.random.default_rng(seed)
    chosen = rng.choice(n_real, size=round(fraction * n_real), replace=False) + 1
    cold = np.zeros(ds.num_items, dtype=bool)
    cold[chosen] = True
    return ColdSplit(cold=cold, train=remove_items(ds.train, cold), valid=remove_items(ds.valid, cold))


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
