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
        if not self.modalities:
            raise ValueError(f"{self.mode} MISSRec needs at least one modality (text_dim or image_dim > 0)")
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


# ----- tuned configurations and search spaces (``missrec tune`` writes, ``train`` / ``compare`` read) -------------
FAMILIES: tuple[str, ...] = ("missrec", "sasrec")
# TrainOptions fields a config file may set
TRAINING_KEYS: tuple[str, ...] = (
    "lr",
    "weight_decay",
    "batch_size",
    "train_exclude_history",
    "feature_norm",
    "logit_adjust",
)
DATA_KEYS: tuple[str, ...] = ("num_items", "text_dim", "image_dim", "max_len", "mode")  # sized from the dataset


@dataclass(frozen=True)
class Param:
    """One tunable hyper-parameter: a float range (log-scaled or not) or a list of choices.

    where: "architecture" (a field of the model's config) or "training" (a TrainOptions field)."""

    name: str
    where: Literal["architecture", "training"]
    low: float = 0.0
    high: float = 0.0
    log: bool = False
    choices: tuple[Any, ...] = ()


# Ranges around the spec's values (lr 1e-3, dropout 0.5, tau 0.07, interest ratio 0.5, d 300, no weight decay).
SEARCH_SPACES: dict[str, tuple[Param, ...]] = {
    "missrec": (
        Param("lr", "training", 2e-4, 5e-3, log=True),
        Param("weight_decay", "training", choices=(0.0, 1e-6, 1e-5, 1e-4)),
        Param("dropout", "architecture", 0.1, 0.6),
        Param("tau", "architecture", 0.03, 0.2, log=True),
        Param("interest_ratio", "architecture", 0.02, 0.5, log=True),
        Param("hidden", "architecture", choices=(128, 200, 300)),
    ),
    "sasrec": (
        Param("lr", "training", 2e-4, 5e-3, log=True),
        Param("weight_decay", "training", choices=(0.0, 1e-6, 1e-5, 1e-4)),
        Param("dropout", "architecture", 0.1, 0.6),
        Param("hidden", "architecture", choices=(64, 128, 300)),
        Param("n_layers", "architecture", choices=(1, 2)),
    ),
}


@dataclass(frozen=True)
class TunedConfig:
    """A model family's architecture overrides and training hyper-parameters, as a JSON file.

    ``{"model": "missrec", "architecture": {"tau": 0.05, ...}, "training": {"lr": 0.002, ...}}``; unknown keys
    and dataset-sized fields (item count, feature widths, mode) are refused."""

    model: str
    architecture: dict[str, Any]
    training: dict[str, Any]
    notes: dict[str, Any] | None = None  # free-form provenance (trials, valid NDCG@10, budget)

    def __post_init__(self) -> None:
        if self.model not in FAMILIES:
            raise ValueError(f"config model must be one of {FAMILIES}, got {self.model!r}")
        arch_cls = MISSRecConfig if self.model == "missrec" else SASRecConfig
        allowed = {f.name for f in fields(arch_cls)} - set(DATA_KEYS)
        bad = set(self.architecture) - allowed
        if bad:
            raise ValueError(f"unknown or dataset-sized {self.model} architecture keys: {sorted(bad)}")
        bad = set(self.training) - set(TRAINING_KEYS)
        if bad:
            raise ValueError(f"unknown training keys {sorted(bad)}; allowed: {TRAINING_KEYS}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TunedConfig:
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown config keys: {sorted(unknown)}")
        return cls(
            model=data.get("model", ""),
            architecture=dict(data.get("architecture", {})),
            training=dict(data.get("training", {})),
            notes=data.get("notes"),
        )


class _FrozenConfig:
    """JSON round trip shared by the seed-tower configs: ``from_dict`` refuses unknown keys."""

    text_dim: int
    image_dim: int

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(m for m, d in (("text", self.text_dim), ("image", self.image_dim)) if d > 0)

    def feature_dim(self, modality: str) -> int:
        return {"text": self.text_dim, "image": self.image_dim}[modality]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Any:
        known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown {cls.__name__} fields: {sorted(unknown)}")
        return cls(**data)

    def _check_common(self, hidden: int, n_heads: int) -> None:
        if self.text_dim < 0 or self.image_dim < 0:
            raise ValueError("feature widths must be >= 0")
        if not self.modalities:
            raise ValueError(f"{type(self).__name__} needs at least one modality (text_dim or image_dim > 0)")
        if hidden % n_heads:
            raise ValueError("hidden must be divisible by n_heads")


@dataclass(frozen=True)
class MSM4SRConfig(_FrozenConfig):
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

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.num_items < 2:
            raise ValueError("num_items counts the padding row and must be >= 2")
        if self.n_experts < 1:
            raise ValueError("n_experts must be >= 1")
        if not (0.0 <= self.mixup_max <= 1.0 and 0.0 <= self.item_drop_max < 1.0):
            raise ValueError("mixup_max must be in [0, 1] and item_drop_max in [0, 1)")
        self._check_common(self.hidden, self.n_heads)


@dataclass(frozen=True)
class MMSRecConfig(_FrozenConfig):
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
        if self.num_items < 2:
            raise ValueError("num_items counts the padding row and must be >= 2")
        if self.max_len < 2:
            raise ValueError("max_len must be >= 2 (at least one history item and the [MASK] slot)")
        if not (0.0 <= self.mask_prob <= 1.0 and self.random_prob >= 0.0 and self.keep_prob >= 0.0):
            raise ValueError("masking probabilities must be in [0, 1]")
        if self.random_prob + self.keep_prob > 1.0:
            raise ValueError("random_prob + keep_prob must be <= 1")
        self._check_common(self.hidden, self.n_heads)
