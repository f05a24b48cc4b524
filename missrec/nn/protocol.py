"""What the shared training loop and evaluator hide from every model: withheld items and each user's history.

Two deployment rules, applied here once for every model (a model only supplies scores or logits over all items):

- **Withheld (cold) items do not exist while training and validating**: they are masked out of the training
  softmax (so no step pushes them down as negatives, and they receive no gradient) and out of the validation
  candidates; at test time they are ranked with every other item, as an item ingested after training is.
- **Evaluate as served**: the service leaves each user's history out of every recommendation by default
  (``exclude_seen``), so the headline protocol removes the history items from the ranking (a target that is in
  its own history is then a miss). ``exclude_history=False`` gives the ranked-history protocol of most papers.

The padding item 0 is always banned.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

PROTOCOLS: tuple[str, ...] = ("history_excluded", "history_ranked")


@dataclass(frozen=True)
class TrainingLogits:
    """What a model hands the training loop for one chunk of rows; the loop masks and reduces.

    logits (P, N): full-softmax logits over the catalogue, one row per prediction (P = B for next-item models;
    masked-item models may predict several slots per row); labels (P,): the item each row should predict;
    rows (P,) or None: the batch row each prediction belongs to (None: row p is batch row p), used to mask
    that row's history; regulariser: a scalar already summed over the rows (0 if none).
    """

    logits: torch.Tensor
    labels: torch.Tensor
    regulariser: torch.Tensor | float = 0.0
    rows: torch.Tensor | None = None


def banned_items(num_items: int, withheld: np.ndarray | None = None) -> torch.Tensor:
    """(N,) bool: padding and the withheld items, the columns no model may score while training/validating."""
    banned = torch.zeros(num_items, dtype=torch.bool)
    if withheld is not None:
        banned |= torch.as_tensor(np.asarray(withheld, dtype=bool))
    banned[0] = True
    return banned


def mask_items(scores: torch.Tensor, banned: torch.Tensor | None) -> torch.Tensor:
    """scores (B, N) with the ``banned`` (N,) columns set to -inf (a new tensor; gradients do not reach them)."""
    if banned is None:
        return scores
    return scores.masked_fill(banned.to(scores.device)[None, :], float("-inf"))


def mask_history(scores: torch.Tensor, items: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    """scores (B, N) with each row's history items (B, L) (0 = padding, banned anyway) set to -inf.

    keep: optional (B,) item per row left unmasked (training as served: a repeated target stays learnable)."""
    banned = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, items.to(scores.device), True)
    if keep is not None:
        banned.scatter_(1, keep.to(scores.device)[:, None], False)
    return scores.masked_fill(banned, float("-inf"))


def softmax_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    batch_size: int | None = None,
    banned: torch.Tensor | None = None,
    history: torch.Tensor | None = None,
) -> torch.Tensor:
    """Full-softmax cross-entropy over the catalogue, banned columns (padding, withheld items) left out.

    logits (B, N); targets (B,). history (B, L): also leave each row's history items out of its softmax (the
    target excepted), i.e. train as served; None = the paper's loss. Summed over rows and divided by
    ``batch_size`` (default: these rows), so the losses of the chunks of one batch add up to the batch loss.
    """
    if banned is None:
        banned = torch.zeros(logits.shape[1], dtype=torch.bool, device=logits.device)
        banned[0] = True
    logits = mask_items(logits, banned)
    if history is not None:
        logits = mask_history(logits, history, keep=targets)
    ce = F.cross_entropy(logits, targets, reduction="sum")
    return ce / (batch_size or targets.shape[0])
