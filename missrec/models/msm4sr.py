"""The MSM4SR model (seed-towers spec A): MoE adapters per modality, one SASRec encoder shared by the text and the
image sequence, score = cos_t + cos_v (one inner product of concatenated per-modality unit vectors).

Reads top-down: MoE adapter -> item side -> user tower -> scores and fine-tuning loss. Pure tensor code; the item
features are non-persistent buffers set by the caller (data, not weights). Pre-training (complementary sequence
mixup, item drop, next-item and cross-modal contrastive losses) is in :mod:`missrec.training.pretrain_msm4sr`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from missrec.models.config import MODES, FeatureConfig, Mode, check_id_dropout, check_num_items, id_keep_mask
from missrec.nn.layers import ByteDropout, CausalEncoder, ItemFeatureBuffers
from missrec.nn.protocol import TrainingLogits, softmax_loss


@dataclass(frozen=True)
class MSM4SRConfig(FeatureConfig):
    """MSM4SR (seed-towers spec A): MoE adapters per modality, one SASRec encoder shared by the text and the image
    sequence, cos_t + cos_v scores. Pre-training objective parameters live here too (they are saved with the model).

    ``num_items`` counts item rows including the padding row 0; ``mode`` transductive adds an ID embedding.
    """

    num_items: int
    text_dim: int = 512
    image_dim: int = 512
    mode: Mode = "inductive"
    hidden: int = 64
    n_experts: int = 8
    adapter_dropout: float = 0.2
    max_len: int = 50
    n_heads: int = 2
    ff_dim: int = 256
    n_layers: int = 2
    dropout: float = 0.2
    layer_norm_eps: float = 1e-12
    tau: float = 0.07
    mixup_max: float = 0.5  # p ~ U(0, mixup_max) per batch
    item_drop_max: float = 0.2  # q ~ U(0, item_drop_max) per batch
    cross_modal_weight: float = 0.01  # lambda
    id_dropout: float = 0.0  # hybrid (transductive): share of items whose ID embedding is dropped per training step

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        check_num_items(self.num_items)
        if self.n_experts < 1:
            raise ValueError("n_experts must be >= 1")
        if not (0.0 <= self.mixup_max <= 1.0 and 0.0 <= self.item_drop_max < 1.0):
            raise ValueError("mixup_max must be in [0, 1] and item_drop_max in [0, 1)")
        self.check_features(self.hidden, self.n_heads, self.mode)
        check_id_dropout(self.id_dropout, self.mode)


class MoEAdapter(nn.Module):
    """A mixture of K linear experts, (..., width) -> (..., D).

    expert_k(x) = LN_k(Dropout(W_k x + b_k)) (LayerNorm per expert, eps from the config);
    gate(x) = softmax(x . W_gate) with W_gate zero-initialised, so the experts start as a plain average.
    The K experts are one Linear(width -> K * D) for speed; the per-expert LayerNorms are one normalisation over
    the last axis with (K, D) affine parameters.
    """

    def __init__(self, width: int, dim: int, n_experts: int, dropout: float, eps: float) -> None:
        super().__init__()
        self.n_experts, self.dim, self.eps = n_experts, dim, eps
        self.experts = nn.Linear(width, n_experts * dim)
        self.norm_weight = nn.Parameter(torch.ones(n_experts, dim))
        self.norm_bias = nn.Parameter(torch.zeros(n_experts, dim))
        self.gate = nn.Parameter(torch.zeros(width, n_experts))
        self.dropout = ByteDropout(dropout)
        nn.init.normal_(self.experts.weight, std=0.02)
        nn.init.zeros_(self.experts.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        experts = self.dropout(self.experts(x).unflatten(-1, (self.n_experts, self.dim)))  # (..., K, D)
        experts = F.layer_norm(experts, (self.dim,), eps=self.eps) * self.norm_weight + self.norm_bias
        gate = torch.softmax(x @ self.gate, dim=-1)  # (..., K)
        return (gate[..., None] * experts).sum(dim=-2)  # (..., D)


class MSM4SR(ItemFeatureBuffers, nn.Module):
    def __init__(self, cfg: MSM4SRConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.hidden
        eps = cfg.layer_norm_eps
        self.adapters = nn.ModuleDict(
            {m: MoEAdapter(cfg.feature_dim(m), d, cfg.n_experts, cfg.adapter_dropout, eps) for m in cfg.modalities}
        )
        self.item_id = nn.Embedding(cfg.num_items, d, padding_idx=0) if cfg.mode == "transductive" else None
        # M²SE: one SASRec encoder (2 x 2 heads x 64, FF 256, GELU, post-LN, causal), shared by both modalities.
        self.encoder = CausalEncoder(
            d, cfg.max_len, cfg.n_heads, cfg.ff_dim, cfg.n_layers, cfg.dropout, token_eps=eps, layer_eps=eps
        )
        if self.item_id is not None:
            nn.init.normal_(self.item_id.weight, std=0.02)
            with torch.no_grad():
                self.item_id.weight[0].zero_()
        self._register_feature_buffers()

    @property
    def user_dim(self) -> int:
        """Width of user and item vectors: D per modality, concatenated."""
        return self.cfg.hidden * len(self.cfg.modalities)

    # ----- item side -------------------------------------------------------------------------------------
    def item_tokens(self, features: dict[str, torch.Tensor], ids: torch.Tensor | None = None) -> torch.Tensor:
        """Raw features, modality -> (..., width) -> item vectors z (..., M, D): adapter outputs (+ e_i in the
        transductive variant, which needs the item ``ids`` (...)). An item whose feature row of a modality is all
        zeros has no such modality: that z is zero (a cold item without an image scores on its text alone)."""
        z = []
        for m in self.cfg.modalities:
            x = features[m]
            present = (x != 0).any(dim=-1, keepdim=True).to(x.dtype)  # (..., 1)
            z.append(self.adapters[m](x) * present)
        out = torch.stack(z, dim=-2)  # (..., M, D)
        if self.item_id is not None:
            if ids is None:
                raise ValueError("the transductive MSM4SR needs item ids for its ID embeddings")
            out = out + self.item_id(ids)[..., None, :]
        return out

    def item_table(self) -> torch.Tensor:
        """z of every catalogue item (N, M, D), row 0 (padding) zero."""
        ids = torch.arange(self.cfg.num_items, device=self.encoder.position.weight.device)
        if self.item_id is not None and self.training and self.cfg.id_dropout > 0:  # the hybrid: content alone
            ids = ids * id_keep_mask(self.cfg.num_items, self.cfg.id_dropout, ids.device).to(ids.dtype)
        return self.item_tokens(self.features(), ids)

    @staticmethod
    def scoring_vectors(z: torch.Tensor) -> torch.Tensor:
        """(..., M, D) item vectors -> (..., M * D): per-modality unit vectors, concatenated (a zero half stays 0)."""
        return F.normalize(z, dim=-1).flatten(-2)

    def item_vectors(self, features: dict[str, torch.Tensor], ids: torch.Tensor | None = None) -> torch.Tensor:
        """The item tower for serving: raw features (N, width) per modality -> (N, M * D) index vectors."""
        return self.scoring_vectors(self.item_tokens(features, ids))

    # ----- user tower ------------------------------------------------------------------------------------
    def user_tower(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """History item vectors z (B, L, M, D), left-aligned, lengths (B,) >= 1 -> user vector (B, M * D):
        the shared encoder runs over each modality's sequence (as one batch of M * B), outputs L2-normalised
        per modality and concatenated, [n(h_t); n(h_v)]."""
        b, _, m, _ = tokens.shape
        seqs = tokens.permute(2, 0, 1, 3).flatten(0, 1)  # (M * B, L, D), modality-major
        h = self.encoder.encode_tokens(seqs, lengths.repeat(m))  # (M * B, D)
        return F.normalize(h.unflatten(0, (m, b)), dim=-1).transpose(0, 1).flatten(1)  # (B, M * D)

    def encode(self, items: torch.Tensor, lengths: torch.Tensor, table: torch.Tensor | None = None) -> torch.Tensor:
        """(B, L) item ids, (B,) lengths -> user vectors (B, M * D)."""
        table = table if table is not None else self.item_table()
        return self.user_tower(table[items], lengths)

    # ----- scoring ---------------------------------------------------------------------------------------
    @staticmethod
    def score(users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """The complete score: (B, M * D) user vectors . (N, M * D) item vectors -> (B, N) = sum of cosines."""
        return users @ items.T

    def scoring_table(self) -> torch.Tensor:
        """The item side of :meth:`full_scores` (N, M, D), computed once per evaluation."""
        return self.item_table()

    def full_scores(
        self, items: torch.Tensor, lengths: torch.Tensor, table: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(B, N) scores over the whole catalogue, padding column -inf."""
        table = table if table is not None else self.item_table()
        scores = self.score(self.encode(items, lengths, table), self.scoring_vectors(table))
        scores[:, 0] = float("-inf")
        return scores

    def training_logits(self, items: torch.Tensor, lengths: torch.Tensor, targets: torch.Tensor) -> TrainingLogits:
        """Fine-tuning objective: full-softmax logits over all items (B, N) = (cos_t + cos_v) / tau and the targets;
        the training loop masks (padding, withheld items) and reduces."""
        table = self.item_table()
        logits = self.score(self.encode(items, lengths, table), self.scoring_vectors(table)) / self.cfg.tau
        return TrainingLogits(logits, targets)

    def sampled_logits(
        self, items: torch.Tensor, lengths: torch.Tensor, targets: torch.Tensor, candidates: torch.Tensor
    ) -> TrainingLogits:
        """Sampled-softmax logits (B, C): the item tower runs only over the history items and the ``candidates``
        (C,) item ids (:mod:`missrec.training.sampled`)."""
        features = self.features()
        hist_ids, cand_ids = items, candidates
        if self.item_id is not None and self.training and self.cfg.id_dropout > 0:  # the hybrid, as item_table
            keep = id_keep_mask(self.cfg.num_items, self.cfg.id_dropout, items.device).to(items.dtype)
            hist_ids, cand_ids = items * keep[items], candidates * keep[candidates]
        users = self.user_tower(self.item_tokens({m: f[items] for m, f in features.items()}, hist_ids), lengths)
        table = self.item_tokens({m: f[candidates] for m, f in features.items()}, cand_ids)
        return TrainingLogits(self.score(users, self.scoring_vectors(table)) / self.cfg.tau, targets)

    def loss(
        self, items: torch.Tensor, lengths: torch.Tensor, targets: torch.Tensor, batch_size: int | None = None
    ) -> torch.Tensor:
        """Fine-tuning: full-softmax cross-entropy of :meth:`training_logits` (padding left out), averaged over
        ``batch_size`` rows (default: these rows) so chunk losses add up to the batch loss."""
        out = self.training_logits(items, lengths, targets)
        return softmax_loss(out.logits, out.labels, batch_size)

    def on_epoch_start(self, known_items: torch.Tensor | None, generator: torch.Generator) -> None:
        """MSM4SR has no per-epoch work."""
