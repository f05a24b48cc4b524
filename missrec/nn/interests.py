"""Interest discovery: mini-batch k-means in plain torch (CPU or GPU) and nearest-centroid assignment.

Memory is bounded by ``batch_size x centroid_chunk`` distances, never points x points or points x all centroids,
so a catalogue of 1M items (2M adapted vectors, K up to 1M) needs no N x N matrix.
"""

from __future__ import annotations

import math

import torch

DEFAULT_CENTROID_CHUNK = 16384


def num_interests(num_vectors: int, ratio: float) -> int:
    """K = ceil(ratio * number of clustered vectors), at least 1 and at most the number of vectors."""
    if num_vectors < 1:
        raise ValueError("need at least one vector to cluster")
    return max(1, min(num_vectors, math.ceil(ratio * num_vectors)))


@torch.no_grad()
def assign_nearest(x: torch.Tensor, centroids: torch.Tensor, chunk: int = DEFAULT_CENTROID_CHUNK) -> torch.Tensor:
    """Index of the nearest centroid (squared Euclidean) for each row of x.

    x: (M, D); centroids: (K, D). Returns (M,) int64. Ties go to the lowest index.
    Works in (M, chunk) blocks; callers pass x in batches to bound memory on the point side too.
    """
    best_dist = torch.full((x.shape[0],), float("inf"), device=x.device, dtype=x.dtype)
    best_idx = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
    x_sq = (x * x).sum(dim=1, keepdim=True)  # (M, 1)
    for start in range(0, centroids.shape[0], chunk):
        c = centroids[start : start + chunk]  # (k, D)
        dist = x_sq - 2.0 * (x @ c.T) + (c * c).sum(dim=1)[None, :]  # (M, k)
        d_min, d_idx = dist.min(dim=1)
        better = d_min < best_dist
        best_dist = torch.where(better, d_min, best_dist)
        best_idx = torch.where(better, d_idx + start, best_idx)
    return best_idx


@torch.no_grad()
def assign_in_batches(
    x: torch.Tensor, centroids: torch.Tensor, batch_size: int = 2048, chunk: int = DEFAULT_CENTROID_CHUNK
) -> torch.Tensor:
    """:func:`assign_nearest` over x in row batches: memory O(batch_size * chunk)."""
    parts = [assign_nearest(x[s : s + batch_size], centroids, chunk) for s in range(0, x.shape[0], batch_size)]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long, device=x.device)


@torch.no_grad()
def minibatch_kmeans(
    x: torch.Tensor,
    k: int,
    *,
    passes: int = 5,
    batch_size: int = 2048,
    generator: torch.Generator | None = None,
    chunk: int = DEFAULT_CENTROID_CHUNK,
) -> torch.Tensor:
    """Mini-batch k-means (Sculley 2010) with random initialisation. x: (M, D) -> centroids (k, D).

    Each centre moves towards the mean of the points it has been assigned so far, with a per-centre learning
    rate 1 / (points seen by that centre), applied per mini-batch. Deterministic for a given generator.
    """
    m = x.shape[0]
    if not 1 <= k <= m:
        raise ValueError(f"k must be in [1, {m}], got {k}")
    device = x.device
    gen_device = generator.device if generator is not None else torch.device("cpu")
    init = torch.randperm(m, generator=generator, device=gen_device)[:k].to(device)
    centroids = x[init].clone()
    counts = torch.zeros(k, dtype=x.dtype, device=device)
    for _ in range(passes):
        order = torch.randperm(m, generator=generator, device=gen_device).to(device)
        for start in range(0, m, batch_size):
            batch = x[order[start : start + batch_size]]  # (b, D)
            nearest = assign_nearest(batch, centroids, chunk)  # (b,)
            n = torch.bincount(nearest, minlength=k).to(x.dtype)  # (k,)
            sums = torch.zeros_like(centroids).index_add_(0, nearest, batch)  # (k, D)
            counts += n
            hit = n > 0
            # c <- (c * seen_before + sum of new points) / seen_now, for centres that received points
            step = (sums[hit] - n[hit, None] * centroids[hit]) / counts[hit, None]
            centroids[hit] += step
    return centroids


# ----- bounded interest discovery for large catalogues ---------------------------------------------------------
LARGE_CLUSTERING = 2**18  # more vectors than this: FAISS k-means on a subsample, capped K, graph assignment
LARGE_MAX_INTERESTS = 4096  # K at most this many on the large path
POINTS_PER_CENTROID = 32  # FAISS trains on at most K * this many sampled vectors


def bounded_work() -> int:
    """(vector, centroid) distances per pass of the bounded path at its largest: K = LARGE_MAX_INTERESTS centroids
    against K * POINTS_PER_CENTROID sampled vectors (2^29 with the defaults)."""
    return LARGE_MAX_INTERESTS * LARGE_MAX_INTERESTS * POINTS_PER_CENTROID


def is_large(num_vectors: int, k: int | None = None) -> bool:
    """True when interest discovery takes the bounded path: more than LARGE_CLUSTERING vectors, or an exact
    mini-batch k-means of ``num_vectors`` into ``k`` centres that would compute more distances per pass than the
    bounded path at its largest (:func:`bounded_work`). With K = ratio x vectors the exact path is quadratic in
    the catalogue; this rule keeps it for small catalogues (two modalities at ratio 0.5: up to ~16k items, the
    real datasets' 1,585 and 4,385 included) and bounds the rest."""
    return num_vectors > LARGE_CLUSTERING or (k is not None and num_vectors * k > bounded_work())


@torch.no_grad()
def faiss_kmeans(x: torch.Tensor, k: int, *, iterations: int = 5, seed: int = 0) -> torch.Tensor:
    """k-means by FAISS over at most ``k * POINTS_PER_CENTROID`` sampled rows of x (M, D) -> centroids (k, D).
    Time and memory bounded by the sample, not by M. Deterministic for a seed (FAISS on one thread set)."""
    import faiss

    points = x.detach().float().cpu().numpy()
    km = faiss.Kmeans(
        points.shape[1], k, niter=iterations, seed=seed, max_points_per_centroid=POINTS_PER_CENTROID, verbose=False
    )
    km.train(points)
    return torch.from_numpy(km.centroids.copy()).to(x.device, x.dtype)


@torch.no_grad()
def assign_approximate(x: torch.Tensor, centroids: torch.Tensor, batch_size: int = 65536) -> torch.Tensor:
    """Nearest centroid of each row of x (M, D) through an HNSW graph over the centroids (approximate: a row may
    land in a near-nearest cluster), in row batches -> (M,) int64. Cost ~ M log K instead of M x K."""
    import faiss

    index = faiss.IndexHNSWFlat(centroids.shape[1], 32)
    index.hnsw.efConstruction = 64
    index.add(centroids.detach().float().cpu().numpy())
    index.hnsw.efSearch = 64
    parts = []
    for start in range(0, x.shape[0], batch_size):
        _, idx = index.search(x[start : start + batch_size].detach().float().cpu().numpy(), 1)
        parts.append(torch.from_numpy(idx[:, 0].astype("int64")))
    return torch.cat(parts).to(x.device) if parts else torch.zeros(0, dtype=torch.long, device=x.device)
