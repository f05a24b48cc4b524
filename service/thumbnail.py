"""Thumbnails of ingested images: a small JPEG stored with the item so the console can show what was ingested."""

from __future__ import annotations

import io

THUMBNAIL_PIXELS = 192  # longest side
THUMBNAIL_QUALITY = 80


def thumbnail(image: bytes) -> bytes:
    """A JPEG of at most THUMBNAIL_PIXELS on its longest side (aspect kept). Decoded through the same gate as
    the encoder (size and format checks), so it raises ImageDecodeError exactly when ingestion would."""
    from clip_features.preprocess import decode_image

    picture = decode_image(image)
    picture.thumbnail((THUMBNAIL_PIXELS, THUMBNAIL_PIXELS))
    out = io.BytesIO()
    picture.save(out, format="JPEG", quality=THUMBNAIL_QUALITY)
    return out.getvalue()
