"""What every parity check of an export shares (each family's exporter checks its own graphs with these):
ONNX Runtime against the PyTorch model, failing with :class:`ExportError` above :data:`PARITY_ATOL`.

The user tower is checked at history lengths PARITY_LENGTHS x batches PARITY_BATCHES on random histories of real
items, :class:`serving_core.towers.UserTower` end to end against ``model.encode`` on PARITY_USERS real histories,
and the item tower on PARITY_ITEMS real items. Every check returns the max abs difference it measured.
"""

from __future__ import annotations

import numpy as np

PARITY_ATOL = 1e-4
PARITY_LENGTHS = (1, 7, 50)
PARITY_BATCHES = (1, 16)
PARITY_ITEMS = 4096  # item-tower parity rows (real items, in order)
PARITY_USERS = 256  # real histories for the end-to-end user-tower check


class ExportError(RuntimeError):
    """The model cannot be exported, or the exported graphs do not reproduce it."""


def max_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    diff = np.abs(a.astype(np.float64) - b.astype(np.float64))
    return float("inf") if not np.isfinite(diff).all() else float(diff.max(initial=0.0))


def require_parity(name: str, diff: float) -> float:
    if not diff <= PARITY_ATOL:
        raise ExportError(f"ONNX Runtime and PyTorch disagree on {name}: max abs diff {diff:.3g} > {PARITY_ATOL}")
    return diff


def random_histories(rng: np.random.Generator, batch: int, length: int, num_items: int) -> np.ndarray:
    """(batch, length) random real item ids; row 0 is full, the others have random lengths, 0-padded."""
    items = rng.integers(1, num_items, size=(batch, length))
    lengths = np.concatenate([[length], rng.integers(1, length + 1, size=batch - 1)])
    items[np.arange(length)[None, :] >= lengths[:, None]] = 0
    return items
