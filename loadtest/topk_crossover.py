"""Where a plain exact scan of every row beats the bounded search (serving_core.topk), per catalogue size.

    OMP_NUM_THREADS=1 python -m loadtest.topk_crossover [--bundle runs/scientific-bundle] [--sizes 1585 16384]
        [--batches 1 16] [--repeats 200]

For each size and batch, the same users' top-10 (history-sized exclusions) is computed by the bounded search over
an exact flat index (``one_pass``, what the service used at every size before) and by the exact scan, alternately,
one thread; it prints the median ms per call of each and their ratio, checks both return the same items, and says
where the scan stops winning (the service's default, ``serving_core.topk.EXACT_SCAN_BELOW``, comes from this
table). Catalogues are SYNTHETIC (clustered two-modality unit vectors, D=300, the trained fusion's alpha and tau),
except that ``--bundle`` adds the bundle's real item table as its own row.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np

from index_builder.build import index_vectors
from serving_core.bundle import MISSREC_FUSION, Scorer, read_bundle, static_vectors
from serving_core.scoring import ItemScorer
from serving_core.topk import SearchOptions, top_k


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def synthetic(n: int, d: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """SYNTHETIC: n items in n/40 clusters, a text and an image direction per cluster."""
    clusters = max(2, n // 40)
    centers, text_dir, image_dir = (_unit(rng.standard_normal((clusters, d))) for _ in range(3))
    c = rng.integers(0, clusters, n)
    base = centers[c] + 0.8 * rng.standard_normal((n, d)) / np.sqrt(d)
    noise = lambda: 0.5 * rng.standard_normal((n, d)) / np.sqrt(d)  # noqa: E731
    return {"text": _unit(base + 0.8 * text_dir[c] + noise()), "image": _unit(base + 0.8 * image_dir[c] + noise())}


def _median_ms(call: dict[str, Any], repeats: int) -> float:
    """Median wall ms of ``top_k(**call)``."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        top_k(**call)
        times.append(time.perf_counter() - started)
    return 1000 * float(np.median(times))


def measure(name: str, scorer: Scorer, vectors: dict[str, np.ndarray], batches: list[int], repeats: int, rng):
    import faiss

    n = next(iter(vectors.values())).shape[0]
    items = ItemScorer(scorer, vectors)
    static = static_vectors(scorer, vectors, None)
    index = faiss.IndexFlatIP(static.shape[1])
    index.add(index_vectors(static))
    rows = []
    for b in batches:
        users = _unit(vectors["text"][rng.integers(1, n, b)] + vectors["image"][rng.integers(1, n, b)])
        exclude = [set(rng.integers(1, n, 5).tolist()) for _ in range(b)]  # a short history, excluded as served
        base = {"user_vectors": users, "k": 10, "index": index, "items": items, "exclude": exclude}
        search = base | {"options": SearchOptions(exact_scan_below=0)}
        scan = base | {"options": SearchOptions(exact_scan_below=n + 1)}
        a, c = top_k(**search), top_k(**scan)
        same = bool((a.ids == c.ids).all()) or bool(np.allclose(a.scores, c.scores, atol=1e-5))
        t_search, t_scan = [], []
        for _ in range(3):  # alternate, so a change of the host's speed hits both
            t_search.append(_median_ms(search, repeats // 3 + 1))
            t_scan.append(_median_ms(scan, repeats // 3 + 1))
        rows.append((name, n, b, float(np.median(t_search)), float(np.median(t_scan)), same))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, default=None, help="add the bundle's real item table")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1585, 4096, 8192, 16384, 32768, 65536])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--repeats", type=int, default=150)
    parser.add_argument("--alpha", type=float, default=0.16, help="fusion alpha of the SYNTHETIC rows")
    parser.add_argument("--dim", type=int, default=300)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    rows = []
    if args.bundle is not None:
        bundle = read_bundle(args.bundle)
        s = bundle.manifest.scorer
        if s.kind == MISSREC_FUSION and set(s.modalities) == {"text", "image"}:
            rows += measure(
                f"real {bundle.manifest.version}", s, dict(bundle.table.vectors), args.batches, args.repeats, rng
            )
    scorer = Scorer(MISSREC_FUSION, ("text", "image"), args.alpha, 0.07, False)
    for n in args.sizes:
        rows += measure("SYNTHETIC", scorer, synthetic(n, args.dim, rng), args.batches, args.repeats, rng)
    print("catalogue | items | batch | bounded search ms | exact scan ms | search / scan | same top-10")
    print("---|---|---|---|---|---|---")
    for name, n, b, ts, tc, same in rows:
        print(f"{name} | {n} | {b} | {ts:.3f} | {tc:.3f} | {ts / tc:.2f}x | {'yes' if same else 'NO'}")
    for b in args.batches:
        wins = [n for name, n, bb, ts, tc, _ in rows if bb == b and name == "SYNTHETIC" and tc < ts]
        print(f"batch {b}: the exact scan is faster up to {max(wins) if wins else 'no size'} items (SYNTHETIC rows)")


if __name__ == "__main__":
    main()
