"""MSM4SR pre-training on the target data (seed-towers spec A): complementary sequence mixup and item drop, then
next-item InfoNCE on each side + lambda x a symmetric cross-modal contrastive loss.

:class:`MSM4SRPretraining` wraps a model with the pre-training loss and the model's own scores, so it trains
through the project's one loop (:func:`missrec.training.loop.fit`, early stopping on validation NDCG@10) and
under the same cold-item protocol as fine-tuning.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from missrec.models.msm4sr import MSM4SR
from missrec.nn.layers import lengths_to_padding
from missrec.training.pretrain_missrec import drop_items


def complementary_mixup(
    z_t: torch.Tensor, z_v: torch.Tensor, real: torch.Tensor, p: float, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Text-dominant and image-dominant sequences from z_t, z_v (B, L, D) and the real positions ``real`` (B, L).

    m_l ~ Bernoulli(p) per real position; the text-dominant sequence takes z_v where m_l = 1 and z_t elsewhere,
    the image-dominant one is its exact complement. Returns (text_dominant, image_dominant, m (B, L) bool).
    """
    m = (torch.rand(real.shape, generator=generator, device=real.device) < p) & real  # (B, L)
    swap = m[..., None]
    return torch.where(swap, z_v, z_t), torch.where(swap, z_t, z_v), m


def next_item_nce(h: torch.Tensor, z_target: torch.Tensor, targets: torch.Tensor, tau: float) -> torch.Tensor:
    """In-batch InfoNCE, summed over rows: n(h) (B, D) vs n(z of the targets) (B, D); -> scalar.

    Another row with the same target is not a negative: its logit is -inf (the authors' code forgets this).
    """
    logits = F.normalize(h, dim=-1) @ F.normalize(z_target, dim=-1).T / tau  # (B, B)
    same = targets[:, None] == targets[None, :]
    same.fill_diagonal_(False)
    logits = logits.masked_fill(same, float("-inf"))
    return F.cross_entropy(logits, torch.arange(h.shape[0], device=h.device), reduction="sum")


def cross_modal_nce(h_t: torch.Tensor, h_v: torch.Tensor, tau: float) -> torch.Tensor:
    """Symmetric cross-modal contrastive loss, summed over rows and averaged over the two directions.

    Positive of n(h_t[b]) is n(h_v[b]) and vice versa; negatives are every other row's h_t and h_v (2B - 2).
    """
    b = h_t.shape[0]
    x = F.normalize(torch.cat([h_t, h_v]), dim=-1)  # (2B, D)
    logits = (x @ x.T / tau).fill_diagonal_(float("-inf"))  # (2B, 2B), no self-pairs
    partner = torch.cat([torch.arange(b, 2 * b), torch.arange(b)]).to(h_t.device)
    return F.cross_entropy(logits, partner, reduction="sum") / 2.0


class MSM4SRPretraining(nn.Module):
    """The pre-training objective around an :class:`MSM4SR` (a Trainable for :func:`missrec.training.loop.fit`).

    ``loss`` is the pre-training loss; ``full_scores`` are the model's (cos_t + cos_v), so early stopping on
    validation NDCG@10 measures what fine-tuning starts from. Random draws use the global torch generator, which the
    recipes seed (deterministic for a seed). With one modality there is nothing to mix or contrast across
    modalities: the loss is item drop + next-item InfoNCE on that modality.
    """

    # Its losses score only the items of the batch (in-batch InfoNCE), never the catalogue: under the cold protocol
    # the training rows hold no withheld item, so there is nothing for the loop to mask (see training_loss).
    scores_batch_items_only = True

    def __init__(self, model: MSM4SR) -> None:
        super().__init__()
        self.model = model

    def loss(
        self, items: torch.Tensor, lengths: torch.Tensor, targets: torch.Tensor, batch_size: int | None = None
    ) -> torch.Tensor:
        """items (B, L), lengths (B,), targets (B,) -> scalar loss averaged over ``batch_size`` rows."""
        model, cfg = self.model, self.model.cfg
        device = items.device
        q = float(torch.rand((), device=device)) * cfg.item_drop_max  # once per batch
        items, lengths = drop_items(items, lengths, keep_prob=1.0 - q, generator=None)  # target never dropped
        width = int(lengths.max())
        items = items[:, :width]
        table = model.item_table()  # (N, M, D), adapters in training mode (dropout on)
        z = table[items]  # (B, L, M, D)
        z_target = table[targets]  # (B, M, D)
        if len(cfg.modalities) == 1:
            h = model.encoder.encode_tokens(z[:, :, 0], lengths)
            total = next_item_nce(h, z_target[:, 0], targets, cfg.tau)
        else:
            p = float(torch.rand((), device=device)) * cfg.mixup_max  # once per batch
            real = ~lengths_to_padding(lengths, width)
            text_dom, image_dom, _ = complementary_mixup(z[:, :, 0], z[:, :, 1], real, p)
            h = model.encoder.encode_tokens(torch.cat([text_dom, image_dom]), lengths.repeat(2))  # (2B, D)
            h_t, h_v = h.chunk(2)
            total = next_item_nce(h_t, z_target[:, 0], targets, cfg.tau)
            total = total + next_item_nce(h_v, z_target[:, 1], targets, cfg.tau)
            total = total + cfg.cross_modal_weight * cross_modal_nce(h_t, h_v, cfg.tau)
        return total / (batch_size or targets.shape[0])

    def full_scores(self, items: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return self.model.full_scores(items, lengths)

    def on_epoch_start(self, known_items: torch.Tensor | None, generator: torch.Generator) -> None:
        """Nothing to do per epoch."""
