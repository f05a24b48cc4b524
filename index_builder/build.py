"""Build and store the FAISS index over a bundle's static retrieval vectors (inner product; CPU or GPU).

FAISS id = item table row = internal item id. Row 0 (padding) is stored as a zero vector so that ids stay equal
to rows without an id map (appending a cold-start item is a plain ``index.add``); retrieval excludes row 0 always.
Index types are named by index_factory strings ("Flat" = exact, "HNSW32", "IVF1024,Flat", "IVF4096,PQ30x8", ...).
The index is described once, in manifest.index; loading it for serving is serving_core.index.load_index.

    python -m index_builder.build BUNDLE [--factory HNSW32] [--device auto|cpu|gpu] [--param efSearch=128]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from tqdm import tqdm

from serving_core.bundle import (
    INDEX_DIR,
    INDEX_FILE,
    BundleWriter,
    IndexInfo,
    ItemTable,
    Scorer,
    read_item_table,
    read_manifest,
    static_vectors,
    verify_checksums,
)
from serving_core.compact import HALF, SUFFIX, half_path, to_half
from serving_core.index import DEVICES, apply_search_params, default_search_params, to_cpu, to_device
from serving_core.scoring import ItemScorer, measured_max_gap
from serving_core.topk import SearchOptions, is_exact_index, top_k

log = logging.getLogger(__name__)

__all__ = ["DEVICES", "build_from_vectors", "build_index", "index_vectors", "make_index", "recall_report"]


# ----- index construction -----------------------------------------------------------------------------------
def make_index(dim: int, factory: str) -> faiss.Index:
    """An empty inner-product index from an index_factory string."""
    try:
        return faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        raise ValueError(f"invalid FAISS index_factory string {factory!r} for dimension {dim}: {exc}") from None


def index_vectors(static: np.ndarray) -> np.ndarray:
    """(N, D) float32 vectors to index: the static vectors with row 0 (padding) zeroed."""
    x = np.ascontiguousarray(static, dtype=np.float32).copy()
    x[0] = 0.0
    return x


def build_from_vectors(
    x: np.ndarray,
    factory: str = "Flat",
    device: str = "auto",
    *,
    params: Mapping[str, float] | None = None,
    train_size: int = 200_000,
    chunk: int = 100_000,
    seed: int = 0,
    progress: bool | None = None,
) -> tuple[faiss.Index, dict[str, Any]]:
    """Train (on a sample of at most train_size rows >= 1) and fill an index with x (N, D) float32, ids = rows.

    Returns the index on the resolved device (search params applied) and its description.
    """
    n, dim = x.shape
    cpu_form = make_index(dim, factory)
    search = default_search_params(cpu_form) | dict(params or {})  # from the structure: no GPU-to-CPU copy
    index = to_device(cpu_form, device)
    device_used = "gpu" if type(index).__name__.startswith("Gpu") else "cpu"
    t0 = time.perf_counter()
    n_train = 0
    if not index.is_trained:
        rng = np.random.default_rng(seed)
        n_train = min(n - 1, train_size)
        rows = np.sort(rng.choice(np.arange(1, n), size=n_train, replace=False))
        log.info("training %s on %d of %d vectors", factory, n_train, n)
        index.train(np.ascontiguousarray(x[rows]))
    train_s = time.perf_counter() - t0
    with tqdm(total=n, desc=f"add {factory}", unit="vec", disable=None if progress is None else not progress) as bar:
        for start in range(0, n, chunk):
            index.add(np.ascontiguousarray(x[start : start + chunk]))
            bar.update(min(chunk, n - start))
    build_s = time.perf_counter() - t0
    apply_search_params(index, search)
    info = {
        "factory": factory,
        "metric": "inner_product",
        "dim": int(dim),
        "ntotal": int(index.ntotal),
        "exact": is_exact_index(index),
        "params": {k: (int(v) if float(v).is_integer() else float(v)) for k, v in search.items()},
        "train_points": int(n_train),
        "train_seconds": round(train_s, 3),
        "build_seconds": round(build_s, 3),
        "built_on": device_used,
        "faiss": faiss.__version__,
        "ids": "FAISS id = item row; row 0 (padding) is a zero vector, excluded at query time",
    }
    return index, info


# ----- recall report ----------------------------------------------------------------------------------------
def pseudo_queries(static: np.ndarray, n: int, seed: int = 0, noise: float = 0.5) -> np.ndarray:
    """(n, D) unit pseudo-users: normalise(static_i / |static_i| + noise * g / sqrt(D)) for random rows i >= 1."""
    rng = np.random.default_rng(seed)
    rows = rng.integers(1, static.shape[0], size=n)
    base = static[rows] / np.maximum(np.linalg.norm(static[rows], axis=1, keepdims=True), 1e-12)
    q = base + noise * rng.standard_normal(base.shape).astype(np.float32) / np.sqrt(static.shape[1])
    return (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)


def recall_report(
    index: faiss.Index,
    x: np.ndarray,
    queries: np.ndarray,
    items: ItemScorer,
    *,
    ks: tuple[int, ...] = (10, 100),
    fused_k: int = 10,
    max_candidates: int | None = None,
) -> dict[str, Any]:
    """Recall of the index vs exact search, on queries (Q, D).

    static_recall@k: |ANN static top-k ∩ exact static top-k| / k (x (N, D) = the indexed vectors);
    fused_recall@fused_k: |top-k from ANN candidates + exact re-scoring ∩ brute-force top-k| / k.
    """
    kmax = max(ks)
    _, exact_static = faiss.knn(queries, x, kmax, metric=faiss.METRIC_INNER_PRODUCT)
    _, ann_static = index.search(queries, kmax)
    report: dict[str, Any] = {"queries": int(queries.shape[0])}
    for k in ks:
        hits = [np.intersect1d(a[:k], e[:k]).shape[0] for a, e in zip(ann_static, exact_static, strict=True)]
        report[f"static_recall@{k}"] = round(float(np.mean(hits)) / k, 4)
    exact = top_k(queries, fused_k, None, items)
    ann = top_k(queries, fused_k, index, items, options=SearchOptions(exact_index=False, max_candidates=max_candidates))
    hits = [np.intersect1d(ann.row(b)[0], exact.row(b)[0]).shape[0] for b in range(queries.shape[0])]
    report[f"fused_recall@{fused_k}"] = round(float(np.mean(hits)) / fused_k, 4)
    report["mean_candidates"] = round(float(ann.candidates.mean()), 1)
    report["full_scan_fraction"] = round(float((ann.candidates >= x.shape[0]).mean()), 4)
    return report


# ----- bundle I/O ---------------------------------------------------------------------------------------------
def build_index(
    bundle_dir: str | Path,
    factory: str = "Flat",
    device: str = "auto",
    *,
    params: Mapping[str, float] | None = None,
    train_size: int = 200_000,
    user_vectors: np.ndarray | None = None,
    recall_queries: int = 200,
    recall_ks: tuple[int, ...] = (10, 100),
    chunk: int = 100_000,
    seed: int = 0,
    progress: bool | None = None,
    float16: bool = True,
) -> IndexInfo:
    """Build the index of a bundle, write index/index.faiss and re-finalize the manifest with its description.

    float16: also write float16 copies of the item vector tables (items/<name>.f16.npy, with their measured error
    bounds in manifest.rescore_vectors) for the compact re-scoring (serving_core.compact); False removes them.

    Needs only manifest.json and items/ (not the ONNX towers). user_vectors (Q, D): real user vectors for the
    recall report; without them, item-based pseudo-queries (see :func:`pseudo_queries`). Flat needs no report.
    """
    root = Path(bundle_dir)
    manifest = verify_checksums(root, read_manifest(root))
    table = read_item_table(root, manifest, half=False)  # float16 copies are written anew below
    scorer: Scorer = manifest.scorer
    x = index_vectors(static_vectors(scorer, table.vectors, table.id_vectors))
    index, built = build_from_vectors(
        x, factory, device, params=params, train_size=train_size, chunk=chunk, seed=seed, progress=progress
    )
    gap = measured_max_gap(scorer, table.vectors)
    items = ItemScorer(scorer, table.vectors, table.id_vectors, gap)
    details = {k: v for k, v in built.items() if k not in ("factory", "ntotal", "dim", "exact", "params", "metric")}
    loose = ItemScorer(scorer, table.vectors, table.id_vectors)  # max_gap 2: valid for any unit vectors
    details["retrieval"] = {"scorer": scorer.kind, "bound": loose.bound(1.0), "tight_bound": items.bound(1.0)}
    if built["exact"]:
        details["recall_report"] = {"exact": True}
    else:
        if user_vectors is not None:
            queries = np.ascontiguousarray(user_vectors[:recall_queries], dtype=np.float32)
            source = "user vectors"
        else:
            queries = pseudo_queries(x, recall_queries, seed)
            source = "item-based pseudo-queries"
        ks = tuple(k for k in recall_ks if k < x.shape[0]) or (min(recall_ks[0], x.shape[0] - 1),)
        details["recall_report"] = {"source": source, "exact": False} | recall_report(index, x, queries, items, ks=ks)
    info = IndexInfo(
        factory=factory,
        ntotal=built["ntotal"],
        dim=built["dim"],
        exact=built["exact"],
        params=built["params"],
        max_gap=gap,
        details=details,
    )
    (root / INDEX_DIR).mkdir(exist_ok=True)
    tmp = root / (INDEX_FILE + ".tmp")
    faiss.write_index(to_cpu(index), str(tmp))
    os.replace(tmp, root / INDEX_FILE)
    half = write_half(root, table) if float16 else drop_half(root)
    BundleWriter(root).finalize(dataclasses.replace(manifest, index=info, rescore_vectors=half))
    log.info("index %s: %d vectors, %s", factory, info.ntotal, details["recall_report"])
    return info


def write_half(root: Path, table: ItemTable) -> dict[str, dict[str, Any]]:
    """Write float16 copies of the table's vectors (and ID vectors); returns manifest.rescore_vectors for them."""
    described = {}
    for name, arr in table.half_tables().items():
        half, err, norm = to_half(arr)
        target = root / half_path(name)
        tmp = target.with_name(target.name + ".tmp")
        with open(tmp, "wb") as fh:
            np.save(fh, half, allow_pickle=False)
        os.replace(tmp, target)
        described[name] = {"dtype": HALF, "error": err, "max_norm": norm}
        log.info("float16 copy of %s: max row error %.3g (max row norm %.6f)", name, err, norm)
    return described


def drop_half(root: Path) -> dict[str, dict[str, Any]]:
    """Remove float16 copies a previous build wrote; returns the empty manifest.rescore_vectors."""
    for path in (root / "items").glob("*" + SUFFIX):
        path.unlink()
    return {}


def _param(text: str) -> tuple[str, float]:
    name, _, value = text.partition("=")
    return name, float(value)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m index_builder.build", description=__doc__.split("\n")[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--factory", default="Flat", help="FAISS index_factory string (default: exact Flat)")
    parser.add_argument("--device", default="auto", choices=DEVICES)
    parser.add_argument("--param", action="append", type=_param, default=[], help="search param, e.g. efSearch=128")
    parser.add_argument("--train-size", type=int, default=200_000)
    parser.add_argument("--user-vectors", type=Path, help=".npy (Q, D) user vectors for the recall report")
    parser.add_argument("--recall-queries", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-float16", action="store_true", help="no float16 copies for the re-scoring")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    users = np.load(args.user_vectors, allow_pickle=False) if args.user_vectors else None
    info = build_index(
        args.bundle,
        args.factory,
        args.device,
        params=dict(args.param),
        train_size=args.train_size,
        user_vectors=users,
        recall_queries=args.recall_queries,
        seed=args.seed,
        float16=not args.no_float16,
    )
    print(json.dumps(dataclasses.asdict(info), indent=2, sort_keys=True))


if __name__ == "__main__":
    main()
