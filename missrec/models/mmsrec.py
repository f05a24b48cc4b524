"""The MMSRec model (seed-towers spec B): two tokens per item, one bidirectional encoder used as the item tower (a
one-item sequence) and, with a [MASK] readout, as the user tower; score = one cosine. No item IDs: fully inductive.

Reads top-down: masking draw -> tokens -> shared encoder -> item tower -> user tower -> scores and the masked-item
fine-tuning loss. Pure tensor code; the item features are non-persistent buffers set by the caller.

Positions never depend on the batch: a sequence of S slots is right-aligned so that its last slot (the [MASK] at
serving) sits at position L - 1, exactly as if it were left-padded to L (padding is masked out of attention, so the
shorter sequence computes the same function at a fraction of the cost).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from missrec.models.config import FeatureConfig, check_num_items
from missrec.nn.layers import ByteDropout, EncoderLayer, ItemFeatureBuffers, TransformerStack, key_mask
from missrec.nn.protocol import TrainingLogits, softmax_loss


@dataclass(frozen=True)
class MMSRecConfig(FeatureConfig):
    """MMSRec (seed-towers spec B): two tokens per item, one bidirectional encoder as item tower and, with a [MASK]
    readout, as user tower. No item IDs: always inductive. ``max_len`` is L (history L-1 items + [MASK])."""

    num_items: int
    text_dim: int = 512
    image_dim: int = 512
    hidden: int = 512
    max_len: int = 20
    n_heads: int = 8
    ff_dim: int = 1024
    n_layers: int = 2
    dropout: float = 0.5
    token_dropout: float = 0.2
    layer_norm_eps: float = 1e-12
    tau: float = 0.05
    mask_prob: float = 0.2  # of real positions (the last is always masked)
    random_prob: float = 0.1  # of the masked: a random item instead of [MASK]
    keep_prob: float = 0.1  # of the masked: the original item kept
    pretrain_tau: float = 0.05
    # The catalogue table the fine-tuning loss scores against is built with dropout off (gradients still flow).
    # With dropout on (the literal reading), two dropout draws of one item at init are less alike (cos 0.55) than
    # two different items (0.64) on the real CLIP features, and fine-tuning barely moves (see docs/seed-towers.md).
    candidates_with_dropout: bool = False

    def __post_init__(self) -> None:
        check_num_items(self.num_items)
        if self.max_len < 2:
            raise ValueError("max_len must be >= 2 (at least one history item and the [MASK] slot)")
        if not (0.0 <= self.mask_prob <= 1.0 and self.random_prob >= 0.0 and self.keep_prob >= 0.0):
            raise ValueError("masking probabilities must be in [0, 1]")
        if self.random_prob + self.keep_prob > 1.0:
            raise ValueError("random_prob + keep_prob must be <= 1")
        self.check_features(self.hidden, self.n_heads)


# What masked-item fine-tuning does at a masked slot.
MASK, RANDOM, KEEP = 0, 1, 2


def sample_masking(
    real: torch.Tensor,
    last: torch.Tensor,
    cfg: MMSRecConfig,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Which slots are masked and how. real, last (B, S) bool (``last``: one True per row, the final item).

    A real slot is masked with probability ``mask_prob``, the last always. Of the masked slots other than the last,
    ``random_prob`` get a random item and ``keep_prob`` keep the original; the rest (and the last) get [MASK].
    Returns masked (B, S) bool and action (B, S) int64 in {MASK, RANDOM, KEEP} (meaningful where masked).
    """
    draw = torch.rand(real.shape, generator=generator, device=real.device)
    masked = ((draw < cfg.mask_prob) & real) | last
    how = torch.rand(real.shape, generator=generator, device=real.device)
    action = torch.full_like(draw, MASK, dtype=torch.long)
    action = torch.where(how < cfg.random_prob, torch.full_like(action, RANDOM), action)
    action = torch.where((how >= cfg.random_prob) & (how < cfg.random_prob + cfg.keep_prob), KEEP, action)
    return masked, action.masked_fill(last, MASK)


def right_align(items: torch.Tensor, lengths: torch.Tensor, slots: int) -> torch.Tensor:
    """Left-aligned (B, l) ids -> the last ``slots`` items of each row right-aligned in (B, slots), 0-padded on the
    left. ``slots`` may exceed l (more left padding)."""
    offset = lengths[:, None] - slots + torch.arange(slots, device=items.device)[None]  # (B, slots) source index
    src = offset.clamp(min=0, max=items.shape[1] - 1)
    return torch.where(offset >= 0, items.gather(1, src), torch.zeros_like(src))


class MMSRec(ItemFeatureBuffers, nn.Module):
    def __init__(self, cfg: MMSRecConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d, eps = cfg.hidden, cfg.layer_norm_eps
        mods = cfg.modalities
        self.project = nn.ModuleDict(
            {m: nn.Sequential(nn.Linear(cfg.feature_dim(m), d), nn.LayerNorm(d, eps=eps)) for m in mods}
        )
        self.mask_item = nn.Parameter(torch.zeros(d))  # the learned [MASK] item, replacing every modality token
        self.position = nn.Embedding(cfg.max_len, d)
        self.modality_type = nn.Embedding(len(mods), d)
        self.token_norm = nn.LayerNorm(d, eps=eps)
        self.token_dropout = ByteDropout(cfg.token_dropout)
        self.encoder = TransformerStack(
            [EncoderLayer(d, cfg.n_heads, cfg.ff_dim, cfg.dropout, eps=eps) for _ in range(cfg.n_layers)],
            nn.LayerNorm(d, eps=eps),
        )
        self.heads = nn.ModuleDict({m: nn.Sequential(nn.Linear(d, d), nn.LayerNorm(d, eps=eps)) for m in mods})
        for p in (self.mask_item, self.position.weight, self.modality_type.weight):
            nn.init.normal_(p, std=0.02)
        self._register_feature_buffers()
        # Items a masked slot may be replaced with (set per epoch; under the cold protocol only warm items).
        self.register_buffer("random_pool", torch.arange(1, cfg.num_items), persistent=False)

    @property
    def user_dim(self) -> int:
        return self.cfg.hidden

    # ----- tokens and the shared encoder -----------------------------------------------------------------
    def item_tokens(self, features: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw features, modality -> (..., width) -> tokens (..., M, D) = LN(Linear(x)) and valid (..., M) bool.
        A modality whose feature row is all zeros is missing: its token is masked out of attention."""
        tokens = torch.stack([self.project[m](features[m]) for m in self.cfg.modalities], dim=-2)
        valid = torch.stack([(features[m] != 0).any(dim=-1) for m in self.cfg.modalities], dim=-1)
        return tokens, valid

    def sequence_positions(self, slots: int, device: torch.device) -> torch.Tensor:
        """(S,) positions of S right-aligned slots: L - S ... L - 1 (as if left-padded to L)."""
        return torch.arange(slots, device=device) + (self.cfg.max_len - slots)

    def encode_slots(self, tokens: torch.Tensor, valid: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The shared encoder over S item slots of M tokens each: tokens (B, S, M, D), valid (B, S, M), slot
        positions (S,) -> item outputs (B, S, D).

        Each token gets its slot's position and its modality-type embedding, LayerNorm and dropout; attention is
        bidirectional over the S * M tokens with missing tokens masked as keys. A slot's output is the element-wise
        max over its valid tokens of the per-modality output head Linear + LN (zero for a slot with none).
        """
        s, m = tokens.shape[1], tokens.shape[2]
        x = tokens + self.position(positions)[None, :, None, :] + self.modality_type.weight  # (B, S, M, D)
        x = self.token_dropout(self.token_norm(x)).flatten(1, 2)  # (B, S * M, D)
        keys = valid.flatten(1)  # (B, S * M)
        keys = keys | ~keys.any(dim=1, keepdim=True)  # a sequence with no valid token: attend anyway, output 0
        h = self.encoder(x, key_mask(keys)).unflatten(1, (s, m))  # (B, S, M, D)
        out = torch.stack([self.heads[mod](h[:, :, i]) for i, mod in enumerate(self.cfg.modalities)], dim=2)
        out = out.masked_fill(~valid[..., None], float("-inf")).amax(dim=2)  # (B, S, D)
        return torch.where(valid.any(dim=-1)[..., None], out, torch.zeros_like(out))

    # ----- item tower ------------------------------------------------------------------------------------
    def item_vectors(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        """The item tower: raw features (N, width) per modality -> unit item vectors (N, D). Each item is a
        one-item sequence at position 0.

        A fully-missing item (no modality) gets the zero vector.
        """
        tokens, valid = self.item_tokens(features)  # (N, M, D), (N, M)
        first = torch.zeros(1, dtype=torch.long, device=tokens.device)
        return F.normalize(self.encode_slots(tokens[:, None], valid[:, None], first).squeeze(1), dim=-1)

    def item_table(self) -> torch.Tensor:
        """Unit vectors of every catalogue item (N, D); row 0 (padding) is zero."""
        return self.item_vectors(self.features())

    def candidate_table(self, ids: torch.Tensor | None = None) -> torch.Tensor:
        """The catalogue table of the fine-tuning loss (N, D), or of the items ``ids`` only (C, D: the sampled
        softmax), with gradients; dropout off unless the config says ``candidates_with_dropout`` (its noise swamps
        the items' differences, see the config)."""

        def table() -> torch.Tensor:
            if ids is None:
                return self.item_table()
            return self.item_vectors({m: f[ids] for m, f in self.features().items()})

        if self.cfg.candidates_with_dropout or not self.training:
            return table()
        self.train(False)  # only dropout depends on the mode in this model
        try:
            return table()
        finally:
            self.train(True)

    # ----- user tower ------------------------------------------------------------------------------------
    def mask_tokens(self, shape: tuple[int, ...]) -> torch.Tensor:
        """(..., M, D) tokens of the [MASK] item (one learned vector in every modality slot)."""
        return self.mask_item.expand(*shape, len(self.cfg.modalities), self.cfg.hidden)

    def user_tower(self, tokens: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """History tokens (B, S, M, D), right-aligned (0-padding on the left marked invalid), S <= L - 1, and
        valid (B, S, M) -> unit user vectors (B, D): the output at the [MASK] slot appended after the history."""
        b = tokens.shape[0]
        tokens = torch.cat([tokens, self.mask_tokens((b, 1))], dim=1)  # (B, S + 1, M, D)
        valid = torch.cat([valid, torch.ones_like(valid[:, :1])], dim=1)
        positions = self.sequence_positions(tokens.shape[1], tokens.device)  # [MASK] at L - 1
        return F.normalize(self.encode_slots(tokens, valid, positions)[:, -1], dim=-1)

    def history_tokens(self, items: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-aligned (B, l) ids -> tokens (B, S, M, D) and valid (B, S, M) of the last S = min(l, L - 1) items,
        right-aligned; padding slots invalid."""
        slots = min(items.shape[1], self.cfg.max_len - 1)
        ids = right_align(items, lengths, slots)  # (B, S)
        tokens, valid = self.item_tokens({m: f[ids] for m, f in self.features().items()})
        return tokens, valid & (ids > 0)[..., None]

    def encode(self, items: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """(B, l) left-aligned ids, (B,) lengths -> unit user vectors (B, D)."""
        return self.user_tower(*self.history_tokens(items, lengths))

    # ----- scoring ---------------------------------------------------------------------------------------
    @staticmethod
    def score(users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """The complete score: unit (B, D) users . unit (N, D) items -> (B, N) cosines."""
        return users @ items.T

    def scoring_table(self) -> torch.Tensor:
        """The item side of :meth:`full_scores` (N, D), computed once per evaluation."""
        return self.item_table()

    def full_scores(
        self, items: torch.Tensor, lengths: torch.Tensor, table: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(B, N) cosines over the whole catalogue, padding column -inf."""
        scores = self.score(self.encode(items, lengths), table if table is not None else self.item_table())
        scores[:, 0] = float("-inf")
        return scores

    def training_logits(
        self, items: torch.Tensor, lengths: torch.Tensor, targets: torch.Tensor, candidates: torch.Tensor | None = None
    ) -> TrainingLogits:
        """Masked-item fine-tuning on the sequence [history, target] (its last L items, right-aligned).

        The target slot is always [MASK]; other real slots are masked per :func:`sample_masking`. One row of
        logits per masked slot (P, N) over all items, logits = cos(output, item tower(i)) / tau, with the item
        tower run over the whole catalogue each step (:meth:`candidate_table`), or over ``candidates`` only (the
        sampled softmax, :meth:`sampled_logits`); labels (P,) the item at each masked slot; rows (P,) its batch
        row. The training loop masks (padding, withheld items) and reduces.
        """
        cfg = self.cfg
        b = items.shape[0]
        slots = min(items.shape[1] + 1, cfg.max_len)
        full = torch.cat([items, torch.zeros_like(items[:, :1])], dim=1)
        full = full.scatter(1, lengths[:, None], targets[:, None])  # [history, target], left-aligned
        seq = right_align(full, lengths + 1, slots)  # (B, S)
        real = seq > 0
        last = torch.zeros_like(real)
        last[:, -1] = True
        masked, action = sample_masking(real, last, cfg)
        pool = self.random_pool
        random_items = pool[torch.randint(0, pool.shape[0], seq.shape, device=seq.device)]
        shown = torch.where(masked & (action == RANDOM), random_items, seq)  # what the encoder sees at each slot
        tokens, valid = self.item_tokens({m: f[shown] for m, f in self.features().items()})
        valid = valid & real[..., None]
        to_mask = (masked & (action == MASK))[..., None, None]
        tokens = torch.where(to_mask, self.mask_tokens((b, slots)), tokens)
        valid = valid | to_mask[..., 0]
        out = self.encode_slots(tokens, valid, self.sequence_positions(slots, seq.device))
        out = F.normalize(out[masked], dim=-1)  # (P, D), P masked slots
        logits = out @ self.candidate_table(candidates).T / cfg.tau  # (P, N), or (P, C) over the candidates
        rows = masked.nonzero()[:, 0]  # the batch row of each masked slot (row-major, as out[masked])
        return TrainingLogits(logits, seq[masked], rows=rows)

    # Sampled softmax (missrec.training.sampled): any item of a row may be a label, so all are in-batch items.
    labels_from_history = True

    def sampled_logits(
        self, items: torch.Tensor, lengths: torch.Tensor, targets: torch.Tensor, candidates: torch.Tensor
    ) -> TrainingLogits:
        """:meth:`training_logits` with (P, C) logits against the ``candidates`` (C,) item ids only: the item tower
        runs over the row items and the candidates, not the catalogue."""
        return self.training_logits(items, lengths, targets, candidates)

    def loss(
        self, items: torch.Tensor, lengths: torch.Tensor, targets: torch.Tensor, batch_size: int | None = None
    ) -> torch.Tensor:
        """Cross-entropy of :meth:`training_logits` (padding left out), summed over masked slots and divided by
        ``batch_size`` rows (default: these rows), so chunk losses add up to the batch loss."""
        out = self.training_logits(items, lengths, targets)
        return softmax_loss(out.logits, out.labels, batch_size or items.shape[0])

    def on_epoch_start(self, known_items: torch.Tensor | None, generator: torch.Generator) -> None:
        """Random replacements come from the items allowed in training (known_items (N,) bool; None = all), so
        the cold-item protocol never shows a withheld item to the encoder."""
        device = self.position.weight.device
        if known_items is None:
            self.random_pool = torch.arange(1, self.cfg.num_items, device=device)
        else:
            self.random_pool = torch.nonzero(known_items[1:].to(device)).squeeze(1) + 1
