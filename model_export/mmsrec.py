"""MMSRec's serving export, an ``inner_product`` bundle (:mod:`model_export.inner_product`): an item's token is its
projected modality tokens LN(Linear(x_m)) (M, D) flattened, followed by M presence flags (1.0 where the item has
that modality), T = M * D + M: the encoder masks a missing modality's token, which the projected token alone cannot
tell. The user tower right-aligns the left-aligned history (the model's positions count back from the [MASK] slot
at L - 1), appends [MASK] and reads its output; the manifest's ``max_len`` is L - 1 (history items) so the service
truncates exactly as the model does. The item vector is the one-item-sequence output, unit norm: one cosine,
nothing to split, so MMSRec recommendations carry no explanation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from missrec.data.dataset import SeqDataset
from missrec.models.mmsrec import MMSRec
from model_export import inner_product
from model_export.inner_product import InnerProductExport, ItemGraph, ModelGraph
from model_export.onnx import EXPORTER
from serving_core.bundle import Manifest


def mmsrec_item_tokens(model: MMSRec, features: dict[str, torch.Tensor]) -> torch.Tensor:
    """Raw features -> MMSRec's serving token (..., M * D + M): projected modality tokens, then presence flags."""
    tokens, valid = model.item_tokens(features)  # (..., M, D), (..., M)
    return torch.cat([tokens.flatten(-2), valid.to(tokens.dtype)], dim=-1)


class MMSRecUserGraph(ModelGraph):
    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Left-aligned tokens (B, S, M * D + M) of S <= L - 1 history items, lengths (B,) -> unit user (B, D)."""
        m, d = len(self.model.cfg.modalities), self.model.cfg.hidden
        b, s, width = tokens.shape
        offset = lengths[:, None] - s + torch.arange(s)[None, :]  # (B, S): source slot of each right-aligned slot
        src = offset.clamp(min=0)
        aligned = tokens.gather(1, src[..., None].expand(b, s, width))
        slot_valid = offset >= 0  # (B, S): left padding after the alignment
        item_tokens = aligned[..., : m * d].unflatten(-1, (m, d))  # (B, S, M, D)
        valid = (aligned[..., m * d :] > 0.5) & slot_valid[..., None]  # (B, S, M)
        return self.model.user_tower(item_tokens, valid)


class MMSRecItemGraph(ItemGraph):
    def encode(self, feats: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (token (B, M * D + M), unit item vector (B, D))."""
        return mmsrec_item_tokens(self.model, feats), self.model.item_vectors(feats)


class MMSRecExport(InnerProductExport[MMSRec]):
    kind = "mmsrec"
    user_graph = MMSRecUserGraph
    item_graph = MMSRecItemGraph
    flags = True

    @property
    def history_len(self) -> int:
        """History items the user tower takes: MMSRec keeps one slot for [MASK]."""
        return self.model.cfg.max_len - 1

    def catalogue_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return mmsrec_item_tokens(self.model, self.model.features()), self.model.item_table()


def write_bundle(
    model: MMSRec, ds: SeqDataset, root: Path, created: dict[str, Any], exporter: str = EXPORTER
) -> Manifest:
    return inner_product.write_bundle(MMSRecExport(model), ds, root, created, exporter)
