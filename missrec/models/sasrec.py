"""SASRec, the ID-only baseline: item + position embeddings, causal self-attention, dot-product scores (evaluated
through the same full-ranking evaluator as every model)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from missrec.models.config import FrozenConfig
from missrec.nn.layers import CausalEncoder
from missrec.nn.protocol import TrainingLogits, softmax_loss


@dataclass(frozen=True)
class SASRecConfig(FrozenConfig):
    """ID-only SASRec baseline (causal self-attention), sized like the UniSRec paper's baseline."""

    num_items: int
    hidden: int = 300
    max_len: int = 50
    n_heads: int = 2
    ff_dim: int = 256
    n_layers: int = 2
    dropout: float = 0.5
    layer_norm_eps: float = 1e-12


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

    def sampled_logits(
        self, items: torch.Tensor, lengths: torch.Tensor, targets: torch.Tensor, candidates: torch.Tensor
    ) -> TrainingLogits:
        """Sampled-softmax logits (B, C) against the ``candidates`` (C,) item ids only
        (:mod:`missrec.training.sampled`)."""
        return TrainingLogits(self.encode(items, lengths) @ self.item_emb(candidates).T, targets)

    def loss(
        self, items: torch.Tensor, lengths: torch.Tensor, targets: torch.Tensor, batch_size: int | None = None
    ) -> torch.Tensor:
        """Full-softmax cross-entropy averaged over ``batch_size`` rows (default: these rows)."""
        out = self.training_logits(items, lengths, targets)
        return softmax_loss(out.logits, out.labels, batch_size)

    def sparse_embeddings(self) -> list[nn.Embedding]:
        """The ID table, trained with sparse gradients under the sampled softmax (missrec.training.optim)."""
        return [self.item_emb]

    def on_epoch_start(self, known_items: torch.Tensor | None, generator: torch.Generator) -> None:
        """SASRec has no per-epoch work."""
