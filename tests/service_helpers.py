"""Helpers for service tests: app construction and ABO sample products."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np

from service.app import create_app
from service.settings import Settings


def make_app(bundle: Path, redis_url: str, key_prefix: str, tiny_clip: tuple[str, str], tmp: Path, **extra):
    settings = Settings(
        bundle=bundle,
        redis_url=redis_url,
        key_prefix=key_prefix,
        clip_model=tiny_clip[0],
        clip_pretrained=tiny_clip[1],
        data_dir=tmp,
        **({"max_wait_ms": 1.0} | extra),
    )
    return create_app(settings)


def abo_products(abo_dir: Path) -> list[dict]:
    """The real ABO sample products: id (ASIN folder), text ("name. style. brand."), sorted photo paths."""
    products = []
    for folder in sorted(p for p in abo_dir.iterdir() if p.is_dir()):
        meta = ast.literal_eval((folder / "metadata.txt").read_text(encoding="utf-8"))

        def first(field: str, meta: dict = meta) -> str:
            raw = meta.get(field, "")
            return raw.split("value=", 1)[1].split("}", 1)[0] if "value=" in raw else ""

        text = ". ".join(x for x in (first("model_name") or first("style"), first("color"), first("brand")) if x)
        products.append({"id": folder.name, "text": text + ".", "images": sorted(folder.glob("*.jpg"))})
    return products


def offline_topk(bundle: Path, history_rows: list[int], k: int, exclude: set[int]) -> tuple[list[int], np.ndarray]:
    """The bundle's own brute-force top-k: ONNX user tower + exact fused scores over every item."""
    from serving_core.scoring import ItemScorer
    from serving_core.towers import load_towers

    towers = load_towers(bundle, "cpu")
    u = towers.user.encode([np.asarray(history_rows)])
    scores = ItemScorer(towers.manifest.scorer, towers.table.vectors, towers.table.id_vectors).exact(u)[0]
    scores[0] = -np.inf
    for r in exclude:
        scores[r] = -np.inf
    order = np.lexsort((np.arange(scores.size), -scores))[:k]
    return order.tolist(), scores[order]
