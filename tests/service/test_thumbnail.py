"""Thumbnails carry only re-encoded pixels: a JPEG comment (a polyglot's ``<script>``), EXIF or ICC profile of the
upload is never served back from the API origin."""

from __future__ import annotations

import io

from PIL import Image

from clip_features.preprocess import MAX_UNCROPPED_ASPECT, decode_image
from service.thumbnail import thumbnail

SCRIPT = b"<script>alert(document.domain)</script>"


def _jpeg_with_metadata() -> bytes:
    image = Image.new("RGB", (640, 480), (200, 30, 30))
    exif = Image.Exif()
    exif[0x010E] = "EXIF-DESCRIPTION-" + SCRIPT.decode()  # ImageDescription
    out = io.BytesIO()
    image.save(out, format="JPEG", comment=SCRIPT, exif=exif.tobytes(), icc_profile=b"ICC-" + SCRIPT)
    return out.getvalue()


def test_a_thumbnail_keeps_no_metadata_of_the_upload():
    upload = _jpeg_with_metadata()
    assert SCRIPT in upload
    thumb = thumbnail(decode_image(upload, max_aspect=MAX_UNCROPPED_ASPECT))
    assert SCRIPT not in thumb and b"EXIF-DESCRIPTION" not in thumb and b"ICC-" not in thumb
    with Image.open(io.BytesIO(thumb)) as back:
        assert back.format == "JPEG" and max(back.size) == 192
        assert not {"comment", "exif", "icc_profile", "xmp"} & set(back.info)
