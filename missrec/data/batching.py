"""Batching by cost: rows grouped by how many tokens they put through the model, padding trimmed per chunk.

A row's cost is its history length, or the model's own ``batch_sort_keys`` (MISSRec: interest tokens + history
length). Sorting by cost and cutting batches into chunks with a bounded padded cost keeps long-tailed batches
from being padded to their longest row.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from missrec.data.dataset import Interactions

Batch = tuple[np.ndarray, torch.Tensor, torch.Tensor, torch.Tensor]


def row_costs(model: object, rows: Interactions) -> np.ndarray:
    """(R,) per-row cost: ``model.batch_sort_keys`` when the model has one, else the history length."""
    if hasattr(model, "batch_sort_keys"):
        return model.batch_sort_keys(torch.from_numpy(rows.histories)).numpy()
    return rows.lengths


def take(rows: Interactions, idx: np.ndarray) -> Batch:
    """(row indexes, items (b, l), lengths, targets) for ``idx``, padding trimmed to the longest history."""
    longest = int(rows.lengths[idx].max())
    return (
        idx,
        torch.from_numpy(rows.histories[idx, :longest]),
        torch.from_numpy(rows.lengths[idx]),
        torch.from_numpy(rows.targets[idx]),
    )


def iter_batches(rows: Interactions, batch_size: int, order: np.ndarray | None = None) -> Iterator[Batch]:
    """Consecutive batches of ``batch_size`` rows in ``order`` (default: file order)."""
    order = np.arange(len(rows)) if order is None else order
    for start in range(0, len(order), batch_size):
        yield take(rows, order[start : start + batch_size])


def epoch_order(keys: np.ndarray, batch_size: int, rng: np.random.Generator, bucket: bool) -> np.ndarray:
    """Row order for one epoch: random, or bucketed by cost with random batch order (rows are shuffled, stably
    sorted by cost, cut into batches, and the batches shuffled)."""
    perm = rng.permutation(len(keys))
    if not bucket:
        return perm
    perm = perm[np.argsort(keys[perm], kind="stable")]
    batches = [perm[s : s + batch_size] for s in range(0, len(perm), batch_size)]
    return np.concatenate([batches[i] for i in rng.permutation(len(batches))])


def split_by_cost(keys: np.ndarray, budget: int) -> list[slice]:
    """Cut rows sorted by ascending cost into consecutive chunks whose padded cost (rows x largest key) stays
    within ``budget`` (a chunk has at least one row)."""
    chunks, start = [], 0
    for end in range(1, len(keys) + 1):
        if end == len(keys) or (end + 1 - start) * keys[end] > budget:
            chunks.append(slice(start, end))
            start = end
    return chunks


def chunks_of(rows: Interactions, idx: np.ndarray, keys: np.ndarray, budget: int) -> Iterator[Batch]:
    """The rows ``idx`` sorted by cost and cut into cost-bounded chunks."""
    idx = idx[np.argsort(keys[idx], kind="stable")]
    for part in split_by_cost(keys[idx], budget):
        yield take(rows, idx[part])
