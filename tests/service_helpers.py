"""Helpers for service tests: the harness's app and the bundle's own brute-force top-k."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from harness.launch import make_app

__all__ = ["make_app", "offline_topk"]


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
