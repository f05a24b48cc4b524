"""Tests for clip_features.torch_encoder: the loading gate, safe image decoding, determinism and missing modalities.

Models are RANDOMLY INITIALISED (no pretrained CLIP weights can be downloaded here): the tests check plumbing,
identity and safety, not semantics. Photos and texts are the real ABO samples.
"""

from __future__ import annotations

import io
import pickle
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clip_features.torch_encoder import (
    MAX_IMAGE_PIXELS,
    MAX_UNCROPPED_ASPECT,
    TINY_MODEL,
    ClipEncoder,
    ImageDecodeError,
    _resolve_pretrained,
    decode_image,
    save_random_init_checkpoint,
)

DIM = 512


@pytest.fixture(scope="module")
def encoder() -> ClipEncoder:
    return ClipEncoder.random_init(TINY_MODEL, seed=0)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_random_init_checkpoint(TINY_MODEL, tmp_path_factory.mktemp("ckpt") / "tiny.pt", seed=0)


def _photos(abo_dir: Path) -> list[Path]:
    photos = sorted(abo_dir.glob("*/*.jpg"))
    assert len(photos) == 12
    return photos


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height RGB pixels (hardly any pixel data follows)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(b"\0" * 64)) + _chunk(b"IEND", b"")
    )


def _encoded(image: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


# ----- loading gate ----------------------------------------------------------------------------------------


def test_checkpoint_round_trip_gives_identical_embeddings(
    encoder: ClipEncoder, checkpoint: Path, abo_dir: Path, abo_products: list[dict]
) -> None:
    loaded = ClipEncoder(TINY_MODEL, str(checkpoint))  # the production path: pretrained=<local file>
    assert loaded.pretrained == str(checkpoint.resolve())
    mem_state, file_state = encoder.model.state_dict(), loaded.model.state_dict()
    assert mem_state.keys() == file_state.keys()
    assert all(torch.equal(mem_state[k], file_state[k]) for k in mem_state)
    photo = _photos(abo_dir)[0].read_bytes()
    text = abo_products[0]["text"]
    assert np.array_equal(loaded.encode_image(photo), encoder.encode_image(photo))
    assert np.array_equal(loaded.encode_text(text), encoder.encode_text(text))


def test_local_checkpoint_is_read_with_weights_only(checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[dict] = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    ClipEncoder(TINY_MODEL, checkpoint)
    assert calls, "open_clip did not load the checkpoint through torch.load"
    assert all(kw.get("weights_only") is True for kw in calls), calls


class _Payload:
    """Any class outside torch's allow-list: a weights_only load must refuse to unpickle it."""


def test_checkpoint_with_pickled_objects_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {"x": _Payload()}}, path)
    with pytest.raises(pickle.UnpicklingError):
        ClipEncoder(TINY_MODEL, path)


def test_checkpoint_is_loaded_strictly(checkpoint: Path, tmp_path: Path) -> None:
    state = torch.load(checkpoint, weights_only=True)
    del state["text_projection"]
    torch.save(state, tmp_path / "partial.pt")
    with pytest.raises(RuntimeError, match="text_projection"):
        ClipEncoder(TINY_MODEL, tmp_path / "partial.pt")


def test_bad_pretrained_values_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="neither a local checkpoint file nor a pretrained tag"):
        ClipEncoder(TINY_MODEL, "no-such-tag")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ClipEncoder(TINY_MODEL, tmp_path / "missing.pt")
    (tmp_path / "weights.npz").write_bytes(b"")
    with pytest.raises(ValueError, match="only torch state dicts"):
        ClipEncoder(TINY_MODEL, tmp_path / "weights.npz")


def test_openai_tag_gets_quick_gelu() -> None:
    # open_clip 3.x only warns about this mismatch; the OpenAI weights need QuickGELU.
    assert _resolve_pretrained("ViT-B-32", "openai") == ("openai", True)
    assert _resolve_pretrained("ViT-B-32", "laion2b_s34b_b79k") == ("laion2b_s34b_b79k", False)


def test_random_init_is_seeded_and_leaves_the_global_rng_alone(encoder: ClipEncoder) -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    again = ClipEncoder.random_init(TINY_MODEL, seed=0)
    assert torch.equal(torch.rand(3), expected)
    other = ClipEncoder.random_init(TINY_MODEL, seed=1)
    text = "a yoga bag"
    assert np.array_equal(again.encode_text(text), encoder.encode_text(text))
    assert not np.array_equal(other.encode_text(text), encoder.encode_text(text))


# ----- encoding --------------------------------------------------------------------------------------------


def test_real_photos_encode_to_finite_raw_vectors(encoder: ClipEncoder, abo_dir: Path) -> None:
    assert encoder.dim == DIM
    vectors = np.stack([encoder.encode_image(p.read_bytes()) for p in _photos(abo_dir)])
    assert vectors.shape == (12, DIM) and vectors.dtype == np.float32
    assert np.isfinite(vectors).all()
    # Raw projected embeddings, i.e. exactly what the model's own encode_image gives without normalising.
    pixels = encoder.preprocess(Image.open(_photos(abo_dir)[0]).convert("RGB")).unsqueeze(0)
    with torch.no_grad():
        raw = encoder.model.encode_image(pixels, normalize=False)[0].numpy()
    assert np.array_equal(vectors[0], raw)
    assert not np.allclose(np.linalg.norm(vectors, axis=1), 1.0)


def test_encoding_is_deterministic(encoder: ClipEncoder, abo_dir: Path) -> None:
    photo = _photos(abo_dir)[3]
    first = encoder.encode_image(photo.read_bytes())
    assert np.array_equal(encoder.encode_image(photo.read_bytes()), first)
    with Image.open(photo) as image:  # a decoded PIL image takes the same path after decoding
        assert np.array_equal(encoder.encode_image(image), first)


def test_different_photos_give_different_vectors(encoder: ClipEncoder, abo_dir: Path) -> None:
    vectors = np.stack([encoder.encode_image(p.read_bytes()) for p in _photos(abo_dir)])
    gaps = np.abs(vectors[:, None, :] - vectors[None, :, :]).max(axis=-1)  # (12, 12)
    assert (gaps[~np.eye(12, dtype=bool)] > 1e-4).all()


def test_same_product_text_gives_the_same_vector(encoder: ClipEncoder, abo_products: list[dict]) -> None:
    texts = [p["text"] for p in abo_products]
    assert len(set(texts)) == len(texts) >= 3
    vectors = [encoder.encode_text(t) for t in texts]
    for text, vector in zip(texts, vectors, strict=True):
        assert np.array_equal(encoder.encode_text(text), vector)
        spaced = "  " + text.replace(" ", "   ")
        assert np.array_equal(encoder.encode_text(spaced), vector)  # the tokenizer cleans whitespace
    assert not np.array_equal(vectors[0], vectors[1])
    assert not np.array_equal(vectors[1], vectors[2])


def test_missing_modalities_are_zero_rows(encoder: ClipEncoder, abo_dir: Path, abo_products: list[dict]) -> None:
    photo = _photos(abo_dir)[5].read_bytes()
    text = abo_products[1]["text"]
    both = encoder.encode_item(text, photo)
    assert set(both) == {"text", "image"}
    assert np.array_equal(both["text"], encoder.encode_text(text))
    assert np.array_equal(both["image"], encoder.encode_image(photo))
    no_text = encoder.encode_item("  \n", photo)
    assert no_text["text"].shape == (DIM,) and not no_text["text"].any()
    assert np.array_equal(no_text["image"], both["image"])
    no_image = encoder.encode_item(text, None)
    assert not no_image["image"].any() and np.array_equal(no_image["text"], both["text"])
    nothing = encoder.encode_item(None, None)
    assert all(v.shape == (DIM,) and v.dtype == np.float32 and not v.any() for v in nothing.values())


# ----- untrusted images ------------------------------------------------------------------------------------

NOT_IMAGES = [b"", b"definitely not an image", b"%PDF-1.7\n" + b"\0" * 100, b"\x89PNG\r\n"]


@pytest.mark.parametrize("data", NOT_IMAGES)
def test_non_image_bytes_are_rejected(encoder: ClipEncoder, data: bytes) -> None:
    with pytest.raises(ImageDecodeError):
        encoder.encode_image(data)
    with pytest.raises(ImageDecodeError):
        encoder.encode_item("text", data)


def test_truncated_jpeg_is_rejected(abo_dir: Path) -> None:
    data = _photos(abo_dir)[0].read_bytes()
    decode_image(data)  # the intact photo is fine
    with pytest.raises(ImageDecodeError, match="corrupt or truncated"):
        decode_image(data[: len(data) // 2])


def test_png_with_a_bad_checksum_is_rejected() -> None:
    data = bytearray(_encoded(Image.new("RGB", (16, 16), "red"), "PNG"))
    data[-20] ^= 0xFF  # inside the IDAT chunk
    with pytest.raises(ImageDecodeError):
        decode_image(bytes(data))


def test_header_claiming_huge_dimensions_is_rejected() -> None:
    with pytest.raises(ImageDecodeError, match="decompression bomb"):
        decode_image(_png_claiming(100_000, 100_000))  # Pillow's own bomb error, wrapped
    with pytest.raises(ImageDecodeError, match="above the limit"):
        decode_image(_png_claiming(8_000, 8_000))  # under Pillow's limit, over ours


def test_real_decompression_bomb_is_rejected_before_decoding() -> None:
    bomb = _encoded(Image.new("1", (7_000, 7_000)), "PNG")  # a valid, tiny file of 49 M pixels
    assert len(bomb) < 100_000 and MAX_IMAGE_PIXELS < 7_000 * 7_000
    with pytest.raises(ImageDecodeError, match="above the limit"):
        decode_image(bomb)


def test_pixel_limit_is_configurable(abo_dir: Path) -> None:
    blank = _encoded(Image.new("RGB", (300, 300), "white"), "PNG")
    assert decode_image(blank).size == (300, 300)
    with pytest.raises(ImageDecodeError, match="above the limit of 50,000"):
        decode_image(blank, max_pixels=50_000)
    strict = ClipEncoder.random_init(TINY_MODEL, max_image_pixels=50_000)
    with pytest.raises(ImageDecodeError):
        strict.encode_image(_photos(abo_dir)[0].read_bytes())


def test_decompression_bomb_warning_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1_000)  # Pillow warns above this, errors above twice it
    with pytest.raises(ImageDecodeError, match="decompression bomb"):
        decode_image(_encoded(Image.new("RGB", (40, 40)), "PNG"))  # 1,600 pixels: warning only in Pillow


def test_formats_outside_the_allow_list_are_rejected() -> None:
    tiff = _encoded(Image.new("RGB", (8, 8)), "TIFF")
    with pytest.raises(ImageDecodeError, match="not a supported image"):
        decode_image(tiff)


def test_decoded_images_are_rgb() -> None:
    for mode in ("L", "RGBA", "P", "CMYK"):
        fmt = "JPEG" if mode in ("L", "CMYK") else "PNG"
        image = decode_image(_encoded(Image.new(mode, (10, 6)), fmt))
        assert image.mode == "RGB" and image.size == (10, 6)


# ----- real architecture -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_vit_b_32_random_init_round_trip(tmp_path: Path, abo_dir: Path, abo_products: list[dict]) -> None:
    path = save_random_init_checkpoint("ViT-B-32", tmp_path / "vit-b-32.pt", seed=0)
    loaded = ClipEncoder("ViT-B-32", path)
    assert loaded.dim == DIM
    photo = _photos(abo_dir)[7].read_bytes()
    features = loaded.encode_item(abo_products[-1]["text"], photo)
    assert all(v.shape == (DIM,) and np.isfinite(v).all() and v.any() for v in features.values())
    state = torch.load(path, weights_only=True)
    assert all(torch.equal(state[k], v) for k, v in loaded.model.state_dict().items())


# ----- adversarial images: bounded preprocessing ----------------------------------------------------------------


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith(field + ":"))


def _peak_delta_mib(fn) -> float:
    """Peak RSS growth (MiB) while ``fn`` runs: the kernel's high-water mark is reset first (Linux clear_refs)."""
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    before = _rss_kib("VmRSS")
    fn()
    return (_rss_kib("VmHWM") - before) / 1024


@pytest.mark.parametrize(
    "size", [(1, 8_000), (8_000, 1), (1, 50_000), (50_000, 1), (6, 5_000_000)], ids=lambda s: f"{s[0]}x{s[1]}"
)
def test_extreme_aspect_ratios_do_not_blow_up_preprocessing(encoder: ClipEncoder, size: tuple[int, int]) -> None:
    """A 93-byte 1 x 8,000 PNG passes the pixel check, but open_clip resizes its short side to 224 first:
    224 x 1,792,000 pixels (1.2 GB, 9 s); 1 x 50,000 took 11.7 GB. The guard crops such images to their centre
    (what open_clip's centre crop keeps, with a margin) before the transform."""
    data = _encoded(Image.new("L", size, 128), "PNG")
    assert len(data) < 100_000
    out: list[np.ndarray] = []
    peak = _peak_delta_mib(lambda: out.append(encoder.encode_image(data)))
    assert peak < 100, f"{size}: preprocessing grew RSS by {peak:.0f} MiB"
    assert out[0].shape == (DIM,) and np.isfinite(out[0]).all()


def test_moderate_aspect_ratios_keep_open_clips_exact_transform(encoder: ClipEncoder) -> None:
    """Only extreme images are cropped first: up to MAX_UNCROPPED_ASPECT the features are exactly open_clip's."""
    image = Image.new("RGB", (MAX_UNCROPPED_ASPECT * 40, 40), "white")
    image.paste((200, 10, 10), (0, 0, 60, 40))
    pixels = encoder.preprocess(image).unsqueeze(0)
    with torch.no_grad():
        raw = encoder.model.encode_image(pixels, normalize=False)[0].numpy()
    assert np.array_equal(encoder.encode_image(_encoded(image, "PNG")), raw)


def test_16_bit_greyscale_is_scaled_not_clipped() -> None:
    ramp = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype(np.uint16)  # 0 .. 65,520
    image = decode_image(_encoded(Image.fromarray(ramp), "PNG"))
    assert image.mode == "RGB"
    grey = np.asarray(image)[..., 0].astype(int)
    assert np.abs(grey - ramp.astype(int) * 255 // 65535).max() <= 1  # Pillow's own convert makes it all 255
