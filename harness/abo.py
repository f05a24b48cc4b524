"""The real ABO product samples (``../shared/data/abo-samples``: one folder per product with metadata.txt and
photos), read one way for the tests, the load tests and the scripts (standard library only)."""

from __future__ import annotations

import ast
import base64
from pathlib import Path


def abo_products(abo_dir: Path) -> list[dict]:
    """The real ABO sample products: id (ASIN folder), text ("name. colour. brand." from its metadata.txt), its
    photos' paths, sorted. The one reader of the samples (tests, load tests, scripts)."""
    products = []
    for folder in sorted(p for p in abo_dir.iterdir() if p.is_dir()):
        meta = ast.literal_eval((folder / "metadata.txt").read_text(encoding="utf-8"))

        def first(field: str, meta: dict = meta) -> str:
            raw = meta.get(field, "")
            return raw.split("value=", 1)[1].split("}", 1)[0] if "value=" in raw else ""

        text = ". ".join(x for x in (first("model_name") or first("style"), first("color"), first("brand")) if x)
        products.append({"id": folder.name, "text": text + ".", "images": sorted(folder.glob("*.jpg"))})
    return products


def abo_photos(abo_dir: Path) -> list[dict[str, str]]:
    """One entry per photo of every product: its product's text and the photo as base64 (the load traffic)."""
    return [
        {"text": p["text"], "image_base64": base64.b64encode(image.read_bytes()).decode()}
        for p in abo_products(abo_dir)
        for image in p["images"]
    ]
