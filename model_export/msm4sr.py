"""MSM4SR's serving export, an ``inner_product`` bundle (:mod:`model_export.inner_product`): an item's token is its
per-modality item vectors z (M, D) flattened (the transductive variant's table rows include the ID embedding; the
item tower, for items without an ID, does not); the user tower unflattens them and runs the shared SASRec encoder
per modality, user = [n(h_t); n(h_v)]; the item vector is [n(z_t); n(z_v)], so u . x = cos_t + cos_v, explained by
one block per modality."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from missrec.data.dataset import SeqDataset
from missrec.models.msm4sr import MSM4SR
from model_export import inner_product
from model_export.inner_product import InnerProductExport, ItemGraph, ModelGraph
from model_export.onnx import EXPORTER
from serving_core.bundle import Manifest


class MSM4SRUserGraph(ModelGraph):
    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """tokens (B, L, M * D) flattened item vectors z, lengths (B,) -> user (B, M * D)."""
        m, d = len(self.model.cfg.modalities), self.model.cfg.hidden
        return self.model.user_tower(tokens.unflatten(-1, (m, d)), lengths)


class MSM4SRItemGraph(ItemGraph):
    def encode(self, feats: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (token (B, M * D), item vector (B, M * D)); no ID embedding (id 0 is the zero row)."""
        first = next(iter(feats.values()))
        z = self.model.item_tokens(feats, torch.zeros(first.shape[0], dtype=torch.long))  # (B, M, D)
        return z.flatten(-2), self.model.scoring_vectors(z)


class MSM4SRExport(InnerProductExport[MSM4SR]):
    kind = "msm4sr"
    user_graph = MSM4SRUserGraph
    item_graph = MSM4SRItemGraph
    blocks_per_modality = True

    def catalogue_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.model.item_table()
        return z.flatten(-2), self.model.scoring_vectors(z)


def write_bundle(
    model: MSM4SR, ds: SeqDataset, root: Path, created: dict[str, Any], exporter: str = EXPORTER
) -> Manifest:
    return inner_product.write_bundle(MSM4SRExport(model), ds, root, created, exporter)
