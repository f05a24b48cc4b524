"""Torch-free CLIP input handling: safe decoding of untrusted images, open_clip's eval image transform made
explicit in numpy/PIL, and the CLIP BPE tokenizer over open_clip's vocabulary file.

Both encoders (:class:`clip_features.torch_encoder.ClipEncoder`, torch, and
:class:`clip_features.onnx_encoder.OnnxClipEncoder`, ONNX Runtime) decode images here, so a picture is accepted
or refused the same way on every path. This module imports neither torch nor open_clip: the serving process
ingests through it without them.
"""

from __future__ import annotations

import gzip
import hashlib
import html
import io
import itertools
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import ftfy
import numpy as np
import regex as re
from PIL import Image

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
# WebP cannot be decoded at a reduced scale here, and Pillow's WebP decoder holds ~4 copies of the RGBA frame while
# decoding (measured: a 1,210-byte 5477 x 5477 RGBA WebP took 465 MiB): WebP uploads get a lower pixel limit.
MAX_WEBP_PIXELS = 12_000_000
REDUCE_STRIP_ROWS = 256  # the box reduce converts and shrinks this many rows at a time (no second full-size copy)
ALLOWED_IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP")

ImageInput = bytes | bytearray | memoryview | Image.Image


class ImageDecodeError(ValueError):
    """Image bytes that are not a supported, intact, reasonably sized image."""


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
                image_format = probe.format
                _check_pixels(probe.size, min(max_pixels, MAX_WEBP_PIXELS) if image_format == "WEBP" else max_pixels)
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
                    return _reduce_to_rgb(decoded, factor)
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


def _reduce_to_rgb(image: Image.Image, factor: int) -> Image.Image:
    """RGB box reduce by ``factor``, strip by strip: each strip of rows is converted to RGB and reduced on its own, so
    the peak is the decoded image plus one strip (a whole-image reduce of RGBA premultiplies into a full-size copy
    first: a 30 Mpx PNG took 235 MiB instead of 117). Strips are whole boxes high: the same boxes as one reduce."""
    width, height = image.size
    out = Image.new("RGB", (-(-width // factor), -(-height // factor)))
    step = factor * max(1, REDUCE_STRIP_ROWS // factor)
    for top in range(0, height, step):
        strip = _to_rgb(image.crop((0, top, width, min(top + step, height))))
        out.paste(strip.reduce(factor), (0, top // factor))
    return out


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


# ----- open_clip's eval image transform, explicit ------------------------------------------------------------------
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class ImageTransform:
    """open_clip's eval transform for ``resize_mode="shortest"`` (every model used here), in PIL + numpy.

    torchvision's ``Resize(S, bicubic)`` on a PIL image: the short side becomes S and the long side
    ``int(S * long / short)`` (truncated), through Pillow's own bicubic ``resize`` (which antialiases); an image
    already of that size is left untouched. ``CenterCrop(S)``: offsets ``int(round((side - S) / 2))``, a Pillow
    crop (after the resize both sides are >= S, so torchvision's padding branch never runs). Then RGB,
    ``to_tensor`` (uint8 / 255 in float32, channels first) and ``(x - mean) / std`` in float32.
    ``tests/clip_features/test_onnx_encoder.py`` checks the output against open_clip's transform on real photos.
    """

    image_size: int = 224
    mean: tuple[float, float, float] = OPENAI_MEAN
    std: tuple[float, float, float] = OPENAI_STD

    def resized_size(self, size: tuple[int, int]) -> tuple[int, int]:
        """(width, height) after the short-side resize."""
        width, height = size
        short, long = min(width, height), max(width, height)
        new_long = int(self.image_size * long / short)
        return (self.image_size, new_long) if width <= height else (new_long, self.image_size)

    def __call__(self, image: Image.Image) -> np.ndarray:
        """A decoded PIL image -> ``(3, S, S)`` float32 pixels, normalised."""
        target = self.resized_size(image.size)
        if target != image.size:
            image = image.resize(target, Image.Resampling.BICUBIC)
        width, height = image.size
        side = self.image_size
        top, left = round((height - side) / 2.0), round((width - side) / 2.0)
        image = image.crop((left, top, left + side, top + side))
        if image.mode != "RGB":
            image = image.convert("RGB")
        pixels = np.asarray(image, dtype=np.uint8).astype(np.float32) / np.float32(255.0)
        pixels = pixels.transpose(2, 0, 1)
        mean = np.asarray(self.mean, dtype=np.float32)[:, None, None]
        std = np.asarray(self.std, dtype=np.float32)[:, None, None]
        return np.ascontiguousarray((pixels - mean) / std, dtype=np.float32)


# ----- the CLIP BPE tokenizer without torch ------------------------------------------------------------------------
# open_clip's SimpleTokenizer (clean="lower", no reduction mask) returns a torch tensor; this is a torch-free encoder
# over the same vocabulary file, checked token for token against it in tests/clip_features/test_onnx_encoder.py.
START_OF_TEXT, END_OF_TEXT = "<start_of_text>", "<end_of_text>"
N_MERGES = 49152 - 256 - 2  # merges the CLIP vocabulary uses (the file holds more)
_WORD_PATTERN = rf"{START_OF_TEXT}|{END_OF_TEXT}|'s|'t|'re|'ve|'m|'ll|'d|[\p{{L}}]+|[\p{{N}}]|[^\s\p{{L}}\p{{N}}]+"


def _byte_alphabet() -> tuple[dict[int, str], list[str]]:
    """Byte-level BPE's alphabet: byte -> the printable character standing for it, and the characters in vocabulary
    order (the printable bytes as themselves first, then the other bytes as chr(256), chr(257), ...)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    chars = {b: chr(b) for b in printable} | {b: chr(256 + n) for n, b in enumerate(others)}
    return chars, [chars[b] for b in (*printable, *others)]


class ClipTokenizer:
    """CLIP's BPE over a ``bpe_simple_vocab_16e6.txt.gz`` file: text -> ``(context_length,)`` int64 token ids.

    Cleaning as open_clip's ``clean="lower"``: ``ftfy.fix_text``, HTML entities unescaped twice, whitespace
    collapsed, lower case. Ids: ``<start_of_text>``, the BPE tokens, ``<end_of_text>``, zero padding; a text
    longer than the context is cut and its last kept id replaced by ``<end_of_text>`` (open_clip's truncation).
    """

    def __init__(self, vocab_path: str | Path, context_length: int = 77) -> None:
        with gzip.open(vocab_path, "rt", encoding="utf-8") as fh:
            lines = fh.read().split("\n")
        merges = [tuple(line.split()) for line in lines[1 : N_MERGES + 1]]
        if len(merges) != N_MERGES or any(len(m) != 2 for m in merges):
            raise ValueError(f"{vocab_path} is not a CLIP BPE vocabulary ({len(merges)} merges read)")
        self.byte_chars, alphabet = _byte_alphabet()
        symbols = alphabet + [c + "</w>" for c in alphabet] + ["".join(m) for m in merges]
        symbols += [START_OF_TEXT, END_OF_TEXT]
        self.ids = {symbol: i for i, symbol in enumerate(symbols)}
        self.ranks = {merge: rank for rank, merge in enumerate(merges)}
        self.sot, self.eot = self.ids[START_OF_TEXT], self.ids[END_OF_TEXT]
        self.context_length = context_length
        self.vocab_size = len(symbols)
        self._words: dict[str, list[int]] = {}
        self._pattern = re.compile(_WORD_PATTERN, re.IGNORECASE)

    @staticmethod
    def clean(text: str) -> str:
        text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
        return " ".join(text.split()).lower()

    def _merge(self, word: str) -> list[int]:
        """BPE of one pre-token (already mapped to byte characters): merge the lowest-ranked pair until none is left."""
        if word in self._words:
            return self._words[word]
        if word in (START_OF_TEXT, END_OF_TEXT):
            return [self.ids[word]]
        parts = [*word[:-1], word[-1] + "</w>"]
        while len(parts) > 1:
            rank, pair = min((self.ranks.get(pair, N_MERGES), pair) for pair in itertools.pairwise(parts))
            if rank == N_MERGES:
                break
            merged, i = [], 0
            while i < len(parts):  # every occurrence of the pair, left to right
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == pair:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        ids = [self.ids[p] for p in parts]
        if len(self._words) < 100_000:  # bounded cache: ingestion texts are untrusted
            self._words[word] = ids
        return ids

    def encode(self, text: str) -> list[int]:
        """BPE ids of ``text`` (no start/end ids, no truncation)."""
        ids: list[int] = []
        for word in self._pattern.findall(self.clean(text)):
            ids += self._merge("".join(self.byte_chars[b] for b in word.encode("utf-8")))
        return ids

    def __call__(self, text: str) -> np.ndarray:
        ids = [self.sot, *self.encode(text), self.eot]
        if len(ids) > self.context_length:
            ids = ids[: self.context_length]
            ids[-1] = self.eot
        out = np.zeros(self.context_length, dtype=np.int64)
        out[: len(ids)] = ids
        return out


# ----- what both encoders share ----------------------------------------------------------------------------------
def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class ItemEncoder:
    """An item's features from ``encode_text`` and ``encode_image`` (``ClipEncoder``: torch, ``OnnxClipEncoder``)."""

    dim: int
    max_image_pixels: int

    def encode_text(self, text: str) -> np.ndarray:
        raise NotImplementedError

    def encode_image(self, image: ImageInput) -> np.ndarray:
        raise NotImplementedError

    def encode_item(self, text: str | None, image: ImageInput | None) -> dict[str, np.ndarray]:
        """Features of one item: ``{"text": (D,), "image": (D,)}`` float32, keys as in ``missrec.data.dataset``.

        ``text`` None or blank, or ``image`` None, gives an all-zero row for that modality. Invalid image
        bytes raise :class:`ImageDecodeError` (an item with a broken image is an error, not a missing image).
        """
        zeros = np.zeros(self.dim, dtype=np.float32)
        return {
            "text": self.encode_text(text) if text is not None and text.strip() else zeros,
            "image": self.encode_image(image) if image is not None else zeros.copy(),
        }
