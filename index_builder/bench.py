"""Benchmark on SYNTHETIC catalogues: exact fused top-k (flat index) vs ANN candidates + exact re-scoring.

Measures, side by side in one run: build time, index memory, single-query and batched latency (p50/p99, after
warm-up queries that are discarded) and recall@10 of the fused top-10 against the exact one.

    python -m index_builder.bench --sizes 100000 1000000 --json bench.json

Data (clearly synthetic, unit-norm per modality, 300-d by default): n/500 clusters whose sizes fall off as
rank^-0.8 (about 100 to 44k items at 1M); each cluster has a shared centre plus a text-specific and an
image-specific direction, so that users who lean towards one modality make the dynamic fusion matter;
items = normalise(centre + modality direction + noise); users = unit vectors near a cluster centre leaning towards
text or image by a random amount. Part (a) of the benchmark (ONNX Runtime vs PyTorch eager user tower) lives with
the towers (index_builder/towers.py, model_export/missrec.py), not here.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from rich.console import Console
from rich.table import Table

from index_builder.build import apply_search_params, build_from_vectors, index_vectors
from serving_core.bundle import MISSREC_FUSION, Scorer
from serving_core.scoring import ItemScorer, measured_max_gap
from serving_core.topk import SearchOptions, TopK, top_k

log = logging.getLogger(__name__)
console = Console(width=None if sys.stdout.isatty() else 200)

DEFAULT_ANN = {  # factory@param=v1,v2,... (nlist about 4 sqrt(N), the usual FAISS guideline)
    100_000: ["HNSW32@efSearch=64,128,256", "IVF1024,Flat@nprobe=8,16,32"],
    1_000_000: ["IVF4096,Flat@nprobe=16,32,64", "HNSW32@efSearch=64,128,256"],
}


@dataclass(frozen=True)
class AnnSpec:
    """One index_factory string and the values of one search parameter to sweep."""

    factory: str
    param: str | None = None
    values: tuple[float, ...] = ()

    @classmethod
    def parse(cls, text: str) -> AnnSpec:
        factory, _, sweep = text.partition("@")
        if not sweep:
            return cls(factory)
        name, _, values = sweep.partition("=")
        return cls(factory, name, tuple(float(v) for v in values.split(",")))

    def settings(self) -> list[dict[str, float]]:
        return [{self.param: v} for v in self.values] if self.param else [{}]


@dataclass
class Catalog:
    """SYNTHETIC items: vectors[m] (N, D) unit rows (row 0 padding), static (N, D) = indexed vectors."""

    vectors: dict[str, np.ndarray]
    static: np.ndarray
    centres: np.ndarray
    text_dir: np.ndarray
    image_dir: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)


def _unit(x: np.ndarray) -> np.ndarray:
    x /= np.linalg.norm(x, axis=-1, keepdims=True)
    return x


def synthetic_catalog(
    n: int,
    dim: int = 300,
    n_clusters: int | None = None,
    seed: int = 0,
    modality_shift: float = 0.6,
    noise: float = 1.0,
) -> Catalog:
    """SYNTHETIC catalogue of n rows (row 0 padding), generated in chunks (float32 throughout)."""
    rng = np.random.default_rng(seed)
    n_clusters = n_clusters or max(8, n // 500)
    centres = _unit(rng.standard_normal((n_clusters, dim), dtype=np.float32))
    text_dir = _unit(rng.standard_normal((n_clusters, dim), dtype=np.float32))
    image_dir = _unit(rng.standard_normal((n_clusters, dim), dtype=np.float32))
    popularity = np.arange(1, n_clusters + 1, dtype=np.float64) ** -0.8  # long-tailed cluster sizes
    cluster = rng.choice(n_clusters, size=n, p=popularity / popularity.sum())
    vectors = {m: np.empty((n, dim), np.float32) for m in ("text", "image")}
    scale = np.float32(noise / np.sqrt(dim))
    for s in range(0, n, 100_000):
        c = cluster[s : s + 100_000]
        item = centres[c] + scale * rng.standard_normal((c.shape[0], dim), dtype=np.float32)
        for m, d in (("text", text_dir), ("image", image_dir)):
            own = scale * np.float32(0.6) * rng.standard_normal((c.shape[0], dim), dtype=np.float32)
            vectors[m][s : s + 100_000] = _unit(item + np.float32(modality_shift) * d[c] + own)
    static = index_vectors((vectors["text"] + vectors["image"]) * np.float32(0.5))
    meta = {"items": n, "dim": dim, "clusters": n_clusters, "seed": seed, "synthetic": True}
    return Catalog(vectors, static, centres, text_dir, image_dir, meta)


def synthetic_users(cat: Catalog, n: int, seed: int = 1, noise: float = 1.0) -> np.ndarray:
    """(n, D) SYNTHETIC unit user vectors near random clusters, leaning towards text or image (lean ~ U(0, 1))."""
    rng = np.random.default_rng(seed)
    dim = cat.centres.shape[1]
    c = rng.integers(0, cat.centres.shape[0], n)
    lean = rng.random((n, 1), dtype=np.float32)
    u = cat.centres[c] + 0.6 * (lean * cat.text_dir[c] + (1 - lean) * cat.image_dir[c])
    u += np.float32(noise / np.sqrt(dim)) * rng.standard_normal((n, dim), dtype=np.float32)
    return _unit(u.astype(np.float32))


def rss_mb() -> float:
    """Current resident set size of this process (Linux), MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _percentiles(seconds: list[float]) -> dict[str, float]:
    ms = np.asarray(seconds) * 1e3
    return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)), "mean_ms": float(ms.mean())}


def time_search(
    search: Callable[[np.ndarray], TopK], users: np.ndarray, single: int, batch: int, warmup: int
) -> tuple[dict[str, Any], TopK]:
    """Latency of search on single queries (first `single` users) and on batches of `batch` over all users.

    The first `warmup` calls of each kind are run and discarded. Returns timings and the batched results.
    """
    for i in range(warmup):
        search(users[i : i + 1])
    lat = []
    for i in range(single):
        t0 = time.perf_counter()
        search(users[i : i + 1])
        lat.append(time.perf_counter() - t0)
    search(users[:batch])  # warm-up batch
    batch_lat, parts = [], []
    for s in range(0, users.shape[0], batch):
        t0 = time.perf_counter()
        parts.append(search(users[s : s + batch]))
        batch_lat.append(time.perf_counter() - t0)
    res = TopK(
        *(
            np.concatenate([getattr(p, f) for p in parts])
            for f in ("ids", "scores", "counts", "candidates", "user_exact")
        )
    )
    b = _percentiles(batch_lat)
    timings = {"single": _percentiles(lat), "batch": b, "batch_per_query_ms": b["mean_ms"] / batch}
    return timings, res


def recall_at(res: TopK, ref: TopK, k: int = 10) -> float:
    hits = [np.intersect1d(res.ids[b, :k], ref.ids[b, :k]).shape[0] / k for b in range(ref.ids.shape[0])]
    return float(np.mean(hits))


def bench_size(n: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every row of the table for one catalogue size (the first row is the exact flat baseline)."""
    t0 = time.perf_counter()
    cat = synthetic_catalog(n, args.dim, seed=args.seed)
    users = synthetic_users(cat, args.queries, seed=args.seed + 1)
    scorer = Scorer(MISSREC_FUSION, ("text", "image"), args.alpha, 0.07)
    gap = measured_max_gap(scorer, cat.vectors)
    items = ItemScorer(scorer, cat.vectors, max_gap=gap)
    console.log(
        f"SYNTHETIC {n:,} x {args.dim}: generated in {time.perf_counter() - t0:.1f}s; alpha {args.alpha}, "
        f"bound {scorer.fusion.bound:.3f}, max |t-v| {gap:.3f} -> tight bound {items.bound(1.0):.3f}"
    )
    rows: list[dict[str, Any]] = []
    specs = [AnnSpec("Flat")] + [AnnSpec.parse(s) for s in (args.ann or DEFAULT_ANN.get(n, DEFAULT_ANN[100_000]))]
    ref = None
    for spec in specs:
        gc.collect()
        before = rss_mb()
        index, info = build_from_vectors(
            cat.static, spec.factory, args.device, train_size=args.train_size, seed=args.seed
        )
        mem = rss_mb() - before
        size = faiss.serialize_index(faiss.index_gpu_to_cpu(index) if info["built_on"] == "gpu" else index).nbytes
        console.log(f"built {spec.factory} in {info['build_seconds']:.1f}s (+{mem:.0f} MiB)")
        for params in spec.settings():
            apply_search_params(index, params)
            exact = spec.factory == "Flat"
            caps = [None] if exact else args.max_candidates

            for cap in caps:
                search = partial(
                    top_k,
                    k=args.k,
                    index=index,
                    items=items,
                    options=SearchOptions(exact_index=exact, max_candidates=cap),
                )
                timings, res = time_search(search, users, args.single, args.batch, args.warmup)
                if ref is None:
                    ref = res
                row = {
                    "items": n,
                    "index": spec.factory,
                    "params": params | ({"max_candidates": cap} if cap else {}),
                    "build_s": info["build_seconds"],
                    "train_points": info["train_points"],
                    "index_mib": round(size / 2**20, 1),
                    "rss_delta_mib": round(mem, 1),
                    **timings,
                    "recall@10": recall_at(res, ref, args.k),
                    "mean_candidates": float(res.candidates.mean()),
                    "proven_exact": float(res.user_exact.mean()),
                    "built_on": info["built_on"],
                }
                rows.append(row)
                console.log(
                    f"{spec.factory} {row['params']}: single p50 {timings['single']['p50_ms']:.2f} ms, "
                    f"p99 {timings['single']['p99_ms']:.2f} ms, recall@10 {row['recall@10']:.4f}"
                )
        index = search = None  # free before the next build
    return rows


def print_table(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    """One table per catalogue size; ratios are relative to the exact flat row of that size."""
    for n in sorted({r["items"] for r in rows}):
        group = [r for r in rows if r["items"] == n]
        base = group[0]
        table = Table(
            title=f"SYNTHETIC catalogue {n:,} items x {args.dim}-d, alpha {args.alpha}, k {args.k}, "
            f"batch {args.batch}, {args.queries} queries ({args.single} single)",
        )
        for col in ("index", "params", "build s", "index MiB", "1-q p50 ms", "1-q p99 ms", "batch ms/q", "batch p99 ms",
                    "recall@10", "cand", "proven", "p50 speed-up", "p99 speed-up"):  # fmt: skip
            table.add_column(col, justify="left" if col in ("index", "params") else "right")
        for r in group:
            params = ", ".join(f"{k}={int(v) if float(v).is_integer() else v}" for k, v in r["params"].items())
            table.add_row(
                r["index"],
                params or "exact",
                f"{r['build_s']:.1f}",
                f"{r['index_mib']:.0f}",
                f"{r['single']['p50_ms']:.2f}",
                f"{r['single']['p99_ms']:.2f}",
                f"{r['batch_per_query_ms']:.2f}",
                f"{r['batch']['p99_ms']:.1f}",
                f"{r['recall@10']:.4f}",
                f"{r['mean_candidates']:.0f}",
                f"{r['proven_exact']:.2f}",
                f"{base['single']['p50_ms'] / r['single']['p50_ms']:.1f}x",
                f"{base['single']['p99_ms'] / r['single']['p99_ms']:.1f}x",
            )
        console.print(table)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m index_builder.bench", description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--dim", type=int, default=300)
    parser.add_argument("--alpha", type=float, default=0.5, help="fusion alpha (bound = tanh|alpha|)")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--queries", type=int, default=256, help="users for recall and batched timing")
    parser.add_argument("--single", type=int, default=100, help="single-query timings (first users)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=5, help="discarded warm-up calls")
    parser.add_argument("--ann", action="append", help="FACTORY[@param=v1,v2,..] (repeatable); default per size")
    parser.add_argument("--max-candidates", type=int, nargs="+", default=[256], help="ANN candidate caps")
    parser.add_argument("--train-size", type=int, default=100_000)
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "gpu"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="write all rows here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    console.log(f"faiss {faiss.__version__}, {faiss.omp_get_max_threads()} threads, device {args.device}")
    rows = [row for n in args.sizes for row in bench_size(n, args)]
    print_table(rows, args)
    if args.json:
        args.json.write_text(
            json.dumps({"synthetic": True, "args": vars(args) | {"json": str(args.json)}, "rows": rows}, indent=2)
        )
        console.log(f"wrote {args.json}")


if __name__ == "__main__":
    main()
