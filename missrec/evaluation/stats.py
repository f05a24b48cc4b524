"""Confidence over seeds and users: mean ± std over seeds, paired bootstrap interval of a per-user difference."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; 0.0 for a single value)."""
    arr = np.asarray(values, dtype=np.float64)
    return float(arr.mean()), float(arr.std(ddof=1)) if arr.size > 1 else 0.0


@dataclass(frozen=True)
class PairedInterval:
    """Mean per-user difference (model - reference) with a percentile bootstrap interval over users."""

    mean_diff: float
    low: float
    high: float
    level: float
    resamples: int
    users: int

    @property
    def verdict(self) -> str:
        """'ahead' / 'behind' when the interval excludes zero, else 'not distinguishable'."""
        if self.low > 0:
            return "ahead"
        if self.high < 0:
            return "behind"
        return "not distinguishable"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "verdict": self.verdict}


def paired_bootstrap(
    model: np.ndarray, reference: np.ndarray, resamples: int = 10_000, level: float = 0.95, seed: int = 0
) -> PairedInterval:
    """Percentile bootstrap of mean(model - reference) over users resampled with replacement.

    model, reference: (U,) per-user values on the same users in the same order (e.g. test NDCG@10, each
    already averaged over seeds).
    """
    model, reference = np.asarray(model, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    if model.shape != reference.shape or model.ndim != 1 or model.size == 0:
        raise ValueError(f"need two equal-length non-empty vectors, got {model.shape} and {reference.shape}")
    diff = model - reference
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    for start in range(0, resamples, 1000):  # (1000, U) index blocks bound the memory
        n = min(1000, resamples - start)
        means[start : start + n] = diff[rng.integers(0, diff.size, size=(n, diff.size))].mean(axis=1)
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return PairedInterval(float(diff.mean()), float(low), float(high), level, resamples, int(diff.size))
