"""Thumbnails of ingested images: a small JPEG stored with the item so the console can show what was ingested
(the pixels re-encoded, none of the upload's metadata: a JPEG comment would otherwise be served back verbatim)."""

from __future__ import annotations

import io
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from PIL.Image import Image

THUMBNAIL_PIXELS = 192  # longest side
THUMBNAIL_QUALITY = 80


def thumbnail(picture: Image) -> bytes:
    """A JPEG of at most THUMBNAIL_PIXELS on its longest side (aspect kept) of the uploaded image as the ingest path
    decoded it (once, for the encoder too). Shrinks ``picture`` in place: the caller is done with it."""
    picture.thumbnail((THUMBNAIL_PIXELS, THUMBNAIL_PIXELS))
    picture.info.clear()  # re-encoded pixels only: no comment, EXIF, ICC or XMP of the upload is ever served back
    out = io.BytesIO()
    picture.save(out, format="JPEG", quality=THUMBNAIL_QUALITY)
    return out.getvalue()
