"""CLIP in ONNX: the explicit preprocessing and tokenizer against open_clip's, the export's parity gate, the CLIP
directory's checks, and the ONNX encoder against the torch one.

The CLIP is the tiny RANDOM-INIT architecture saved to disk and loaded through the real open_clip path (no
pretrained weights can be downloaded here); photos and texts are the real ABO samples.
"""

from __future__ import annotations

import ast
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clip_features.onnx_encoder import MANIFEST_FILE, TEXT_GRAPH, ClipOnnxError, OnnxClipEncoder, read_manifest
from clip_features.preprocess import ClipTokenizer, ImageTransform
from clip_features.torch_encoder import TINY_MODEL, ClipEncoder, ImageDecodeError, decode_image
from model_export.clip import (
    SYNTHETIC_IMAGES,
    check_parity,
    explicit_transform,
    export_clip,
    sample_inputs,
    synthetic_inputs,
)
from model_export.parity import ExportError
from tests.paths import ROOT


@pytest.fixture(scope="module")
def reference(tiny_clip: tuple[str, str]) -> ClipEncoder:
    """open_clip on the same checkpoint the ONNX graphs were exported from."""
    return ClipEncoder(*tiny_clip)


@pytest.fixture(scope="module")
def onnx_encoder(tiny_clip_onnx: Path) -> OnnxClipEncoder:
    return OnnxClipEncoder(tiny_clip_onnx, threads=1)


def _photos(abo_dir: Path) -> list[Path]:
    photos = sorted(abo_dir.glob("*/*.jpg"))
    assert len(photos) == 12
    return photos


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _variants(abo_dir: Path) -> list[bytes]:
    """The real photos as they are (898x1024 .. 1024x208), and real photos cut or scaled to edge cases: exactly
    224 x 224 (no resize), smaller than 224, an 8:1 strip, a 12:1 strip (centre-cropped first), greyscale, RGBA."""
    photos = _photos(abo_dir)
    out = [p.read_bytes() for p in photos]
    base = Image.open(photos[0]).convert("RGB")
    out += [
        _png(base.crop((100, 100, 324, 324))),
        _png(base.resize((100, 37), Image.Resampling.LANCZOS)),
        _png(base.resize((90, 720))),
        _png(base.resize((1200, 100))),
        _png(base.convert("L")),
        _png(Image.open(photos[5]).convert("RGBA")),
    ]
    return out


def _texts(abo_dir: Path) -> list[str]:
    """Every string value of the real ABO metadata (titles, long bullet lists, Chinese, Spanish ...) + edge cases."""
    texts = []
    for meta in sorted(abo_dir.glob("*/metadata.txt")):
        texts += [v for v in ast.literal_eval(meta.read_text(encoding="utf-8")).values() if isinstance(v, str)]
    return [
        *texts,
        "",
        "   \t\n ",
        "Café crème &amp; thé — Größe XL, ½ price!",
        "mojibake: cafÃ©",  # ftfy repairs it
        "emoji 👜🧘 and 中文 mixed with numbers 12345",
        "it's the bag's strap they've we'll I'm you'd",
        "<start_of_text> literal special tokens <end_of_text>",
        "word " * 200,  # truncated to the context length
    ]


# ----- explicit preprocessing and tokenizer -------------------------------------------------------------------------
def test_explicit_preprocessing_equals_open_clips_transform(reference: ClipEncoder, abo_dir: Path) -> None:
    transform = explicit_transform(reference.preprocess)
    assert transform == ImageTransform()  # 224, OpenAI mean/std: read from open_clip, not assumed
    sizes = set()
    for data in _variants(abo_dir):
        image = decode_image(data, max_aspect=8)
        sizes.add(image.size)
        ours, theirs = transform(image), reference.preprocess(image).numpy()
        assert ours.shape == theirs.shape == (3, 224, 224) and ours.dtype == np.float32
        assert np.abs(ours - theirs).max() <= 1e-5, image.size
    assert len(sizes) >= 10


def test_explicit_preprocessing_can_fail(reference: ClipEncoder, abo_dir: Path) -> None:
    """Another resize (bilinear) is visibly different: the comparison above is not vacuous."""
    image = decode_image(_photos(abo_dir)[0].read_bytes(), max_aspect=8)
    bilinear = image.resize(ImageTransform().resized_size(image.size), Image.Resampling.BILINEAR)
    assert np.abs(ImageTransform()(bilinear) - reference.preprocess(image).numpy()).max() > 1e-2


def test_an_unmirrored_open_clip_transform_is_refused(reference: ClipEncoder) -> None:
    from torchvision.transforms import Compose, InterpolationMode, Resize

    steps = list(reference.preprocess.transforms)
    with pytest.raises(ExportError, match="unsupported open_clip transform"):
        explicit_transform(Compose([Resize(224, interpolation=InterpolationMode.BILINEAR), *steps[1:]]))
    with pytest.raises(ExportError, match="not the one"):
        explicit_transform(Compose(steps[:-1]))


def test_tokenizer_equals_open_clips(reference: ClipEncoder, abo_dir: Path) -> None:
    from open_clip.tokenizer import default_bpe

    ours = ClipTokenizer(default_bpe(), context_length=77)
    texts = _texts(abo_dir)
    assert len(texts) > 30
    for text in texts:
        expected = reference.tokenizer([text])[0].numpy()
        got = ours(text)
        assert got.dtype == np.int64 and got.shape == (77,)
        assert np.array_equal(got, expected), text[:60]
    long = ours("word " * 200)
    assert long[-1] == ours.eot and (long != 0).all()  # cut to the context, end-of-text kept
    assert ours("").tolist()[:3] == [ours.sot, ours.eot, 0]


# ----- the export and its parity gate ---------------------------------------------------------------------------
def test_export_writes_a_checked_directory(tiny_clip: tuple[str, str], tiny_clip_onnx: Path) -> None:
    manifest = read_manifest(tiny_clip_onnx)
    assert (manifest.model_name, manifest.dim, manifest.image_size, manifest.context_length) == (
        TINY_MODEL,
        512,
        224,
        77,
    )
    assert manifest.opset == 18 and manifest.pretrained == Path(tiny_clip[1]).name
    from clip_features.preprocess import file_sha256

    assert manifest.checkpoint_sha256 == file_sha256(tiny_clip[1])
    parity = manifest.parity
    assert parity["images"] == 12 and parity["texts"] >= 20 and parity["tokens_mismatched"] == 0
    assert parity["image_max_abs_diff"] <= 1e-4 and parity["text_max_abs_diff"] <= 1e-4
    assert parity["pixel_max_abs_diff"] <= 1e-5
    assert sorted(p.name for p in tiny_clip_onnx.iterdir()) == sorted([MANIFEST_FILE, *manifest.files])


def test_onnx_features_equal_open_clips(reference: ClipEncoder, onnx_encoder: OnnxClipEncoder, abo_dir: Path) -> None:
    """Independently of the export's own check: every photo variant and every text, item by item."""
    for data in _variants(abo_dir):
        a, b = onnx_encoder.encode_image(data), reference.encode_image(data)
        assert a.shape == (512,) and a.dtype == np.float32 and np.abs(a - b).max() <= 1e-4
    for text in _texts(abo_dir)[::3]:
        a, b = onnx_encoder.encode_text(text), reference.encode_text(text)
        assert np.abs(a - b).max() <= 1e-4, text[:60]
    item = onnx_encoder.encode_item("   ", _photos(abo_dir)[0].read_bytes())
    assert not item["text"].any() and item["image"].any()  # blank text: a zero row, as with the torch encoder


def test_parity_gate_fails_on_other_weights(onnx_encoder: OnnxClipEncoder, abo_dir: Path) -> None:
    other = ClipEncoder.random_init(TINY_MODEL, seed=1)
    images, texts = sample_inputs(abo_dir)
    with pytest.raises(ExportError, match="disagree on image features"):
        check_parity(other, onnx_encoder, images[:2], texts[:2])


def test_parity_on_synthetic_inputs(reference: ClipEncoder, onnx_encoder: OnnxClipEncoder) -> None:
    """An export without sample photos is checked on SYNTHETIC images (every size and mode of
    :data:`SYNTHETIC_IMAGES`) and texts, deterministic, and the gate still refuses other weights on them."""
    images, texts = synthetic_inputs()
    assert (images, texts) == synthetic_inputs() and len(set(texts)) > 10
    decoded = [decode_image(raw) for raw in images]
    assert [d.size for d in decoded] == [(w, h) for w, h, _, _ in SYNTHETIC_IMAGES]
    assert all(np.asarray(d).std() > 20 for d in decoded)  # not flat: the resize and crop see edges and noise
    parity = check_parity(reference, onnx_encoder, images, texts)
    assert parity["images"] == len(SYNTHETIC_IMAGES) and parity["pixel_max_abs_diff"] <= 1e-5
    assert max(parity["image_max_abs_diff"], parity["text_max_abs_diff"]) <= 1e-4 and parity["tokens_mismatched"] == 0
    with pytest.raises(ExportError, match="disagree on image features"):
        check_parity(ClipEncoder.random_init(TINY_MODEL, seed=1), onnx_encoder, images[:2], texts[:2])


def test_failed_export_leaves_nothing(tiny_clip: tuple[str, str], tmp_path: Path, abo_dir: Path) -> None:
    samples = tmp_path / "samples"
    samples.mkdir()
    shutil.copy(_photos(abo_dir)[0], samples / "one.jpg")
    with pytest.raises(ExportError, match="parity needs real photos"):
        export_clip(*tiny_clip, tmp_path / "clip", samples)
    assert not (tmp_path / "clip").exists() and [p.name for p in tmp_path.iterdir()] == ["samples"]
    (tmp_path / "clip").mkdir()
    with pytest.raises(FileExistsError, match="overwrite"):
        export_clip(*tiny_clip, tmp_path / "clip", abo_dir)


@pytest.mark.slow  # the process tier: the CLI as a subprocess
def test_the_export_command_fails_cleanly(tmp_path: Path, abo_dir: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "missrec_cli.main", "export-clip", "--model", TINY_MODEL, "--pretrained",
         str(tmp_path / "missing.pt"), "--out", str(tmp_path / "clip"), "--samples", str(abo_dir)],
        capture_output=True, text=True, cwd=ROOT, timeout=120, check=False,
    )  # fmt: skip
    assert out.returncode == 2 and out.stderr.startswith("error: "), out.stderr[-2000:]
    assert "does not exist" in out.stderr


# ----- the CLIP directory's checks ---------------------------------------------------------------------------------
def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_damaged_or_foreign_directories_are_refused(tiny_clip_onnx: Path, tmp_path: Path) -> None:
    with pytest.raises(ClipOnnxError, match=r"no clip\.json"):
        OnnxClipEncoder(tmp_path)
    damaged = _copy(tiny_clip_onnx, tmp_path / "damaged")
    with (damaged / TEXT_GRAPH).open("r+b") as fh:
        fh.seek(1000)
        byte = fh.read(1)
        fh.seek(1000)
        fh.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(ClipOnnxError, match="does not match its sha256"):
        OnnxClipEncoder(damaged)
    wrong = _copy(tiny_clip_onnx, tmp_path / "wrong-width")
    raw = json.loads((wrong / MANIFEST_FILE).read_text(encoding="utf-8"))
    (wrong / MANIFEST_FILE).write_text(json.dumps({**raw, "dim": 768}), encoding="utf-8")
    with pytest.raises(ClipOnnxError, match="do not match the manifest"):
        OnnxClipEncoder(wrong)
    (wrong / MANIFEST_FILE).write_text(json.dumps({**raw, "format_version": 99}), encoding="utf-8")
    with pytest.raises(ClipOnnxError, match="format version 99"):
        OnnxClipEncoder(wrong)


def test_bad_images_are_refused_like_the_torch_encoder(onnx_encoder: OnnxClipEncoder, abo_dir: Path) -> None:
    data = _photos(abo_dir)[0].read_bytes()
    for bad in (b"", b"not an image", data[: len(data) // 2]):
        with pytest.raises(ImageDecodeError):
            onnx_encoder.encode_image(bad)
    with pytest.raises(TypeError):
        onnx_encoder.encode_text(b"bytes")  # type: ignore[arg-type]


def test_the_onnx_encoder_imports_no_torch(tiny_clip_onnx: Path, abo_dir: Path) -> None:
    photo = _photos(abo_dir)[0]
    code = (
        "import sys, json\n"
        "from clip_features.onnx_encoder import OnnxClipEncoder\n"
        f"e = OnnxClipEncoder({str(tiny_clip_onnx)!r})\n"
        f"f = e.encode_item('Yoga Bag. Iron Grey. Starter.', open({str(photo)!r}, 'rb').read())\n"
        "print(json.dumps({'torch': 'torch' in sys.modules, 'open_clip': 'open_clip' in sys.modules,"
        " 'torchvision': 'torchvision' in sys.modules, 'dims': [len(f['text']), len(f['image'])]}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120, check=False
    )
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result == {"torch": False, "open_clip": False, "torchvision": False, "dims": [512, 512]}
