"""Export MSM4SR and MMSRec to ``inner_product`` serving bundles: the item table, both towers as ONNX, parity-checked.

Both models score with one inner product of a user vector and a static item vector, so the service ranks with the
index alone (bound 0) and needs no fusion. What is exported (graph names in ``serving_core.towers``: the user tower
takes ``tokens`` (B, L, T) and ``lengths`` (B,), the item tower takes ``<m>_features`` (B, F_m) and returns
``tokens`` (B, T) and ``item`` (B, D)):

- **MSM4SR**: an item's token is its per-modality item vectors z (M, D) flattened, T = M * D (the transductive
  variant's table rows include the ID embedding; the item tower, for items without an ID, does not). The user
  tower unflattens them and runs the shared SASRec encoder per modality: user = [n(h_t); n(h_v)]. The item vector
  is [n(z_t); n(z_v)], so u . x = cos_t + cos_v; the manifest names the blocks (one per modality, D wide) and the
  service explains a score by each block's share of it (cos_t / (cos_t + cos_v)).
- **MMSRec**: an item's token is its projected modality tokens LN(Linear(x_m)) (M, D) flattened, followed by M
  presence flags (1.0 where the item has that modality), T = M * D + M: the encoder masks a missing modality's
  token, which the projected token alone cannot tell. The user tower right-aligns the left-aligned history (the
  model's positions count back from the [MASK] slot at L - 1), appends [MASK] and reads its output; the manifest's
  ``max_len`` is L - 1 (history items) so the service truncates exactly as the model does. The item vector is the
  one-item-sequence output, unit norm: one cosine, nothing to split, so MMSRec recommendations carry no
  explanation.

Parity is part of export, as for MISSRec (:mod:`model_export.parity`): the user graph at lengths x batches on
random histories of real items, ``UserTower.encode`` end to end against ``model.encode`` on real test histories,
and the item graph against the model on real items plus missing-modality rows.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from missrec.mmsrec import MMSRec
from missrec.msm4sr import MSM4SR
from model_export.parity import (
    PARITY_BATCHES,
    PARITY_LENGTHS,
    ExportError,
    max_abs_diff,
    random_histories,
    require_parity,
)
from serving_core.bundle import ITEM_VECTOR, Block
from serving_core.towers import ITEM_TOKENS, PLAIN_USER_INPUTS, USER_OUTPUT, UserTower, feature_input

SeedModel = MSM4SR | MMSRec


# ----- the exported modules ------------------------------------------------------------------------------------
class _Graph(nn.Module):
    """A graph module around the model (its parameters are the model's)."""

    def __init__(self, model: SeedModel) -> None:
        super().__init__()
        self.model = model


class _ItemGraph(_Graph):
    """Raw features (B, F_m) of the model's modalities -> (item token, item vector)."""

    def forward(
        self, text_features: torch.Tensor | None = None, image_features: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        feats = {
            m: f for m, f in (("text", text_features), ("image", image_features)) if m in self.model.cfg.modalities
        }
        return self.encode(feats)  # type: ignore[arg-type]

    def encode(self, feats: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


class MSM4SRUserGraph(_Graph):
    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """tokens (B, L, M * D) flattened item vectors z, lengths (B,) -> user (B, M * D)."""
        m, d = len(self.model.cfg.modalities), self.model.cfg.hidden
        return self.model.user_tower(tokens.unflatten(-1, (m, d)), lengths)


class MSM4SRItemGraph(_ItemGraph):
    def encode(self, feats: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (token (B, M * D), item vector (B, M * D)); no ID embedding (id 0 is the zero row)."""
        first = next(iter(feats.values()))
        z = self.model.item_tokens(feats, torch.zeros(first.shape[0], dtype=torch.long))  # (B, M, D)
        return z.flatten(-2), self.model.scoring_vectors(z)


def mmsrec_item_tokens(model: MMSRec, features: dict[str, torch.Tensor]) -> torch.Tensor:
    """Raw features -> MMSRec's serving token (..., M * D + M): projected modality tokens, then presence flags."""
    tokens, valid = model.item_tokens(features)  # (..., M, D), (..., M)
    return torch.cat([tokens.flatten(-2), valid.to(tokens.dtype)], dim=-1)


class MMSRecUserGraph(_Graph):
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


class MMSRecItemGraph(_ItemGraph):
    def encode(self, feats: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (token (B, M * D + M), unit item vector (B, D))."""
        return mmsrec_item_tokens(self.model, feats), self.model.item_vectors(feats)


# ----- what each model puts in the bundle ------------------------------------------------------------------------
def token_dim(model: SeedModel) -> int:
    m, d = len(model.cfg.modalities), model.cfg.hidden
    return m * d + (m if isinstance(model, MMSRec) else 0)


def history_len(model: SeedModel) -> int:
    """History items the user tower takes (the manifest's max_len): MMSRec keeps one slot for [MASK]."""
    return model.cfg.max_len - 1 if isinstance(model, MMSRec) else model.cfg.max_len


def graphs(model: SeedModel) -> tuple[nn.Module, nn.Module]:
    """(user graph, item graph) modules of ``model``."""
    if isinstance(model, MSM4SR):
        return MSM4SRUserGraph(model), MSM4SRItemGraph(model)
    return MMSRecUserGraph(model), MMSRecItemGraph(model)


def blocks(model: SeedModel) -> tuple[Block, ...]:
    """Explanation blocks of the item vector: MSM4SR's per-modality halves; none for MMSRec (one cosine)."""
    if isinstance(model, MMSRec):
        return ()
    d = model.cfg.hidden
    return tuple(Block(m, i * d, (i + 1) * d) for i, m in enumerate(model.cfg.modalities))


@torch.no_grad()
def catalogue_arrays(model: SeedModel) -> tuple[np.ndarray, np.ndarray]:
    """(tokens (N, T), item vectors (N, D)) of every catalogue item, row 0 zero."""
    if isinstance(model, MSM4SR):
        z = model.item_table()
        tokens, vectors = z.flatten(-2), model.scoring_vectors(z)
    else:
        tokens, vectors = mmsrec_item_tokens(model, model.features()), model.item_table()
    tokens, vectors = tokens.numpy().astype(np.float32), vectors.numpy().astype(np.float32)
    tokens[0], vectors[0] = 0.0, 0.0
    return tokens, vectors


def example_inputs(model: SeedModel) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Export examples (distinct sizes > 1, so nothing is specialised): user graph feeds, item graph feeds."""
    length = min(7, history_len(model))
    tokens = torch.randn(3, length, token_dim(model))
    if isinstance(model, MMSRec):
        m = len(model.cfg.modalities)
        tokens[..., -m:] = 1.0
    user = dict(zip(PLAIN_USER_INPUTS, (tokens, torch.tensor([length, 2, 1], dtype=torch.long)), strict=True))
    item = {feature_input(m): torch.randn(3, model.cfg.feature_dim(m)) for m in model.cfg.modalities}
    return user, item


# ----- parity ------------------------------------------------------------------------------------------------
@torch.no_grad()
def check_user_parity(model: SeedModel, session: ort.InferenceSession, tokens: np.ndarray, seed: int = 0) -> float:
    """Max |ORT - torch| of the user vector over lengths x batches (random histories of real items, their real
    tokens): the graph against the model's own encoder on the same history."""
    rng = np.random.default_rng(seed)
    worst = 0.0
    for length in sorted({min(n, history_len(model)) for n in PARITY_LENGTHS}):
        for batch in PARITY_BATCHES:
            items = torch.from_numpy(random_histories(rng, batch, length, model.cfg.num_items))
            lengths = (items > 0).sum(dim=1)
            expected = model.encode(items, lengths).numpy()
            got = session.run([USER_OUTPUT], {"tokens": tokens[items.numpy()], "lengths": lengths.numpy()})[0]
            diff = require_parity(f"the user vector (length {length}, batch {batch})", max_abs_diff(got, expected))
            worst = max(worst, diff)
    return worst


@torch.no_grad()
def check_encode_parity(model: SeedModel, tower: UserTower, histories: np.ndarray, lengths: np.ndarray) -> float:
    """UserTower.encode (the service's truncation + ORT) vs model.encode on real histories (R, L), lengths (R,)."""
    expected = model.encode(torch.from_numpy(histories), torch.from_numpy(lengths)).numpy()
    got = tower.encode([h[:n] for h, n in zip(histories, lengths, strict=True)])
    return require_parity("UserTower.encode vs model.encode", max_abs_diff(got, expected))


@torch.no_grad()
def check_item_parity(model: SeedModel, session: ort.InferenceSession, features: dict[str, np.ndarray]) -> float:
    """Item graph on ``features`` (modality -> (B, F_m)) under ONNX Runtime vs the same module in PyTorch."""
    feeds = {feature_input(m): np.ascontiguousarray(features[m], dtype=np.float32) for m in model.cfg.modalities}
    got = session.run([ITEM_TOKENS, ITEM_VECTOR], feeds)
    want = graphs(model)[1](**{name: torch.from_numpy(f) for name, f in feeds.items()})
    worst = max(max_abs_diff(g, w.numpy()) for g, w in zip(got, want, strict=True))
    return require_parity("the item tower outputs", worst)


def refuse_unservable(model: nn.Module) -> SeedModel:
    if not isinstance(model, MSM4SR | MMSRec):
        raise ExportError(f"{type(model).__name__} has no inner-product serving export")
    return model
