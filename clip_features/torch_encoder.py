"""The one gate to open_clip: load a frozen CLIP, decode untrusted images safely, encode one item at a time.

Both the offline ``missrec prepare`` command and the online cold-start ingestion endpoint encode items
through :meth:`ClipEncoder.encode_item`, so the same item (same text, same image bytes) gets bit-identical
features on both paths. Outputs are the raw projected CLIP embeddings, float32 ``(D,)``, NOT L2-normalised,
like the ``<name>.feat1CLS`` / ``<name>.feat3CLS`` dataset files (spec section 1). A missing modality is an
all-zero row.

Design notes:

- Architecture is data: open_clip model configs (JSON). ``clip_features/configs/`` adds ``missrec-tiny-512``,
  a tiny ViT + text transformer with ``embed_dim`` 512 (same feature width and image preprocessing as
  ViT-B/32) for fast tests and demos; it is registered with ``open_clip.add_model_config`` on import.
- Weights are separate from architecture: ``pretrained`` is an open_clip tag (``"openai"``, downloads) or a
  local checkpoint file. Loading goes through ``open_clip.create_model_and_transforms``, whose
  ``load_checkpoint`` reads local files with ``torch.load(..., weights_only=True)`` (open_clip 3.x; checked
  by a test) and loads them strictly. The OpenAI weights were trained with QuickGELU and open_clip 3.x only
  *warns* when ``ViT-B-32`` is combined with the ``openai`` tag, so the tag's own ``quick_gelu`` flag is
  applied here. For a local checkpoint, name the matching architecture yourself (e.g.
  ``ViT-B-32-quickgelu`` for converted OpenAI weights).
- No batching: on CPU, a batch of B items does not give bit-identical embeddings to B single-item calls
  (GEMM blocking changes the summation order; measured max |diff| ~4e-6 on ViT-B-32), and identity between
  the offline and online paths matters more than offline speed. Every call encodes one item.
- Untrusted images (:func:`decode_image`): format allow-list, a pixel limit checked on the header before
  any pixel is decoded, Pillow's ``DecompressionBombWarning`` turned into an error, ``verify()`` then a full
  decode of a fresh handle (truncated files fail), conversion to RGB. Every failure is an
  :class:`ImageDecodeError`. Nothing here fetches URLs. EXIF orientation is not applied and alpha is dropped
  by ``convert("RGB")``, as in open_clip's own transform; 16-bit greyscale is scaled to 8 bits (Pillow's
  ``convert`` would clip it to white); animated images give their first frame.
- Bounded preprocessing (:func:`bound_for_clip`): images longer than ``MAX_UNCROPPED_ASPECT`` : 1 are cropped
  to their centre before open_clip's transform, whose short-side resize would otherwise allocate
  224 x (224 x aspect) pixels (11.7 GB for a 177-byte 1 x 50,000 PNG).
- Determinism: eval mode, no gradients, float32; the same input gives the same output for a fixed torch
  thread count on the same machine.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch
from PIL import Image

from clip_features.preprocess import (  # re-exported: the image gate is shared with the ONNX encoder
    MAX_IMAGE_PIXELS,
    MAX_UNCROPPED_ASPECT,
    ImageDecodeError,
    ImageInput,
    ItemEncoder,
    bound_for_clip,
    decode_image,
    file_sha256,
)

log = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
DEFAULT_MODEL = "ViT-B-32"
DEFAULT_PRETRAINED = "openai"
TINY_MODEL = "missrec-tiny-512"

# Local checkpoint suffixes that open_clip loads with torch.load(weights_only=True) or safetensors.
# (.npz/.npy would go to open_clip's big_vision converter instead: not accepted here.)
_REJECTED_CHECKPOINT_SUFFIXES = (".npz", ".npy")
__all__ = [
    "DEFAULT_MODEL",
    "DEFAULT_PRETRAINED",
    "MAX_IMAGE_PIXELS",
    "MAX_UNCROPPED_ASPECT",
    "TINY_MODEL",
    "ClipEncoder",
    "ImageDecodeError",
    "ImageInput",
    "bound_for_clip",
    "decode_image",
    "save_random_init_checkpoint",
]


def register_model_configs() -> None:
    """Make the JSON architectures in ``clip_features/configs`` known to open_clip (idempotent)."""
    if TINY_MODEL not in open_clip.list_models():
        open_clip.add_model_config(CONFIG_DIR)


register_model_configs()


def _resolve_pretrained(model_name: str, pretrained: str | Path) -> tuple[str, bool]:
    """``pretrained`` -> (what to hand to open_clip, force_quick_gelu).

    A str is a tag first (as in open_clip), else a local file; a ``Path`` is always a file. Local files are
    handed over as absolute paths, so a file can never be mistaken for a tag.
    """
    if not isinstance(pretrained, Path):
        tag_cfg = open_clip.get_pretrained_cfg(model_name, pretrained)
        if tag_cfg:
            return pretrained, bool(tag_cfg.get("quick_gelu", False))
    path = Path(pretrained)
    if not path.is_file():
        if isinstance(pretrained, Path) or path.suffix or "/" in str(pretrained):
            raise FileNotFoundError(f"CLIP checkpoint {path} does not exist")
        tags = open_clip.list_pretrained_tags_by_model(model_name)
        raise ValueError(
            f"{pretrained!r} is neither a local checkpoint file nor a pretrained tag of {model_name!r} "
            f"(known tags: {', '.join(tags) or 'none'})"
        )
    if path.suffix.lower() in _REJECTED_CHECKPOINT_SUFFIXES:
        raise ValueError(f"{path}: only torch state dicts (.pt/.pth/.bin) or .safetensors files are allowed")
    return str(path.resolve()), False


def _create_random(model_name: str, seed: int, device: str | torch.device) -> tuple[torch.nn.Module, Any]:
    """Random-init open_clip model (seeded, global RNG untouched) and its eval image transform."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model, _, preprocess = open_clip.create_model_and_transforms(
            model_name, pretrained=None, precision="fp32", device=device
        )
    return model, preprocess


def save_random_init_checkpoint(model_name: str, path: str | Path, seed: int = 0) -> Path:
    """Save the state_dict of a RANDOMLY INITIALISED ``model_name`` (seeded) with ``torch.save``; return path.

    For tests and demos only: no pretrained weights can be downloaded here, and embeddings from such a model
    are deterministic but carry no semantic meaning. Load it back with ``ClipEncoder(model_name, path)``.
    """
    path = Path(path)
    model, _ = _create_random(model_name, seed, "cpu")
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    log.info("saved random-init %s checkpoint (seed %d) to %s", model_name, seed, path)
    return path


class ClipEncoder(ItemEncoder):
    """A frozen open_clip model with its eval image transform and tokenizer; encodes one item at a time.

    ``ClipEncoder("ViT-B-32", "openai")`` is the spec's feature extractor (downloads the weights);
    ``ClipEncoder(name, "/path/ckpt.pt")`` loads a local checkpoint through open_clip's loader
    (``torch.load(weights_only=True)``, strict). ``dim`` is the embedding width D.
    """

    def __init__(
        self,
        model_name: str = DEFAULT_MODEL,
        pretrained: str | Path = DEFAULT_PRETRAINED,
        *,
        device: str | torch.device = "cpu",
        max_image_pixels: int = MAX_IMAGE_PIXELS,
    ) -> None:
        weights, force_quick_gelu = _resolve_pretrained(model_name, pretrained)
        if force_quick_gelu:
            log.info("pretrained tag %r was trained with QuickGELU: forcing it on %s", pretrained, model_name)
        model, _, preprocess = open_clip.create_model_and_transforms(
            model_name,
            pretrained=weights,
            precision="fp32",
            device=device,
            force_quick_gelu=force_quick_gelu,
            weights_only=True,
        )
        self._setup(
            model,
            preprocess,
            model_name=model_name,
            pretrained=weights,
            device=device,
            max_image_pixels=max_image_pixels,
        )

    @classmethod
    def random_init(
        cls,
        model_name: str = TINY_MODEL,
        *,
        seed: int = 0,
        device: str | torch.device = "cpu",
        max_image_pixels: int = MAX_IMAGE_PIXELS,
    ) -> ClipEncoder:
        """An encoder over a RANDOMLY INITIALISED model (tests and demos only; not semantically meaningful).

        Same weights as :func:`save_random_init_checkpoint` with the same ``model_name`` and ``seed``.
        """
        model, preprocess = _create_random(model_name, seed, device)
        encoder = cls.__new__(cls)
        encoder._setup(
            model,
            preprocess,
            model_name=model_name,
            pretrained=f"random-init(seed={seed})",
            device=device,
            max_image_pixels=max_image_pixels,
        )
        return encoder

    def _setup(
        self,
        model: torch.nn.Module,
        preprocess: Any,
        *,
        model_name: str,
        pretrained: str,
        device: str | torch.device,
        max_image_pixels: int,
    ) -> None:
        self.model = model.eval().requires_grad_(False)
        self.preprocess = preprocess  # PIL RGB image -> (3, H, W) float tensor
        self.tokenizer = open_clip.get_tokenizer(model_name)
        self.model_name = model_name
        self.pretrained = pretrained
        self.device = torch.device(device)
        self.max_image_pixels = max_image_pixels
        self._checkpoint_sha256: str | None = None
        # Warm-up on both towers (first calls are slow) and read the embedding width from the outputs.
        text_dim = self.encode_text("warm-up").shape[0]
        image_dim = self.encode_image(Image.new("RGB", (32, 32))).shape[0]
        if text_dim != image_dim:
            raise ValueError(f"{model_name}: text width {text_dim} != image width {image_dim}")
        self.dim: int = int(text_dim)
        log.info("CLIP encoder ready: %s, weights %s, dim %d, device %s", model_name, pretrained, self.dim, device)

    def __repr__(self) -> str:
        return f"ClipEncoder(model_name={self.model_name!r}, pretrained={self.pretrained!r}, dim={self.dim})"

    @torch.inference_mode()
    def encode_image(self, image: ImageInput) -> np.ndarray:
        """Image bytes (untrusted: see :func:`decode_image`) or a PIL image -> raw embedding (D,) float32."""
        decoded = decode_image(image, max_pixels=self.max_image_pixels, max_aspect=MAX_UNCROPPED_ASPECT)
        pixels = self.preprocess(decoded)  # (3, H, W)
        features = self.model.encode_image(pixels.unsqueeze(0).to(self.device), normalize=False)  # (1, D)
        return features[0].to("cpu", torch.float32).numpy().copy()

    @torch.inference_mode()
    def encode_text(self, text: str) -> np.ndarray:
        """Text -> raw embedding (D,) float32; the model's tokenizer truncates it to its context length."""
        if not isinstance(text, str):
            raise TypeError(f"expected str, got {type(text).__name__}")
        tokens = self.tokenizer([text]).to(self.device)  # (1, context_length)
        features = self.model.encode_text(tokens, normalize=False)  # (1, D)
        return features[0].to("cpu", torch.float32).numpy().copy()

    def describe(self) -> dict[str, Any]:
        """What produced the features (for manifests): model, weights, width, versions, checkpoint sha256."""
        info: dict[str, Any] = {
            "model_name": self.model_name,
            "pretrained": self.pretrained,
            "dim": self.dim,
            "normalized": False,
            "open_clip_version": open_clip.__version__,
            "torch_version": torch.__version__,
        }
        path = Path(self.pretrained)
        if path.is_absolute() and path.is_file():
            if self._checkpoint_sha256 is None:
                self._checkpoint_sha256 = file_sha256(path)
            info["checkpoint_sha256"] = self._checkpoint_sha256
        return info
