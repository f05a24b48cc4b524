"""Memory of decoding untrusted images (clip_features/preprocess.py): a tiny upload that declares a huge size stays
within the documented bound (~300 MB of RSS, README and docs/reliability.md), measured in a fresh interpreter."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import pytest
from PIL import Image

from clip_features.preprocess import MAX_WEBP_PIXELS, ImageDecodeError, decode_image
from tests.paths import ROOT

BOUND_MIB = 300

MEASURE = """
import json, sys
from pathlib import Path
data = Path(sys.argv[1]).read_bytes()
from clip_features.preprocess import MAX_UNCROPPED_ASPECT, ImageDecodeError, decode_image
from service.thumbnail import thumbnail
def rss():  # this process's peak RSS in MiB (VmHWM: ru_maxrss would start at the parent's peak)
    status = Path("/proc/self/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1]) / 1024
base = rss()
try:
    picture = decode_image(data, max_pixels=30_000_000, max_aspect=MAX_UNCROPPED_ASPECT)
    size, _ = picture.size, thumbnail(picture)
except ImageDecodeError as exc:
    size = str(exc)
print(json.dumps({"mib": rss() - base, "size": size}))
"""


def _image(fmt: str, side: int) -> bytes:
    out = io.BytesIO()
    options = {"lossless": True} if fmt == "WEBP" else {"optimize": True}
    Image.new("RGBA", (side, side), (10, 200, 30, 128)).save(out, format=fmt, **options)
    return out.getvalue()


def _decode_in_a_fresh_process(tmp_path, data: bytes) -> dict:
    path = tmp_path / "upload"
    path.write_bytes(data)
    out = subprocess.run(
        [sys.executable, "-c", MEASURE, str(path)], capture_output=True, text=True, cwd=ROOT, timeout=120, check=True
    )
    return json.loads(out.stdout)


@pytest.mark.parametrize(
    ("fmt", "side"),
    [("WEBP", 5477), ("WEBP", 3464), ("PNG", 5477)],  # 30 Mpx (the ingest limit) and 12 Mpx (the WebP limit)
)
def test_a_tiny_upload_declaring_a_huge_image_stays_within_the_memory_bound(tmp_path, fmt, side):
    data = _image(fmt, side)
    assert len(data) < 200_000  # tiny uploads: 1.2 kB for the 30 Mpx WebP
    seen = _decode_in_a_fresh_process(tmp_path, data)
    print(f"{fmt} {side}x{side} ({len(data):,} bytes): peak RSS growth {seen['mib']:.0f} MiB, {seen['size']}")
    assert seen["mib"] < BOUND_MIB, seen
    if fmt == "WEBP" and side * side > MAX_WEBP_PIXELS:
        assert "above the limit of 12,000,000" in seen["size"]
    else:
        assert isinstance(seen["size"], list)


def test_webp_has_its_own_pixel_limit():
    with pytest.raises(ImageDecodeError, match="decompression bomb"):
        decode_image(_image("WEBP", 3500), max_pixels=30_000_000)
    assert decode_image(_image("PNG", 3500), max_pixels=30_000_000).size == (3500, 3500)


def test_the_strip_reduce_gives_the_whole_image_reduce():
    """Reduced strip by strip (no second full-size copy) the pixels are those of one reduce of the RGB image."""
    import numpy as np

    from clip_features.preprocess import _reduce_to_rgb

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (1111, 777, 3), dtype=np.uint8), mode="RGB")
    for factor in (2, 3, 7):
        assert np.array_equal(np.asarray(_reduce_to_rgb(image, factor)), np.asarray(image.reduce(factor)))
