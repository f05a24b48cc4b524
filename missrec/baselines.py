"""Baselines evaluated through the same full-ranking evaluator: SASRec (ID-only) and popularity."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from missrec.config import SASRecConfig
from missrec.data import Interactions
from missrec.layers import CausalEncoder
from missrec.protocol import TrainingLogits, softmax_loss


class SASRec(CausalEncoder):
    """ID-only sequential recommender: item + position embeddings, causal self-attention, dot-product scores."""

    def __init__(self, cfg: SASRecConfig) -> None:
        super().__init__(
            cfg.hidden, cfg.max_len, cfg.n_heads, cfg.ff_dim, cfg.n_layers, cfg.dropout, token_eps=cfg.layer_norm_eps
        )
        self.cfg = cfg
        self.item_emb = nn.Embedding(cfg.num_items, cfg.hidden, padding_idx=0)
        nn.init.normal_(self.item_emb.weight, std=0.02)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()

    def encode(self, items: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """(B, L) ids, (B,) lengths -> (B, D) hidden state at the last real position."""
        return self.encode_tokens(self.item_emb(items), lengths)

    def full_scores(self, items: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        scores = self.encode(items, lengths) @ self.item_emb.weight.T  # (B, N)
        scores[:, 0] = float("-inf")
        return scores

    def training_logits(self, items: torch.Tensor, lengths: torch.Tensor, targets: torch.Tensor) -> TrainingLogits:
        """Full-softmax logits (B, N) for the next items, no regulariser."""
        return TrainingLogits(self.encode(items, lengths) @ self.item_emb.weight.T, targets)

    def loss(
        self, items: torch.Tensor, lengths: torch.Tensor, targets: torch.Tensor, batch_size: int | None = None
    ) -> torch.Tensor:
        """Full-softmax cross-entropy averaged over ``batch_size`` rows (default: these rows)."""
        out = self.training_logits(items, lengths, targets)
        return softmax_loss(out.logits, out.labels, batch_size)

    def on_epoch_start(self, known_items: torch.Tensor | None, generator: torch.Generator) -> None:
        """SASRec has no per-epoch work."""


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
