"""Full-ranking evaluation: Recall@K and NDCG@K over all items (no sampled negatives), one target per row.

Ties are counted against the target (pessimistic): a model that gives many items the same score as the target
cannot gain from it. The padding item is never ranked (its score is -inf).
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch

from missrec.batching import chunks_of, row_costs
from missrec.data import Interactions

KS: tuple[int, ...] = (10, 50)


class Scorer(Protocol):
    def full_scores(self, items: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """(B, L) item ids, (B,) lengths -> (B, N) scores over the whole catalogue, column 0 = -inf."""
        ...


def target_ranks(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """0-based rank of each target among all items. scores (B, N), targets (B,) -> (B,) int64.

    rank = #items scoring strictly higher + #other items scoring exactly the same.
    """
    target_scores = scores.gather(1, targets[:, None])  # (B, 1)
    higher = (scores > target_scores).sum(dim=1)
    ties = (scores == target_scores).sum(dim=1) - 1
    return higher + ties


def metrics_from_ranks(ranks: np.ndarray, ks: tuple[int, ...] = KS) -> dict[str, float]:
    """Recall@K (= hit rate, one target) and NDCG@K from 0-based ranks."""
    ranks = np.asarray(ranks, dtype=np.float64)
    out: dict[str, float] = {}
    for k in ks:
        hit = ranks < k
        out[f"recall@{k}"] = float(hit.mean()) if ranks.size else 0.0
        out[f"ndcg@{k}"] = float(np.where(hit, 1.0 / np.log2(ranks + 2.0), 0.0).mean()) if ranks.size else 0.0
    return out


@torch.no_grad()
def compute_ranks(model: Scorer, rows: Interactions, batch_size: int = 1024, device: str = "cpu") -> np.ndarray:
    """Rank of every row's target. Rows go through the model in cost order, at most ``batch_size`` rows and
    ``batch_size * 16`` padded tokens at a time; ranks come back in input order."""
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    ranks = np.empty(len(rows), dtype=np.int64)
    keys = row_costs(model, rows)
    order = np.argsort(keys, kind="stable")
    for start in range(0, len(order), batch_size):
        for idx, items, lengths, targets in chunks_of(rows, order[start : start + batch_size], keys, batch_size * 16):
            scores = model.full_scores(items.to(device), lengths.to(device))
            ranks[idx] = target_ranks(scores, targets.to(device)).cpu().numpy()
    if was_training and hasattr(model, "train"):
        model.train()
    return ranks


def evaluate(
    model: Scorer,
    rows: Interactions,
    batch_size: int = 1024,
    device: str = "cpu",
    groups: dict[str, np.ndarray] | None = None,
) -> dict[str, dict[str, float]]:
    """Metrics on all rows (key "all") and on each named boolean row mask in ``groups``; each with "n"."""
    ranks = compute_ranks(model, rows, batch_size, device)
    out = {"all": {**metrics_from_ranks(ranks), "n": len(ranks)}}
    for name, mask in (groups or {}).items():
        out[name] = {**metrics_from_ranks(ranks[mask]), "n": int(mask.sum())}
    return out
