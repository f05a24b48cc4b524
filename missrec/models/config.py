"""The one config base of every model family: a frozen dataclass that round-trips through JSON (saved in
checkpoints and bundle manifests) and refuses unknown keys when read back."""

from __future__ import annotations

from dataclasses import asdict, fields
from typing import Any, Literal, Self

import torch

Mode = Literal["inductive", "transductive"]
MODES: tuple[str, ...] = ("inductive", "transductive")


class FrozenConfig:
    """Base of the model configs (each a ``@dataclass(frozen=True)``): ``to_dict`` / ``from_dict``, the latter
    refusing keys the class does not have (a typo in a config file is an error, not a silent default)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Self:
        known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown {cls.__name__} fields: {sorted(unknown)}")
        return cls(**data)


class FeatureConfig(FrozenConfig):
    """A config of a model that reads item features: ``text_dim`` / ``image_dim`` are the raw widths of each
    modality (0 = absent)."""

    text_dim: int
    image_dim: int

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(m for m, d in (("text", self.text_dim), ("image", self.image_dim)) if d > 0)

    def feature_dim(self, modality: str) -> int:
        return {"text": self.text_dim, "image": self.image_dim}[modality]

    def check_features(self, hidden: int, n_heads: int, mode: str = "inductive") -> None:
        """The checks every feature model shares (mode, widths, at least one modality, heads divide hidden)."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if self.text_dim < 0 or self.image_dim < 0:
            raise ValueError("feature widths must be >= 0")
        if not self.modalities:
            raise ValueError(f"{type(self).__name__} needs at least one modality (text_dim or image_dim > 0)")
        if hidden % n_heads:
            raise ValueError("hidden must be divisible by n_heads")


def check_num_items(num_items: int) -> None:
    if num_items < 2:
        raise ValueError("num_items counts the padding row and must be >= 2")


def check_id_dropout(id_dropout: float, mode: str) -> None:
    """The hybrid's ID dropout: a share in [0, 1), and only where there are item IDs (transductive mode)."""
    if not 0.0 <= id_dropout < 1.0:
        raise ValueError(f"id_dropout must be in [0, 1), got {id_dropout}")
    if id_dropout and mode != "transductive":
        raise ValueError("id_dropout needs item IDs: transductive mode")


def id_keep_mask(num_items: int, id_dropout: float, device: torch.device) -> torch.Tensor:
    """(N,) float 1/0: which item rows keep their ID embedding this training step (each dropped with probability
    ``id_dropout``, torch's global generator, seeded by the training loop); a dropped item has no ID, like an item
    ingested after training."""
    return (torch.rand(num_items, device=device) >= id_dropout).to(torch.float32)


def forget_unknown_ids(item_id: torch.nn.Embedding | None, known: torch.Tensor | None) -> None:
    """Zero the ID embedding rows of items withheld from training (cold protocol, hybrid): such an item never had
    an ID to learn, so it is scored like an item ingested after training, on its content alone."""
    if item_id is None or known is None:
        return
    with torch.no_grad():
        item_id.weight[~known.to(item_id.weight.device)] = 0.0
