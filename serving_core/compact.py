"""Compact re-scoring: float16 copies of the item vectors, a rigorous error bound, float32 only where it decides.

The exact re-scoring of the top-k search (serving_core.topk) gathers ~1,000 random candidate rows per query; from
float32 tables of 1M x 300 that keeps 2.4 GB of mapped pages resident. A bundle may carry float16 copies
(``items/<name>.f16.npy``, written by ``missrec build-index``; the manifest's ``rescore_vectors`` records, per table,
e = max_i ||x_i - float16(x_i)||_2 and the largest row norm n = max_i ||x_i||, both measured in float64). The search
then scores the candidates from the copies, bounds how far each approximate score can be from the float32 one, and
re-scores in float32 only the candidates whose interval can reach the k-th place: the returned ids and scores are
exactly those of the float32 path.

The bound E (per user vector u, on |s32 - s16|, where s32 is the score the float32 path computes and s16 the one
computed here from the float16 rows; u_32 = 2^-24 is float32's unit roundoff):

1. One modality cosine. With h_i = float16(x_i) (converted to float32 exactly), ||x_i - h_i|| <= e:
   |u . x_i - u . h_i| <= ||u|| e. A float32 dot product of length D (any summation order, FMA or not) is within
   gamma_D ||u|| ||y|| of the real one, gamma_D = D u_32 / (1 - D u_32). Both dots are rounded, ||h_i|| <= n + e:
       delta = ||u|| (e + gamma_D (2 n + e)).
2. Two modalities, the MISSRec fusion s = m + g(d), m = (s_t + s_v)/2, d = s_t - s_v, g(d) = (d/2) tanh(alpha d/2).
   With y = alpha d / 2: g'(d) = (tanh y + y sech^2 y) / 2, whatever alpha (a negative alpha flips y and d together).
   tanh y + y sech^2 y = d/dy (y tanh y) peaks where y tanh y = 1 (y* = 1.19968), with the value y* itself, so
   |g'| <= L = 0.59984 < 0.6. Cosine errors delta_t, delta_v move m by at most (delta_t + delta_v)/2 and d by at
   most delta_t + delta_v:
       |s32 - s16| <= (1/2 + L)(delta_t + delta_v) + 2 phi <= 1.1 (delta_t + delta_v) + 2 phi,
   where phi bounds the float32 rounding of the fusion arithmetic itself (both scores go through the same float32
   code, serving_core.fusion.fuse_pair: a sum, a difference, two products, tanh, a sum). With S = ||u|| (n + e)
   >= |s_m|, each step adds at most a few u_32 S (tanh's argument error is amplified by |alpha|, its own error is
   a few ulps):
       phi = 32 u_32 (1 + S) (1 + |alpha| S)    (a generous count of the roundings).
3. Transductive: score = (u . e_i + 2 s) / 3: E = (delta_id + 2 E_fused) / 3 + 2 phi (the division and sum rounded).
4. One modality (s = s_t) and inner_product bundles (s = u . x_i): E = delta.

The selection (:func:`rescore`): per user, over the valid candidates (not dead, not excluded, no repeats),
L_k = the k-th largest of a_i - E, a_i the float16 score. A candidate with a_i + E < L_k has s32_i < L_k <= the
float32 score of each of the k candidates whose lower bound is at least L_k (they are re-checked: their upper
bound is >= their lower bound >= L_k), so it is strictly below the k-th float32 score: it can neither enter the
top-k nor tie with its last entry. It is given -inf, every other valid candidate its float32 score. The top-k
search then sees the float32 ranking of the candidates, and its widening proof (an item outside the candidates is
below the k-th exact score) is unchanged. Comparisons are made in float64 (a_i exact, E rounded up by 1e-9).
Fewer than k valid candidates: all are re-checked. Full scans (catalogues below EXACT_SCAN_BELOW rows, a widening
that reaches its full-scan width, filtered scans of a subset) stay float32.

The re-checked float32 rows are read with pread from the file of a memory-mapped table (:func:`read_rows`), not
through the mapping: a page fault maps the page cache's neighbours of the faulted page too (the kernel's
fault-around, ~64 KB), so a few rows touched per query would leave most of the float32 pages mapped after a while.

Float32 re-checks compute each row's dot product with np.einsum, whose result for a row does not depend on the
other rows gathered with it (a BLAS gemv's does, by an ulp, with the row's position): so the float16 path returns
bit-identical scores to the float32 path, which uses the same kernel (serving_core.fusion).
"""

from __future__ import annotations

import math
import mmap
import os
import threading
from collections.abc import Mapping
from typing import Any

import numpy as np

from serving_core.rows import RowStack

U32 = 2.0**-24  # float32 unit roundoff
FUSION_LIPSCHITZ = 0.6  # > sup |g'(d)| = y*/2 = 0.59984 (y* tanh y* = 1)
HALF = "float16"
SUFFIX = ".f16.npy"  # items/<name>.f16.npy, <name> a vector name or "id_vectors"
_CHUNK = 65536
# The ONNX graph y = Cast<float>(x), x float16 (n, d): ONNX Runtime converts with the CPU's F16C instructions, ~8x
# faster than numpy here (0.04 against 0.3-0.5 ms for 1,024 x 300 values); exact (every float16 is a float32).
_CAST_GRAPH = bytes.fromhex(
    "080712003a530a170a01781201792204436173742a090a02746f1801a00102120a6631365f746f5f6633325a150a017812100a0e080a120a"
    "0a0312016e0a0312016462150a017912100a0e0801120a0a0312016e0a0312016442040a00100d"
)
_cast: list[Any] = []
_cast_lock = threading.Lock()


def half_path(name: str) -> str:
    """The bundle file of the float16 copy of ``name`` (a vector name, or "id_vectors")."""
    return f"items/{name}{SUFFIX}"


def to_half(x: np.ndarray, chunk: int = _CHUNK) -> tuple[np.ndarray, float, float]:
    """float16 copy of the (N, D) float32 rows x, e = max_i ||x_i - h_i|| and n = max_i ||x_i|| (float64)."""
    out = np.empty(x.shape, dtype=np.float16)
    err = norm = 0.0
    for start in range(0, x.shape[0], chunk):
        rows = np.asarray(x[start : start + chunk], dtype=np.float32)
        if not np.isfinite(rows).all() or np.abs(rows).max(initial=0.0) >= 65504:
            raise ValueError("rows out of float16 range: no float16 copy")
        half = rows.astype(np.float16)
        out[start : start + chunk] = half
        wide = rows.astype(np.float64)
        diff = wide - half.astype(np.float64)
        err = max(err, float(np.sqrt((diff * diff).sum(1)).max(initial=0.0)))
        norm = max(norm, float(np.sqrt((wide * wide).sum(1)).max(initial=0.0)))
    return out, err, norm


def widened(stats: Mapping[str, float], rows: np.ndarray) -> dict[str, float]:
    """``stats`` ({"error", "max_norm"}) covering the float16 copies of the new float32 ``rows`` too."""
    _, err, norm = to_half(rows)
    return {"error": max(stats["error"], err), "max_norm": max(stats["max_norm"], norm)}


def to_float32(half: np.ndarray) -> np.ndarray:
    """float16 (..., D) -> the same values in float32 (ONNX Runtime's Cast, one thread; numpy without it)."""
    if not _cast:
        with _cast_lock:
            if not _cast:
                try:
                    import onnxruntime as ort

                    so = ort.SessionOptions()
                    so.intra_op_num_threads = so.inter_op_num_threads = 1
                    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
                    _cast.append(ort.InferenceSession(_CAST_GRAPH, so, providers=["CPUExecutionProvider"]))
                except ImportError:
                    _cast.append(None)
    if _cast[0] is None or half.size == 0:
        return half.astype(np.float32)
    flat = np.ascontiguousarray(half).reshape(-1, half.shape[-1])
    return _cast[0].run(None, {"x": flat})[0].reshape(half.shape)


def gather(table: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """float32 values of the float16 rows ``rows`` (any int array) of ``table``: rows.shape + (D,)."""
    return to_float32(np.asarray(table[rows]))


def _file_offset(table: np.ndarray) -> int | None:
    """Byte offset in its file of row 0 of a C-contiguous read-only memory-mapped array, else None."""
    mapped = getattr(table, "_mmap", None)
    if not isinstance(table, np.memmap) or table.filename is None or not isinstance(mapped, mmap.mmap):
        return None
    if not table.flags.c_contiguous or table.ndim != 2:
        return None
    start = np.frombuffer(mapped, dtype=np.uint8).ctypes.data
    return int(table.ctypes.data - start) + table.offset - table.offset % mmap.ALLOCATIONGRANULARITY


def read_rows(table: np.ndarray | RowStack, rows: np.ndarray) -> np.ndarray:
    """table[rows] (rows: any int array, values in range): from a memory-mapped table read with pread (the process
    maps none of its pages), from a :class:`RowStack` part by part, else a plain gather."""
    if isinstance(table, RowStack):
        flat = np.asarray(rows).reshape(-1)
        out = np.empty((flat.shape[0], table.shape[1]), dtype=table.dtype)
        low = flat < table.base_rows
        out[low] = read_rows(table.base, flat[low])
        out[~low] = table.added[flat[~low] - table.base_rows]
        return out.reshape((*np.shape(rows), table.shape[1]))
    offset = _file_offset(table)
    if offset is None:
        return table[rows]
    width = table.shape[1] * table.dtype.itemsize
    flat = np.asarray(rows).reshape(-1)
    out = np.empty((flat.shape[0], table.shape[1]), dtype=table.dtype)
    fd = os.open(table.filename, os.O_RDONLY)
    try:
        for i, r in enumerate(flat.tolist()):
            if os.preadv(fd, [memoryview(out[i]).cast("B")], offset + r * width) != width:
                raise OSError(f"{table.filename}: short read of row {r}")
    finally:
        os.close(fd)
    return out.reshape((*np.shape(rows), table.shape[1]))


def row_dots(users: np.ndarray, gathered: np.ndarray) -> np.ndarray:
    """users (B, D) . gathered (B, C, D) -> (B, C) float32, each row independent of the others (np.einsum)."""
    return np.einsum("bcd,bd->bc", gathered, np.asarray(users, np.float32))


def dot_bound(user_norm: float, stats: Mapping[str, float], dim: int) -> float:
    """delta: bound on |float32 u . x - float32 u . float16(x)| (step 1 of the module docstring)."""
    gamma = dim * U32 / (1.0 - dim * U32)
    e, n = stats["error"], stats["max_norm"]
    return user_norm * (e + gamma * (2.0 * n + e))


def fusion_slack(user_norm: float, stats: Mapping[str, float], alpha: float) -> float:
    """phi: the float32 rounding of the fusion arithmetic (step 2 of the module docstring)."""
    s = user_norm * (stats["max_norm"] + stats["error"])
    return 32.0 * U32 * (1.0 + s) * (1.0 + abs(alpha) * s)


def score_bound(
    user_norm: float,
    stats: Mapping[str, Mapping[str, float]],
    modalities: tuple[str, ...],
    dim: int,
    alpha: float = 0.0,
    transductive: bool = False,
) -> float:
    """E (module docstring) for one user norm. ``stats[name]``: the copy's {"error", "max_norm"}; modalities: the
    fused ones (one or two), or ("item",) for an inner_product bundle (then alpha and transductive are unused)."""
    deltas = [dot_bound(user_norm, stats[m], dim) for m in modalities]
    phi = max(fusion_slack(user_norm, stats[m], alpha) for m in modalities)
    if len(modalities) == 2:
        bound = (0.5 + FUSION_LIPSCHITZ) * sum(deltas) + 2.0 * phi
    elif len(modalities) == 1:
        bound = deltas[0]
    else:
        raise ValueError(f"one or two modalities, got {modalities}")
    if transductive:
        delta_id = dot_bound(user_norm, stats["id_vectors"], dim)
        bound = (delta_id + 2.0 * bound) / 3.0 + 2.0 * phi
    return math.nextafter(bound, math.inf) + 1e-9


def rescore(items, users: np.ndarray, cand: np.ndarray, valid: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Scores (G, C) float32 of the candidates cand (G, C) (valid rows only; no repeats among the valid ones) for
    users (G, D): the float32 score of every valid candidate that can reach the k-th place, -inf for the others and
    for the invalid ones; and (G,) how many were re-checked in float32 per user. ``items``: an ItemScorer
    (serving_core.scoring) with float16 copies (module docstring)."""
    approx, bound = items.approx(users, cand)  # (G, C) float32, (G,) float64
    a = approx.astype(np.float64)
    e = bound[:, None]
    lower = np.where(valid, a - e, -np.inf)
    width = cand.shape[1]
    kk = min(k, width)
    kth = np.partition(lower, width - kk, axis=1)[:, width - kk]  # the k-th largest lower bound (-inf: < k valid)
    need = valid & (a + e >= kth[:, None])
    counts = need.sum(1)
    out = np.full(cand.shape, -np.inf, dtype=np.float32)
    top = int(counts.max(initial=0))
    if top:
        order = np.argsort(~need, axis=1, kind="stable")[:, :top]  # the needed ones first, in place order
        picked = np.take_along_axis(cand, order, 1)
        exact = items.reread(picked).exact(users, np.arange(picked.size).reshape(picked.shape))
        keep = np.arange(top)[None, :] < counts[:, None]
        g = np.broadcast_to(np.arange(cand.shape[0])[:, None], order.shape)
        out[g[keep], order[keep]] = exact[keep]
    return out, counts
