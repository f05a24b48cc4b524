"""The MISSRec model: modality adapters, interest tokens, encoder-decoder user tower, dynamic-fusion scorer.

Reads top-down: item tables (adapters) -> interest ids -> user tower -> scores. Pure tensor code; the item
features are non-persistent buffers set by the caller (they are data, not weights), while the interest
centroids and the item -> cluster lookup tables are persistent buffers saved with the checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from missrec.models.config import FeatureConfig, Mode, check_id_dropout, check_num_items, id_keep_mask
from missrec.nn.fusion import item_score
from missrec.nn.interests import (
    LARGE_MAX_INTERESTS,
    assign_approximate,
    assign_in_batches,
    faiss_kmeans,
    is_large,
    minibatch_kmeans,
    num_interests,
)
from missrec.nn.layers import ByteDropout, DecoderLayer, EncoderLayer, TransformerStack, key_mask, lengths_to_padding
from missrec.nn.protocol import TrainingLogits, softmax_loss


@dataclass(frozen=True)
class MISSRecConfig(FeatureConfig):
    """Architecture of a MISSRec model (sizes from the spec; only the data-dependent fields vary).

    ``text_dim`` / ``image_dim`` are the raw feature widths of each modality; 0 means the modality is absent.
    ``num_items`` counts item rows including the padding row 0.
    """

    num_items: int
    text_dim: int = 512
    image_dim: int = 512
    mode: Mode = "inductive"
    hidden: int = 300
    max_len: int = 50
    n_heads: int = 4
    ff_dim: int = 256
    n_encoder_layers: int = 1
    n_decoder_layers: int = 1
    dropout: float = 0.5
    layer_norm_eps: float = 1e-12
    tau: float = 0.07
    interest_ratio: float = 0.5
    id_dropout: float = 0.0  # hybrid (transductive): share of items whose ID embedding is dropped per training step

    def __post_init__(self) -> None:
        self.check_features(self.hidden, self.n_heads, self.mode)
        check_num_items(self.num_items)
        check_id_dropout(self.id_dropout, self.mode)


@dataclass
class ItemTables:
    """Per-item tensors derived from the features, computed once per step.

    tokens (N, D): adapter sum (+ ID embedding) used at history positions;
    normed[m] (N, D): L2-normalised adapter output per modality, used for scoring;
    ids (N, D) or None: L2-normalised ID embeddings (transductive mode).
    """

    tokens: torch.Tensor
    normed: dict[str, torch.Tensor]
    ids: torch.Tensor | None


@dataclass
class ItemEncoding:
    """The item tower's output for items given by their raw features (cold start: no ID embedding).

    tokens (B, D): adapter sum; normed[m] (B, D): unit adapter outputs; clusters[m] (B,): nearest interest, 1..K.
    """

    tokens: torch.Tensor
    normed: dict[str, torch.Tensor]
    clusters: dict[str, torch.Tensor]


def interest_diversity(xi: torch.Tensor, interest_pad: torch.Tensor, n_slots: int) -> torch.Tensor:
    """Diversity regulariser R over encoder outputs, padded slots masked.

    xi: (B, Q, D) encoder outputs; interest_pad: (B, Q) True at padding; n_slots: N_q, the number of interest
    slots of a sequence, fixed per model (modalities x max_len) so that a row's R never depends on how much
    padding its batch happens to have.
    pooled_b = (n_valid_b / N_q) * sum_{valid j} xi_bj;  R = sum_b ||pooled_b||^2 / D.
    """
    valid = (~interest_pad).to(xi.dtype)  # (B, Q)
    n_valid = valid.sum(dim=1, keepdim=True)  # (B, 1)
    pooled = (n_valid / n_slots) * (xi * valid[..., None]).sum(dim=1)  # (B, D)
    return (pooled * pooled).sum() / xi.shape[-1]


class MISSRec(nn.Module):
    def __init__(self, cfg: MISSRecConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.hidden
        self.adapters = nn.ModuleDict({m: nn.Linear(cfg.feature_dim(m), d) for m in cfg.modalities})
        self.position = nn.Embedding(cfg.max_len, d)
        self.item_id = nn.Embedding(cfg.num_items, d, padding_idx=0) if cfg.mode == "transductive" else None
        self.token_norm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.token_dropout = ByteDropout(cfg.dropout)
        # Same parameters and function as nn.Transformer(d, n_heads, 1, 1, ff_dim, dropout, "gelu",
        # batch_first=True): post-LN layers and a final LayerNorm on each stack (tests/missrec/nn/test_layers.py
        # proves the equivalence), written batch-first so training avoids nn.MultiheadAttention's transposes and
        # exported graphs keep every axis dynamic. Encoder and decoder are separate so each can be called alone.
        self.encoder = TransformerStack(
            [EncoderLayer(d, cfg.n_heads, cfg.ff_dim, cfg.dropout) for _ in range(cfg.n_encoder_layers)],
            nn.LayerNorm(d),
        )
        self.decoder = TransformerStack(
            [DecoderLayer(d, cfg.n_heads, cfg.ff_dim, cfg.dropout) for _ in range(cfg.n_decoder_layers)],
            nn.LayerNorm(d),
        )
        self.alpha = nn.Parameter(torch.zeros(()))

        for m in cfg.modalities:
            self.register_buffer(f"{m}_features", torch.zeros(cfg.num_items, cfg.feature_dim(m)), persistent=False)
            self.register_buffer(f"{m}_cluster", torch.zeros(cfg.num_items, dtype=torch.long))
        self.register_buffer("centroids", torch.zeros(1, d))  # (K + 1, D); row 0 = padding
        self._init_weights()

    def _init_weights(self) -> None:
        for module in (*self.adapters.values(), self.position, self.item_id):
            if module is None:
                continue
            nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear):
                nn.init.zeros_(module.bias)
        if self.item_id is not None:
            with torch.no_grad():
                self.item_id.weight[0].zero_()
        for p in (*self.encoder.parameters(), *self.decoder.parameters()):
            if p.dim() > 1:  # nn.Transformer's own initialisation
                nn.init.xavier_uniform_(p)

    @property
    def interest_slots(self) -> int:
        """N_q: the most interest tokens a sequence can have (one per modality per position)."""
        return len(self.cfg.modalities) * self.cfg.max_len

    # ----- item side -------------------------------------------------------------------------------------
    def set_item_features(self, features: dict[str, torch.Tensor]) -> None:
        """Attach raw item features: modality -> (num_items, width) float32, row 0 padding."""
        for m in self.cfg.modalities:
            feat = features[m]
            expected = (self.cfg.num_items, self.cfg.feature_dim(m))
            if tuple(feat.shape) != expected:
                raise ValueError(f"{m} features have shape {tuple(feat.shape)}, expected {expected}")
            setattr(self, f"{m}_features", feat.to(self.centroids.device, torch.float32))

    def adapted(self) -> dict[str, torch.Tensor]:
        """Adapter outputs for every item: modality -> (N, D)."""
        return {m: self.adapters[m](getattr(self, f"{m}_features")) for m in self.cfg.modalities}

    def item_tables(self, items: torch.Tensor | None = None) -> ItemTables:
        """Tables of every item (N, D), or of the ``items`` ids only (..., D): the sampled softmax's tower."""
        if items is None:
            adapted = self.adapted()
            id_rows = None if self.item_id is None else self.item_id.weight
        else:
            adapted = {m: self.adapters[m](getattr(self, f"{m}_features")[items]) for m in self.cfg.modalities}
            id_rows = None if self.item_id is None else self.item_id(items)
        tokens = torch.stack(list(adapted.values())).sum(dim=0)  # (N, D)
        ids = None
        if id_rows is not None:
            if self.training and self.cfg.id_dropout > 0:  # the hybrid: these items score on content alone
                keep = id_keep_mask(self.cfg.num_items, self.cfg.id_dropout, id_rows.device)  # per item, this step
                id_rows = id_rows * (keep if items is None else keep[items])[..., None]
            tokens = tokens + id_rows
            ids = F.normalize(id_rows, dim=-1)
        normed = {m: F.normalize(a, dim=-1) for m, a in adapted.items()}
        return ItemTables(tokens=tokens, normed=normed, ids=ids)

    def encode_items(self, features: dict[str, torch.Tensor]) -> ItemEncoding:
        """The item tower: raw features (B, F_m) per modality -> token, unit vectors, nearest interest cluster.

        Nearest = squared Euclidean in adapted space against centroids[1:], ties to the lowest id (the rule of
        :func:`missrec.interests.assign_nearest`), in one (B, K) product so that the graph exports cleanly."""
        adapted = {m: self.adapters[m](features[m]) for m in self.cfg.modalities}  # M x (B, D)
        centroids = self.centroids[1:]  # (K, D)
        c_sq = (centroids * centroids).sum(dim=1)  # (K,)

        def nearest(x: torch.Tensor) -> torch.Tensor:
            dist = (x * x).sum(dim=1, keepdim=True) - 2.0 * (x @ centroids.T) + c_sq[None, :]  # (B, K)
            return dist.argmin(dim=1) + 1

        return ItemEncoding(
            tokens=torch.stack(list(adapted.values())).sum(dim=0),
            normed={m: F.normalize(a, dim=-1) for m, a in adapted.items()},
            clusters={m: nearest(a) for m, a in adapted.items()},
        )

    # ----- interests ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def discover_interests(
        self,
        known_items: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        passes: int = 5,
        batch_size: int = 2048,
    ) -> int:
        """k-means over the adapted vectors of the known items (all modalities); refresh centroids and lookups.

        known_items: optional (N,) bool mask of items allowed to shape the clusters (cold items are left out
        and assigned to their nearest centroid like any new item). Returns K.
        """
        adapted = self.adapted()
        rows = torch.arange(1, self.cfg.num_items, device=self.centroids.device)
        if known_items is not None:
            rows = rows[known_items[1:].to(rows.device)]
        x = torch.cat([adapted[m][rows] for m in self.cfg.modalities])  # (M * n_known, D)
        k = num_interests(x.shape[0], self.cfg.interest_ratio)
        if is_large(x.shape[0], k):  # bounded: FAISS on a subsample, K capped, approximate assignment
            k = min(k, LARGE_MAX_INTERESTS)
            seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator)) if generator is not None else 0
            centroids, assign = faiss_kmeans(x, k, iterations=passes, seed=seed), assign_approximate
        else:
            centroids = minibatch_kmeans(x, k, passes=passes, batch_size=batch_size, generator=generator)
            assign = assign_in_batches
        self.centroids = torch.cat([torch.zeros_like(centroids[:1]), centroids])
        zero = torch.zeros(1, dtype=torch.long, device=rows.device)
        for m in self.cfg.modalities:
            setattr(self, f"{m}_cluster", torch.cat([zero, assign(adapted[m][1:], centroids) + 1]))
        return k

    def interest_ids(self, items: torch.Tensor) -> torch.Tensor:
        """(B, L) item ids -> (B, Q) de-duplicated cluster ids of all modalities, left-aligned, 0 = padding."""
        ids = torch.cat([getattr(self, f"{m}_cluster")[items] for m in self.cfg.modalities], dim=1)
        ids, _ = ids.sort(dim=1, descending=True)
        dup = torch.zeros_like(ids, dtype=torch.bool)
        dup[:, 1:] = ids[:, 1:] == ids[:, :-1]
        ids, _ = ids.masked_fill(dup, 0).sort(dim=1, descending=True)
        q = int((ids > 0).sum(dim=1).max().clamp(min=1))
        return ids[:, :q]

    # ----- user tower ----------------------------------------------------------------------------------------
    def user_tower(
        self,
        tokens: torch.Tensor,
        lengths: torch.Tensor,
        interests: torch.Tensor,
        interest_lengths: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """History tokens + interest tokens -> unit user vector.

        tokens: (B, L, D) item tokens (adapter sums, + ID embedding in transductive mode), left-aligned;
        lengths: (B,) real history lengths >= 1; interests: (B, Q, D) centroid rows; interest_lengths: (B,).
        Returns u (B, D) L2-normalised and the encoder outputs xi (B, Q, D).
        """
        seq_len = tokens.shape[1]
        positions = torch.arange(seq_len, device=tokens.device)
        x = self.token_dropout(self.token_norm(tokens + self.position(positions)[None]))  # (B, L, D)
        items_allowed = key_mask(~lengths_to_padding(lengths, seq_len))  # (B, 1, 1, L)
        interests_allowed = key_mask(~lengths_to_padding(interest_lengths, interests.shape[1]))  # (B, 1, 1, Q)
        xi = self.encoder(interests, interests_allowed)  # (B, Q, D)
        # Only the last real position feeds u: earlier decoder layers run on every position, the last layer
        # computes just that query (same result as running it everywhere and gathering; no causal mask).
        *first_layers, last_layer = self.decoder.layers
        for layer in first_layers:
            x = layer(x, xi, items_allowed, interests_allowed)
        last = (lengths - 1).clamp(min=0)[:, None]  # (B, 1)
        h = self.decoder.norm(last_layer(x, xi, items_allowed, interests_allowed, query_index=last))  # (B, 1, D)
        u = F.normalize(h.squeeze(1), dim=-1)  # (B, D)
        return u, xi

    def encode(
        self, items: torch.Tensor, lengths: torch.Tensor, tables: ItemTables | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, L) item ids and (B,) lengths -> user vectors (B, D), encoder outputs, interest padding mask."""
        tables = tables if tables is not None else self.item_tables()
        ids = self.interest_ids(items)  # (B, Q)
        interest_lengths = (ids > 0).sum(dim=1).clamp(min=1)
        u, xi = self.user_tower(tables.tokens[items], lengths, self.centroids[ids], interest_lengths)
        return u, xi, ids == 0

    # ----- scoring -------------------------------------------------------------------------------------------
    def score(self, u: torch.Tensor, tables: ItemTables, items: torch.Tensor | None = None) -> torch.Tensor:
        """Fused scores of users u (B, D) against all items (B, N), or against ``items`` (B, C) per user.

        Inductive: s = fuse(cosines); transductive: (u . e_i + 2 s) / 3. Logits are scores / tau.
        """

        def cosines(table: torch.Tensor) -> torch.Tensor:
            return u @ table.T if items is None else torch.einsum("bd,bcd->bc", u, table[items])

        sims = [cosines(tables.normed[m]) for m in self.cfg.modalities]
        return item_score(sims, self.alpha, None if tables.ids is None else cosines(tables.ids))

    def scoring_table(self) -> ItemTables:
        """The item side of :meth:`full_scores`, computed once per evaluation."""
        return self.item_tables()

    def full_scores(self, items: torch.Tensor, lengths: torch.Tensor, tables: ItemTables | None = None) -> torch.Tensor:
        """(B, N) fused scores over the whole catalogue, padding column set to -inf."""
        tables = tables if tables is not None else self.item_tables()
        u, _, _ = self.encode(items, lengths, tables)
        scores = self.score(u, tables)
        scores[:, 0] = float("-inf")
        return scores

    def training_logits(
        self, items: torch.Tensor, lengths: torch.Tensor, targets: torch.Tensor, gamma: float = 1e-4
    ) -> TrainingLogits:
        """Fine-tuning objective parts: full-softmax logits over all items (B, N) = fused scores / tau, the
        targets, and gamma * R (the interest-diversity regulariser, a sum over rows). The loop masks and reduces."""
        tables = self.item_tables()
        u, xi, interest_pad = self.encode(items, lengths, tables)
        logits = self.score(u, tables) / self.cfg.tau
        return TrainingLogits(logits, targets, gamma * interest_diversity(xi, interest_pad, self.interest_slots))

    def sampled_logits(
        self,
        items: torch.Tensor,
        lengths: torch.Tensor,
        targets: torch.Tensor,
        candidates: torch.Tensor,
        gamma: float = 1e-4,
    ) -> TrainingLogits:
        """Sampled-softmax parts (:mod:`missrec.training.sampled`): logits (B, C) against the ``candidates`` (C,)
        item ids, the item tower run only over the history items and the candidates; targets; gamma * R."""
        history = self.item_tables(items)  # (B, L, D) tokens
        ids = self.interest_ids(items)
        interest_lengths = (ids > 0).sum(dim=1).clamp(min=1)
        u, xi = self.user_tower(history.tokens, lengths, self.centroids[ids], interest_lengths)
        logits = self.score(u, self.item_tables(candidates)) / self.cfg.tau
        return TrainingLogits(logits, targets, gamma * interest_diversity(xi, ids == 0, self.interest_slots))

    def loss(
        self,
        items: torch.Tensor,
        lengths: torch.Tensor,
        targets: torch.Tensor,
        batch_size: int | None = None,
        gamma: float = 1e-4,
    ) -> torch.Tensor:
        """Fine-tuning loss: full-softmax cross-entropy over all items (logits = scores / tau) + gamma * R.

        The cross-entropy is averaged over ``batch_size`` rows (default: these rows) and R is a sum over rows,
        so the losses of the chunks of one batch add up to the loss of the whole batch.
        """
        out = self.training_logits(items, lengths, targets, gamma)
        return softmax_loss(out.logits, out.labels, batch_size) + out.regulariser

    @torch.no_grad()
    def batch_sort_keys(self, histories: torch.Tensor, chunk: int = 65536) -> torch.Tensor:
        """Per-row cost for bucketing: tokens the row puts through the Transformer (interest tokens, the
        dominant cost, + history length). histories (R, L) -> (R,) int64."""
        keys = []
        for start in range(0, histories.shape[0], chunk):
            rows = histories[start : start + chunk].to(self.centroids.device)
            keys.append(((self.interest_ids(rows) > 0).sum(dim=1) + (rows > 0).sum(dim=1)).cpu())
        return torch.cat(keys)

    def on_epoch_start(self, known_items: torch.Tensor | None, generator: torch.Generator) -> None:
        """Interest clusters are recomputed before every epoch."""
        self.discover_interests(known_items, generator)
