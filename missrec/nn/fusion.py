"""MISSRec dynamic fusion and the whole item score (torch; numpy twin in serving_core.fusion).

For one user and item: w = softmax(alpha * [s_t, s_v]); s = w_t s_t + w_v s_v. The serving identity
s = m + (d/2) tanh(alpha d / 2), m = (s_t + s_v)/2, d = s_t - s_v, is tested against this form.
Item score (:func:`item_score`): s inductively, (u . e_i + 2 s) / 3 in transductive mode (e_i the unit ID vector).
"""

from __future__ import annotations

import torch


def fuse(sims: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """Fused score from stacked modality cosines.

    sims: (..., M) cosines per modality (M = 1 or 2); alpha: scalar. Returns (...,).
    With one modality the fused score is that modality's cosine.
    """
    if sims.shape[-1] == 1:
        return sims[..., 0]
    weights = torch.softmax(alpha * sims, dim=-1)
    return (weights * sims).sum(dim=-1)


def fuse_pair(s_t: torch.Tensor, s_v: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """Same as :func:`fuse` for two modalities given as separate tensors of equal shape, without stacking.

    Uses the closed form, which avoids materialising a (B, N, 2) tensor over the whole catalogue.
    """
    mean = (s_t + s_v) * 0.5
    half_diff = (s_t - s_v) * 0.5
    return mean + half_diff * torch.tanh(alpha * half_diff)


def fuse_sims(sims: list[torch.Tensor], alpha: torch.Tensor) -> torch.Tensor:
    """Fused score from a list of per-modality cosine tensors of equal shape (one or two modalities)."""
    if len(sims) == 2:
        return fuse_pair(sims[0], sims[1], alpha)
    if len(sims) == 1:
        return sims[0]
    raise ValueError(f"MISSRec fuses one or two modalities, got {len(sims)}")


def fusion_weights(sims: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """The softmax weights (..., M) behind a fused score (for explanations)."""
    return torch.softmax(alpha * sims, dim=-1)


def item_score(sims: list[torch.Tensor], alpha: torch.Tensor, id_sim: torch.Tensor | None = None) -> torch.Tensor:
    """The whole MISSRec item score from per-modality cosines (and, transductive, the ID cosine u . e_i)."""
    s = fuse_sims(sims, alpha)
    return s if id_sim is None else (id_sim + 2.0 * s) / 3.0
