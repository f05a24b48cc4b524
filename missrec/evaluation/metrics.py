"""Full-ranking evaluation: Recall@K and NDCG@K over all items (no sampled negatives), one target per row.

Ties are counted against the target (pessimistic): a model that gives many items the same score as the target
cannot gain from it. The padding item is never ranked. The headline protocol is the served one: each row's
history items are left out of the ranking (see :mod:`missrec.nn.protocol`); both protocols come from one pass.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch

from missrec.data.batching import chunks_of, row_costs
from missrec.data.dataset import Interactions
from missrec.nn.protocol import PROTOCOLS, mask_history, mask_items

KS: tuple[int, ...] = (10, 50)
MISS_RANK = 2**40  # rank of a target that cannot be recommended (banned): beyond any cut-off
SCORE_BUDGET = 2**25  # most (row, item) scores held at once while ranking (128 MiB of float32)


class Scorer(Protocol):
    def full_scores(self, items: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """(B, L) item ids, (B,) lengths -> (B, N) scores over the whole catalogue, column 0 = -inf."""
        ...


def target_ranks(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """0-based rank of each target among all items. scores (B, N), targets (B,) -> (B,) int64.

    rank = #items scoring strictly higher + #other items scoring exactly the same. A target whose score is
    -inf (banned: in its own history under the served protocol) gets ``MISS_RANK``, a miss at every cut-off.
    """
    target_scores = scores.gather(1, targets[:, None])  # (B, 1)
    higher = (scores > target_scores).sum(dim=1)
    ties = (scores == target_scores).sum(dim=1) - 1
    ranks = higher + ties
    return torch.where(torch.isneginf(target_scores[:, 0]), MISS_RANK, ranks)


def metrics_from_ranks(ranks: np.ndarray, ks: tuple[int, ...] = KS) -> dict[str, float]:
    """Recall@K (= hit rate, one target) and NDCG@K from 0-based ranks."""
    ranks = np.asarray(ranks, dtype=np.float64)
    out: dict[str, float] = {}
    for k in ks:
        hit = ranks < k
        out[f"recall@{k}"] = float(hit.mean()) if ranks.size else 0.0
        out[f"ndcg@{k}"] = float(ndcg_per_row(ranks, k).mean()) if ranks.size else 0.0
    return out


def ndcg_per_row(ranks: np.ndarray, k: int = 10) -> np.ndarray:
    """(R,) NDCG@k of each row from its 0-based target rank (one target: 1/log2(rank + 2) inside the top k)."""
    ranks = np.asarray(ranks, dtype=np.float64)
    return np.where(ranks < k, 1.0 / np.log2(ranks + 2.0), 0.0)


@torch.no_grad()
def compute_ranks(
    model: Scorer,
    rows: Interactions,
    batch_size: int = 1024,
    device: str = "cpu",
    banned: torch.Tensor | None = None,
) -> dict[str, np.ndarray]:
    """Rank of every row's target under both protocols: {"history_excluded": (R,), "history_ranked": (R,)}.

    banned: (N,) bool columns left out of the candidates (withheld items while validating); None = none.
    Rows go through the model in cost order, at most ``batch_size`` rows (fewer for a large catalogue: at most
    ``SCORE_BUDGET`` scores) and ``batch_size * 16`` padded tokens at a time; ranks come back in input order.
    A model with ``scoring_table()`` computes its item side once and gets it back in ``full_scores``.
    """
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    ranks = {p: np.empty(len(rows), dtype=np.int64) for p in PROTOCOLS}
    keys = row_costs(model, rows)
    order = np.argsort(keys, kind="stable")
    # Bounded at any catalogue size: at most SCORE_BUDGET scores at a time; the item side is computed once.
    num_items = getattr(getattr(model, "cfg", None), "num_items", 0)
    batch_size = max(1, min(batch_size, SCORE_BUDGET // max(num_items, 1)))
    table = model.scoring_table() if hasattr(model, "scoring_table") else None

    def full_scores(hist: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return model.full_scores(hist, lengths) if table is None else model.full_scores(hist, lengths, table)

    for start in range(0, len(order), batch_size):
        for idx, items, lengths, targets in chunks_of(rows, order[start : start + batch_size], keys, batch_size * 16):
            hist, target = items.to(device), targets.to(device)
            scores = mask_items(full_scores(hist, lengths.to(device)), banned)
            ranks["history_ranked"][idx] = target_ranks(scores, target).cpu().numpy()
            ranks["history_excluded"][idx] = target_ranks(mask_history(scores, hist), target).cpu().numpy()
    if was_training and hasattr(model, "train"):
        model.train()
    return ranks


def protocol_name(exclude_history: bool) -> str:
    return PROTOCOLS[0] if exclude_history else PROTOCOLS[1]


def evaluate(
    model: Scorer,
    rows: Interactions,
    batch_size: int = 1024,
    device: str = "cpu",
    groups: dict[str, np.ndarray] | None = None,
    banned: torch.Tensor | None = None,
    exclude_history: bool = True,
) -> dict[str, dict[str, float]]:
    """Metrics on all rows (key "all") and on each named boolean row mask in ``groups``; each with "n".

    exclude_history: the served protocol (default) or the ranked-history one; banned: see :func:`compute_ranks`.
    """
    ranks = compute_ranks(model, rows, batch_size, device, banned)[protocol_name(exclude_history)]
    out = {"all": {**metrics_from_ranks(ranks), "n": len(ranks)}}
    for name, mask in (groups or {}).items():
        out[name] = {**metrics_from_ranks(ranks[mask]), "n": int(mask.sum())}
    return out
