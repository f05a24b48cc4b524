"""Popularity, the history-blind baseline: every item scored by its training interaction count (also the prior of
the logit-adjustment lever and the service's fallback ranking, exported as the bundle's popularity column)."""

from __future__ import annotations

import numpy as np
import torch

from missrec.data.dataset import Interactions


def training_sequences(train: Interactions) -> dict[int, np.ndarray]:
    """Each user's full training sequence: the longest training prefix plus its target."""
    longest: dict[int, int] = {}
    for row, (user, length) in enumerate(zip(train.users.tolist(), train.lengths.tolist(), strict=True)):
        if user not in longest or length >= train.lengths[longest[user]]:
            longest[user] = row
    return {
        user: np.append(train.histories[row, : train.lengths[row]], train.targets[row]) for user, row in longest.items()
    }


def item_popularity(train: Interactions, num_items: int) -> np.ndarray:
    """(num_items,) interaction counts over every user's training sequence; padding row 0 is 0.

    Histories are truncated to the last ``max_len`` items, so very long sequences count only their tail.
    """
    counts = np.zeros(num_items, dtype=np.float64)
    for seq in training_sequences(train).values():
        np.add.at(counts, seq, 1.0)
    counts[0] = 0.0
    return counts


class Popularity:
    """Scores every item by its training popularity, whatever the history."""

    training = False

    def __init__(self, counts: np.ndarray) -> None:
        self.scores = torch.from_numpy(counts.astype(np.float32))
        self.scores[0] = float("-inf")

    def full_scores(self, items: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return self.scores.to(items.device).expand(items.shape[0], -1).clone()
