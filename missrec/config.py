"""Model architecture configuration: a frozen dataclass that round-trips through JSON and lives in checkpoints."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

Mode = Literal["inductive", "transductive"]
MODES: tuple[str, ...] = ("inductive", "transductive")


@dataclass(frozen=True)
class MISSRecConfig:
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

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.text_dim < 0 or self.image_dim < 0:
            raise ValueError("feature widths must be >= 0")
        if self.mode == "inductive" and not self.modalities:
            raise ValueError("inductive MISSRec needs at least one modality (text_dim or image_dim > 0)")
        if self.num_items < 2:
            raise ValueError("num_items counts the padding row and must be >= 2")
        if self.hidden % self.n_heads:
            raise ValueError("hidden must be divisible by n_heads")

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(m for m, d in (("text", self.text_dim), ("image", self.image_dim)) if d > 0)

    def feature_dim(self, modality: str) -> int:
        return {"text": self.text_dim, "image": self.image_dim}[modality]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MISSRecConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown MISSRecConfig fields: {sorted(unknown)}")
        return cls(**data)


@dataclass(frozen=True)
class SASRecConfig:
    """ID-only SASRec baseline (causal self-attention), sized like the UniSRec paper's baseline."""

    num_items: int
    hidden: int = 300
    max_len: int = 50
    n_heads: int = 2
    ff_dim: int = 256
    n_layers: int = 2
    dropout: float = 0.5
    layer_norm_eps: float = 1e-12

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SASRecConfig:
        return cls(**data)
