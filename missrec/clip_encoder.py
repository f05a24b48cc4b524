"""The one gate to open_clip: load a frozen CLIP, decode untrusted images safely, encode one item at a time.

Both the offline ``missrec prepare`` command and the online cold-start ingestion endpoint encode items
through :meth:`ClipEncoder.encode_item`, so the same item (same text, same image bytes) gets bit-identical
features on both paths. Outputs are the raw projected CLIP embeddings, float32 ``(D,)``, NOT L2-normalised,
like the ``<name>.feat1CLS`` / ``<name>.feat3CLS`` dataset files (spec section 1). A missing modality is an
all-zero row.

Design notes:

- Architecture is data: open_clip model configs (JSON). ``missrec/clip_configs/`` adds ``missrec-tiny-512``,
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

import hashlib
import io
import logging
import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch
from PIL import Image

log = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).resolve().parent / "clip_configs"
DEFAULT_MODEL = "ViT-B-32"
DEFAULT_PRETRAINED = "openai"
TINY_MODEL = "missrec-tiny-512"

# ~5500 x 5500; product photos are far smaller. (40 Mpx RGBA PNGs grew RSS by 312 MiB: Pillow's reduce
# premultiplies alpha into a second full copy; 30 Mpx keeps every decode within ~300 MB.)
MAX_IMAGE_PIXELS = 30_000_000
# open_clip's transform resizes the SHORT side to 224 before its centre crop, so a 1 x 50,000 PNG of 177 bytes
# became 224 x 11,200,000 pixels (11.7 GB). Images longer than this ratio are cropped to their centre first
# (:func:`bound_for_clip`); up to it (real product photos reach ~5) the transform is open_clip's, exactly.
MAX_UNCROPPED_ASPECT = 8
# Decoded images above this many pixels are shrunk by an integer factor while decoding (JPEG draft) or right after
# (box reduce), keeping the short side >= REDUCED_MIN_SIDE, so a 40 Mpx upload stays within ~300 MB of RSS.
# Below it (every real product photo here) the pixels reach open_clip's transform untouched.
REDUCE_ABOVE_PIXELS = 16_000_000
REDUCED_MIN_SIDE = 896  # 4 x open_clip's 224: the transform's own antialiased resize does the rest
REDUCED_TARGET_PIXELS = 4_000_000
ALLOWED_IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP")
# Local checkpoint suffixes that open_clip loads with torch.load(weights_only=True) or safetensors.
# (.npz/.npy would go to open_clip's big_vision converter instead: not accepted here.)
_REJECTED_CHECKPOINT_SUFFIXES = (".npz", ".npy")

ImageInput = bytes | bytearray | memoryview | Image.Image


class ImageDecodeError(ValueError):
    """Image bytes that are not a supported, intact, reasonably sized image."""


def register_model_configs() -> None:
    """Make the JSON architectures in ``missrec/clip_configs`` known to open_clip (idempotent)."""
    if TINY_MODEL not in open_clip.list_models():
        open_clip.add_model_config(CONFIG_DIR)


register_model_configs()


def _check_pixels(size: tuple[int, int], max_pixels: int) -> None:
    width, height = size
    if width <= 0 or height <= 0:
        raise ImageDecodeError(f"image has an empty size {width}x{height}")
    if width * height > max_pixels:
        raise ImageDecodeError(
            f"image is {width}x{height} = {width * height:,} pixels, above the limit of {max_pixels:,} "
            "(possible decompression bomb)"
        )


def decode_image(
    data: ImageInput, *, max_pixels: int = MAX_IMAGE_PIXELS, max_aspect: float | None = None
) -> Image.Image:
    """Decode untrusted image bytes into a fully loaded RGB ``PIL.Image``; raise :class:`ImageDecodeError`.

    An already decoded ``PIL.Image`` is only size-checked and converted to RGB. The explicit ``max_pixels``
    check on the header is the primary, thread-safe guard; the warnings filter is a second one (before
    Python 3.14 ``warnings.catch_warnings`` is process-wide, so under threads it may briefly apply to other
    threads, which is harmless). Bound the upload size (bytes) at the service edge as well. ``max_aspect``:
    crop to the centre first (:func:`bound_for_clip`), before the conversion to RGB triples the pixels' bytes,
    and shrink images above ``REDUCE_ABOVE_PIXELS`` by an integer factor (JPEG draft decoding, else a box reduce).
    """
    if isinstance(data, Image.Image):
        _check_pixels(data.size, max_pixels)
        return _to_rgb(bound_for_clip(data, max_aspect) if max_aspect else data)
    if not isinstance(data, bytes | bytearray | memoryview):
        raise TypeError(f"expected image bytes or a PIL.Image, got {type(data).__name__}")
    raw = bytes(data)
    if not raw:
        raise ImageDecodeError("empty image data")
    try:
        with warnings.catch_warnings():
            # Pillow warns above Image.MAX_IMAGE_PIXELS and raises above twice that; make both errors.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(raw), formats=ALLOWED_IMAGE_FORMATS) as probe:  # header only
                _check_pixels(probe.size, max_pixels)
                image_format = probe.format
                probe.verify()
            # verify() leaves the handle unusable: decode a fresh one fully (truncated data fails here).
            with Image.open(io.BytesIO(raw), formats=[image_format]) as image:
                if max_aspect is None:
                    image.load()
                    return _to_rgb(image)
                factor = _reduce_factor(image.size)
                if factor > 1 and image_format == "JPEG":  # decode at 1/2, 1/4 or 1/8 scale: less memory
                    image.draft(image.mode, (image.size[0] // factor, image.size[1] // factor))
                image.load()
                decoded = bound_for_clip(image, max_aspect)
                if (factor := _reduce_factor(decoded.size)) > 1:
                    if decoded.mode == "1" or decoded.mode.startswith("I"):  # modes reduce() does not take
                        decoded = _from_16_bit(decoded) if decoded.mode.startswith("I") else decoded.convert("L")
                    decoded = decoded.reduce(factor)
                return _to_rgb(decoded)
    except ImageDecodeError:
        raise
    except Image.UnidentifiedImageError:
        raise ImageDecodeError(f"not a supported image (allowed formats: {', '.join(ALLOWED_IMAGE_FORMATS)})") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageDecodeError(f"image too large (possible decompression bomb): {exc}") from None
    except Exception as exc:  # any Pillow failure on untrusted bytes means "not a valid image"
        raise ImageDecodeError(f"corrupt or truncated image: {type(exc).__name__}: {exc}") from None


def _from_16_bit(image: Image.Image) -> Image.Image:
    """16-bit (and 32-bit integer) greyscale -> 8-bit "L", scaled; Pillow's convert clips every value above 255."""
    values = np.asarray(image)
    if values.dtype != np.uint16:  # "I": 32-bit integers
        values = values.clip(0, 65535)
    return Image.fromarray((values.astype(np.uint32) * 255 // 65535).astype(np.uint8), mode="L")


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode.startswith("I"):  # "I;16", "I;16B", "I": 16-bit PNG greyscale
        image = _from_16_bit(image)
    return image.convert("RGB")


def _reduce_factor(size: tuple[int, int]) -> int:
    """Integer shrink factor for a decoded image of ``size`` (1: leave it as it is)."""
    width, height = size
    if width * height <= REDUCE_ABOVE_PIXELS:
        return 1
    factor = math.ceil(math.sqrt(width * height / REDUCED_TARGET_PIXELS))
    return max(1, min(factor, min(width, height) // REDUCED_MIN_SIDE))


def bound_for_clip(image: Image.Image, max_aspect: float = MAX_UNCROPPED_ASPECT) -> Image.Image:
    """Crop an image longer than ``max_aspect`` : 1 to its centre at that ratio, so preprocessing stays bounded.

    open_clip's eval transform (resize the short side to S, then centre-crop S x S) keeps only the central
    square of the image, so the crop keeps that square with a margin of (max_aspect - 1) / 2 squares each side;
    after it the resize allocates at most S x (max_aspect * S) pixels whatever the upload.
    Images within the ratio are returned as they are (their features are exactly open_clip's)."""
    width, height = image.size
    short, long = min(width, height), max(width, height)
    if long <= max_aspect * short:
        return image
    keep = max(1, round(max_aspect * short))
    start = (long - keep) // 2
    box = (start, 0, start + keep, height) if width > height else (0, start, width, start + keep)
    return image.crop(box)


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


class ClipEncoder:
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

    def encode_item(self, text: str | None, image: ImageInput | None) -> dict[str, np.ndarray]:
        """Features of one item: ``{"text": (D,), "image": (D,)}`` float32, keys as in ``missrec.data``.

        ``text`` None or blank, or ``image`` None, gives an all-zero row for that modality. Invalid image
        bytes raise :class:`ImageDecodeError` (an item with a broken image is an error, not a missing image).
        """
        zeros = np.zeros(self.dim, dtype=np.float32)
        return {
            "text": self.encode_text(text) if text is not None and text.strip() else zeros,
            "image": self.encode_image(image) if image is not None else zeros.copy(),
        }

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
                digest = hashlib.sha256()
                with path.open("rb") as fh:
                    for chunk in iter(lambda: fh.read(1 << 20), b""):
                        digest.update(chunk)
                self._checkpoint_sha256 = digest.hexdigest()
            info["checkpoint_sha256"] = self._checkpoint_sha256
        return info
