"""Export open_clip's image and text encoders to a CLIP ONNX directory (read by :mod:`clip_features.onnx_encoder`).

The model is loaded through the one open_clip gate (:class:`clip_features.torch_encoder.ClipEncoder`: a tag or a local
checkpoint, strict, ``weights_only``), its two encoders are exported with the same exporter as the towers
(torch.export, opset 18, batch 1: items are encoded one at a time), and the result is checked end to end before
anything is written in place: on real photos and real product texts (``samples``) or, without them, on SYNTHETIC
images and texts generated here (:func:`synthetic_inputs`; whether two runtimes compute the same function does not
depend on what the pictures show), ONNX Runtime through the explicit torch-free preprocessing and tokenizer against
open_clip's own transform, tokenizer and model. Any feature
difference above ``PARITY_ATOL`` (1e-4), a pixel difference above ``PIXEL_ATOL`` or a single differing token id
raises :class:`~model_export.parity.ExportError`; the measured maxima go into ``clip.json``.

Why a directory of its own rather than graphs inside each serving bundle: the CLIP encoders are the feature
extractor of the dataset, shared by every model trained on it (``missrec prepare`` and ingestion must use the same
one), and they are large (ViT-B-32: ~350 MB image + ~250 MB text) next to a bundle's towers. The service points
at it with ``MISSREC_CLIP_ONNX`` and checks its width against the bundle's at start-up.
"""

from __future__ import annotations

import io
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from PIL import Image
from torch import nn

from clip_features.onnx_encoder import (
    IMAGE_GRAPH,
    IMAGE_INPUT,
    MANIFEST_FILE,
    OUTPUT,
    TEXT_GRAPH,
    TEXT_INPUT,
    VOCAB_FILE,
    ClipManifest,
    OnnxClipEncoder,
    trim_tokens,
)
from clip_features.preprocess import ClipTokenizer, ImageTransform, decode_image, file_sha256
from clip_features.torch_encoder import ClipEncoder
from model_export.onnx import OPSET, export_graph
from model_export.parity import PARITY_ATOL, ExportError, max_abs_diff

log = logging.getLogger(__name__)

PIXEL_ATOL = 1e-5
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
MAX_SAMPLE_IMAGES = 12
MAX_SAMPLE_TEXTS = 48
# Texts every export checks besides the samples': empty, unicode, HTML entities, one longer than the context.
EDGE_TEXTS = ("", "Café crème & thé — 100% 聚酯纤维, Größe XL &amp; more", "stainless steel water bottle " * 30)


class _ImageEncoder(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixels, normalize=False)


class _TextEncoder(nn.Module):
    """open_clip's ``CLIP.encode_text`` on the first L positions only (L dynamic, 2..context length).

    The text transformer is causal and pools the end-of-text position, whose output depends on the positions up to
    it only: the padding after it need not be computed (a product title is ~10 of the 77 positions). The steps are
    encode_text's, over its own modules, with the positional embedding and the causal mask cut to L; the export's
    parity check compares the graph with the real ``encode_text`` on the full context."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        import open_clip
        from open_clip.transformer import text_global_pool

        if type(model) is not open_clip.CLIP or model.text_pool_type != "argmax" or model.attn_mask is None:
            raise ExportError(f"{type(model).__name__}: only open_clip CLIP text towers (causal, argmax pool) export")
        self.model, self.pool = model, text_global_pool

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        m, length = self.model, tokens.shape[1]
        x = m.token_embedding(tokens) + m.positional_embedding[:length]
        x = m.transformer(x, attn_mask=m.attn_mask[:length, :length])
        x = self.pool(m.ln_final(x), tokens, m.text_pool_type)
        return m.text_projection(x) if isinstance(m.text_projection, nn.Linear) else x @ m.text_projection


def explicit_transform(preprocess: Any) -> ImageTransform:
    """open_clip's eval transform -> the equivalent :class:`ImageTransform`; refuse any transform it cannot mirror."""
    from torchvision.transforms import CenterCrop, InterpolationMode, Normalize, Resize

    steps = list(getattr(preprocess, "transforms", []))
    names = [type(t).__name__ for t in steps]
    expected = ["Resize", "CenterCrop", "MaybeConvertMode", "MaybeToTensor", "Normalize"]
    if names != expected:
        raise ExportError(f"open_clip transform {names} is not the one the explicit preprocessing mirrors ({expected})")
    resize, crop, normalize = steps[0], steps[1], steps[4]
    assert isinstance(resize, Resize) and isinstance(crop, CenterCrop) and isinstance(normalize, Normalize)
    size = resize.size if isinstance(resize.size, int) else resize.size[0]
    if (
        (not isinstance(resize.size, int) and len(resize.size) != 1)
        or resize.interpolation != InterpolationMode.BICUBIC
        or resize.max_size is not None
        or list(crop.size) != [size, size]
    ):
        raise ExportError(f"unsupported open_clip transform: {resize}, {crop} (expected shortest-side bicubic + crop)")
    mean, std = tuple(float(v) for v in normalize.mean), tuple(float(v) for v in normalize.std)
    return ImageTransform(int(size), mean, std)  # type: ignore[arg-type]


def _vocab_of(encoder: ClipEncoder) -> tuple[Path, int]:
    """open_clip's BPE vocabulary file and context length; refuse tokenizers the torch-free one does not mirror."""
    from open_clip.tokenizer import SimpleTokenizer, _clean_lower, default_bpe

    tok = encoder.tokenizer
    if type(tok) is not SimpleTokenizer or tok.clean_fn is not _clean_lower or tok.reduction_fn is not None:
        raise ExportError(f"{encoder.model_name}: only open_clip's SimpleTokenizer (clean='lower') is supported")
    return Path(default_bpe()), int(tok.context_length)


def sample_inputs(samples: Path) -> tuple[list[Path], list[str]]:
    """Real photos (up to 12) and real product texts (non-blank lines of the ``.txt`` files, up to 48) under
    ``samples`` (an ABO-like folder: one folder per product with photos and a metadata.txt)."""
    files = sorted(p for p in Path(samples).rglob("*") if p.is_file())
    images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES][:MAX_SAMPLE_IMAGES]
    texts = [line.strip() for p in files if p.suffix == ".txt" for line in p.read_text("utf-8").splitlines()]
    texts = [t for t in texts if t][:MAX_SAMPLE_TEXTS]
    if len(images) < 2 or len(texts) < 2:
        raise ExportError(f"{samples}: parity needs real photos and product texts ({len(images)} and {len(texts)})")
    return images, texts


# SYNTHETIC parity images: (width, height, mode, format). Sizes that exercise the transform as real photos do
# (landscape, portrait, a 4.9:1 strip, exactly 224 x 224, smaller than 224, greyscale, RGBA, JPEG and PNG).
SYNTHETIC_IMAGES = (
    (640, 480, "RGB", "JPEG"),
    (480, 900, "RGB", "PNG"),
    (1024, 208, "RGB", "JPEG"),
    (224, 224, "RGB", "PNG"),
    (100, 37, "RGB", "PNG"),
    (300, 300, "L", "PNG"),
    (400, 320, "RGBA", "PNG"),
    (1200, 900, "RGB", "JPEG"),
)
_WORDS = (
    ("Stainless steel", "Cotton", "Ceramic", "Bamboo", "Leather", "Glass", "Aluminium", "Wool"),
    ("water bottle", "t-shirt", "coffee mug", "cutting board", "wallet", "vase", "laptop stand", "scarf"),
    ("750 ml", "size XL", "12 oz", "45 x 30 cm", "RFID-blocking", "hand-made", "adjustable", "2-pack"),
    ("Blue", "Black", "Natural", "Red & White", "Grey", "Clear", "Silver", "Green"),
    ("Acme", "Amazon Basics", "Rivet", "Stone & Beam", "Pinzon", "Solimo", "Goodthreads", "Find"),
)


def synthetic_inputs(seed: int = 0, texts: int = 24) -> tuple[list[bytes], list[str]]:
    """SYNTHETIC parity inputs for an export without sample photos: encoded images of :data:`SYNTHETIC_IMAGES`
    (smooth colour gradients, random rectangles and noise: every pixel value and edge the transform can see) and
    product-like texts. Deterministic for a seed."""
    rng = np.random.default_rng(seed)
    images = []
    for width, height, mode, fmt in SYNTHETIC_IMAGES:
        y, x = np.mgrid[0:height, 0:width].astype(np.float32)
        phase = rng.uniform(0, 2 * np.pi, 3)
        freq = rng.uniform(2, 12, 3) / max(width, height)
        rgb = np.stack([127 + 120 * np.sin(2 * np.pi * f * (x + (i + 1) * y) + p) for i, (f, p) in
                        enumerate(zip(freq, phase, strict=True))], axis=-1)  # fmt: skip
        for _ in range(6):
            x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
            rgb[y0 : y0 + int(rng.integers(4, height + 1)), x0 : x0 + int(rng.integers(4, width + 1))] = rng.uniform(
                0, 255, 3
            )
        rgb = np.clip(rgb + rng.normal(0, 12, rgb.shape), 0, 255).astype(np.uint8)
        image = Image.fromarray(rgb, "RGB").convert(mode)
        if mode == "RGBA":
            image.putalpha(Image.fromarray(rng.integers(0, 256, (height, width), dtype=np.uint8), "L"))
        buffer = io.BytesIO()
        image.save(buffer, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
        images.append(buffer.getvalue())
    words = [[str(w) for w in rng.choice(choices, texts)] for choices in _WORDS]
    sentences = [f"{a} {b}, {c}. {d}. {e}." for a, b, c, d, e in zip(*words, strict=True)]
    return images, sentences


def check_parity(
    reference: ClipEncoder, exported: OnnxClipEncoder, images: list[Path] | list[bytes], texts: list[str]
) -> dict:
    """ONNX Runtime with the explicit preprocessing and tokenizer against open_clip, end to end, on image files or
    encoded images; raise above the tolerances, return the measured maxima."""
    pixels, image = 0.0, 0.0
    for item in images:
        raw = item.read_bytes() if isinstance(item, Path) else item
        decoded = decode_image(raw, max_aspect=8)
        pixels = max(pixels, max_abs_diff(exported.transform(decoded), reference.preprocess(decoded).numpy()))
        image = max(image, max_abs_diff(exported.encode_image(raw), reference.encode_image(raw)))
    text, mismatched = 0.0, 0
    for t in (*texts, *EDGE_TEXTS):
        mismatched += int(not np.array_equal(exported.tokenizer(t), reference.tokenizer([t])[0].numpy()))
        text = max(text, max_abs_diff(exported.encode_text(t), reference.encode_text(t)))
    if not pixels <= PIXEL_ATOL:
        raise ExportError(f"explicit preprocessing differs from open_clip's transform: max abs diff {pixels:.3g}")
    if mismatched:
        raise ExportError(f"the torch-free tokenizer differs from open_clip's on {mismatched} text(s)")
    for name, diff in (("image features", image), ("text features", text)):
        if not diff <= PARITY_ATOL:
            raise ExportError(f"ONNX Runtime and open_clip disagree on {name}: max abs diff {diff:.3g} > {PARITY_ATOL}")
    return {
        "image_max_abs_diff": image,
        "text_max_abs_diff": text,
        "pixel_max_abs_diff": pixels,
        "images": len(images),
        "texts": len(texts) + len(EDGE_TEXTS),
        "tokens_mismatched": mismatched,
    }


def export_clip(
    model_name: str, pretrained: str | Path, out: Path, samples: Path | None, *, overwrite: bool = False
) -> ClipManifest:
    """Export, check and write the CLIP ONNX directory ``out`` (atomically: a failed export leaves nothing).
    ``samples``: real photos and texts for the parity check; None: SYNTHETIC ones (:func:`synthetic_inputs`)."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass overwrite=True (--overwrite) to replace it")
    if samples is None:
        images, texts = synthetic_inputs()
        log.warning("no sample photos: the parity check runs on SYNTHETIC images and texts")
    else:
        images, texts = sample_inputs(samples)
    reference = ClipEncoder(model_name, pretrained)
    transform = explicit_transform(reference.preprocess)
    vocab, context_length = _vocab_of(reference)
    model = reference.model
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        side = transform.image_size
        pixels = {IMAGE_INPUT: torch.zeros(1, 3, side, side)}
        export_graph(_ImageEncoder(model), pixels, tmp / IMAGE_GRAPH, [OUTPUT], {IMAGE_INPUT: {}}, "dynamo")
        tokens = torch.from_numpy(trim_tokens(ClipTokenizer(vocab, context_length)("a product title, colour, brand")))
        seq = {TEXT_INPUT: {1: ("text_length", 2, context_length)}}
        export_graph(_TextEncoder(model), {TEXT_INPUT: tokens}, tmp / TEXT_GRAPH, [OUTPUT], seq, "dynamo")
        shutil.copyfile(vocab, tmp / VOCAB_FILE)
        info = reference.describe()
        manifest = ClipManifest(
            model_name=model_name,
            pretrained=str(pretrained) if info.get("checkpoint_sha256") is None else Path(pretrained).name,
            checkpoint_sha256=info.get("checkpoint_sha256"),
            dim=reference.dim,
            image_size=side,
            mean=transform.mean,
            std=transform.std,
            context_length=context_length,
            opset=OPSET,
            files={name: file_sha256(tmp / name) for name in (IMAGE_GRAPH, TEXT_GRAPH, VOCAB_FILE)},
            versions={"open_clip": info["open_clip_version"], "torch": torch.__version__, "onnx": onnx.__version__},
        )
        (tmp / MANIFEST_FILE).write_text(manifest.to_json(), encoding="utf-8")
        parity = check_parity(reference, OnnxClipEncoder(tmp, threads=0), images, texts)
        parity["inputs"] = "real" if samples is not None else "SYNTHETIC"
        manifest = ClipManifest(**{**manifest.__dict__, "parity": parity})
        (tmp / MANIFEST_FILE).write_text(manifest.to_json(), encoding="utf-8")
        for path in tmp.iterdir():
            os.chmod(path, 0o644)
        os.chmod(tmp, 0o755)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("exported %s CLIP encoders to %s (parity %s)", model_name, out, parity)
    return manifest
