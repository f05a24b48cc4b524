"""Item scoring for a bundle's scorer: exact scores, the static-score bound and explanations, over item arrays.

:class:`ItemScorer` is what the top-k search needs to know about the items: ``exact`` scores of item rows for
user vectors, ``bound`` (how far the exact score can be from the static score u . static_i that the index ranks
by) and ``explain``. ``missrec_fusion`` delegates to the numpy fusion twin (serving_core.fusion);
``inner_product`` scores are the static scores themselves (bound 0), explained by their named blocks. With float16
copies (``half``), :meth:`ItemScorer.approx` scores from them with a bound on the distance to ``exact``
(serving_core.compact).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from serving_core import compact
from serving_core.bundle import INNER_PRODUCT, ITEM_VECTOR, Scorer
from serving_core.fusion import (
    deviation_bound,
    explanation_weights,
    fusion_weights,
    item_scores,
    max_modality_gap,
    modality_sims,
    score_from_sims,
)
from serving_core.rows import dot_rows


def _dots(users: np.ndarray, table: np.ndarray, rows: np.ndarray | None) -> np.ndarray:
    """users (B, D) . table rows: every row -> (B, N); rows (B, C) -> (B, C)."""
    if rows is None:
        return dot_rows(users, table)
    return compact.row_dots(users, table[rows])


@dataclass(frozen=True)
class ItemScorer:
    """A scorer over item arrays. vectors[name]: (N, D) for name in scorer.vector_names; id_vectors (N, D) for
    transductive MISSRec; max_gap: max_i ||t_i - v_i|| (tightens the fusion bound; 2.0 is always valid);
    half: float16 copies (N, D) of the vectors (and "id_vectors"), half_stats their {"error", "max_norm"} (the
    re-scoring then reads them first, serving_core.compact), or None."""

    scorer: Scorer
    vectors: Mapping[str, np.ndarray]
    id_vectors: np.ndarray | None = None
    max_gap: float = 2.0
    half: Mapping[str, np.ndarray] | None = None
    half_stats: Mapping[str, Mapping[str, float]] | None = None

    @property
    def num_items(self) -> int:
        return int(self.vectors[self.scorer.vector_names[0]].shape[0])

    @property
    def explained_by(self) -> tuple[str, ...]:
        """Names of the explanation weights (modalities, or inner-product blocks); empty: nothing to explain."""
        if self.scorer.kind == INNER_PRODUCT:
            return tuple(b.name for b in self.scorer.blocks)
        return self.scorer.modalities

    def sliced(self, start: int, stop: int) -> ItemScorer:
        """The same scorer over rows [start, stop) (chunked full scans: float32 only, no float16 copies)."""
        ids = None if self.id_vectors is None else self.id_vectors[start:stop]
        return ItemScorer(self.scorer, {m: v[start:stop] for m, v in self.vectors.items()}, ids, self.max_gap)

    def take(self, rows: np.ndarray) -> ItemScorer:
        """The same scorer over the gathered rows ``rows`` (a filtered scan of a subset; float32 only)."""
        ids = None if self.id_vectors is None else self.id_vectors[rows]
        return ItemScorer(self.scorer, {m: v[rows] for m, v in self.vectors.items()}, ids, self.max_gap)

    def reread(self, rows: np.ndarray) -> ItemScorer:
        """The same scorer over the float32 rows ``rows`` (any shape), flattened: read with pread from
        memory-mapped tables (serving_core.compact.read_rows), so the few rows a re-check needs map no pages."""
        ids = None if self.id_vectors is None else compact.read_rows(self.id_vectors, rows.reshape(-1))
        vectors = {m: compact.read_rows(v, rows.reshape(-1)) for m, v in self.vectors.items()}
        return ItemScorer(self.scorer, vectors, ids, self.max_gap)

    def exact(self, users: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
        """Exact float32 scores of users (B, D): against every row (B, N), or rows (B, C) -> (B, C)."""
        if self.scorer.kind == INNER_PRODUCT:
            return _dots(np.asarray(users, np.float32), self.vectors[ITEM_VECTOR], rows).astype(np.float32)
        return item_scores(users, self.vectors, self.scorer.fusion, self.id_vectors, rows)

    def approx(self, users: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Scores (B, C) of rows (B, C) from the float16 copies, and (B,) float64 bounds E on their distance to
        :meth:`exact` (serving_core.compact). Raises ValueError without copies."""
        if self.half is None or self.half_stats is None:
            raise ValueError("no float16 copies of the item vectors")
        u = np.asarray(users, np.float32)
        if self.scorer.kind == INNER_PRODUCT:
            scores = compact.row_dots(u, compact.gather(self.half[ITEM_VECTOR], rows))
        else:
            fusion = self.scorer.fusion
            sims = [compact.row_dots(u, compact.gather(self.half[m], rows)) for m in fusion.modalities]
            id_sim = None
            if fusion.transductive:
                id_sim = compact.row_dots(u, compact.gather(self.half["id_vectors"], rows))
            scores = score_from_sims(sims, fusion, id_sim)
        return scores, np.array([self.approx_bound(float(n)) for n in np.linalg.norm(u, axis=1)])

    def approx_bound(self, user_norm: float) -> float:
        """E: largest |exact - approx| for a user vector of norm ``user_norm`` (serving_core.compact)."""
        if self.half_stats is None:
            raise ValueError("no float16 copies of the item vectors")
        dim = int(self.vectors[self.scorer.vector_names[0]].shape[1])
        if self.scorer.kind == INNER_PRODUCT:
            return compact.score_bound(user_norm, self.half_stats, (ITEM_VECTOR,), dim)
        f = self.scorer.fusion
        return compact.score_bound(user_norm, self.half_stats, f.modalities, dim, f.alpha, f.transductive)

    def bound(self, user_norm: float) -> float:
        """Largest |exact - u . static| for a user vector of norm ``user_norm`` (0 for inner_product)."""
        if self.scorer.kind == INNER_PRODUCT:
            return 0.0
        return deviation_bound(self.scorer.fusion, self.max_gap, user_norm)

    def explain(self, users: np.ndarray, rows: np.ndarray) -> np.ndarray | None:
        """(B, C, M) weights behind the scores of rows (B, C), M = len(explained_by); None when nothing explains.

        missrec_fusion: the dynamic-fusion softmax weights per modality. inner_product: each block's share of the
        score, u_b . x_b / u . x (partial inner products; they sum to 1, and may be negative)."""
        if self.scorer.kind != INNER_PRODUCT:
            return explanation_weights(users, self.vectors, self.scorer.fusion, rows)
        if not self.scorer.blocks:
            return None
        x = self.vectors[ITEM_VECTOR][rows]  # (B, C, D)
        u = np.asarray(users, np.float32)[:, None, :]  # (B, 1, D)
        parts = np.stack(
            [(x[..., b.start : b.stop] * u[..., b.start : b.stop]).sum(-1) for b in self.scorer.blocks], -1
        )
        total = parts.sum(-1, keepdims=True)
        safe = np.where(np.abs(total) < 1e-12, 1.0, total)
        return (parts / safe).astype(np.float32)

    @property
    def split_by(self) -> tuple[str, ...]:
        """Names of the parts a score splits into (:meth:`split`): the modalities, plus "id" for transductive
        MISSRec; an inner_product scorer's blocks. Empty: the score does not split."""
        if self.scorer.kind == INNER_PRODUCT:
            return tuple(b.name for b in self.scorer.blocks)
        return self.scorer.modalities + (("id",) if self.scorer.fusion.transductive else ())

    def split(self, users: np.ndarray, rows: np.ndarray) -> np.ndarray | None:
        """(B, C, P) the additive parts of the exact scores of rows (B, C), P = len(split_by): they sum to
        :meth:`exact` (up to float32 rounding). None when the score does not split.

        missrec_fusion: w_m s_m per modality (the fusion weight times the modality's cosine; times 2/3 in
        transductive mode, where the ID cosine adds u . e_i / 3 as the part "id"). inner_product: the partial inner
        products u_b . x_b of the blocks. Not the fusion weights: a modality with half the weight and a cosine
        near zero carries almost none of the score."""
        u = np.asarray(users, np.float32)
        if self.scorer.kind == INNER_PRODUCT:
            if not self.scorer.blocks:
                return None
            x = self.vectors[ITEM_VECTOR][rows]  # (B, C, D)
            parts = [(x[..., b.start : b.stop] * u[:, None, b.start : b.stop]).sum(-1) for b in self.scorer.blocks]
            return np.stack(parts, -1).astype(np.float32)
        fusion = self.scorer.fusion
        sims = np.stack(modality_sims(u, self.vectors, fusion, rows), axis=-1)  # (B, C, M)
        parts = sims if sims.shape[-1] == 1 else fusion_weights(sims, fusion.alpha) * sims
        if fusion.transductive:
            if self.id_vectors is None:
                raise ValueError("transductive fusion needs id_vectors")
            id_sim = _dots(u, self.id_vectors, rows)[..., None]
            parts = np.concatenate([parts * np.float32(2.0 / 3.0), id_sim / np.float32(3.0)], axis=-1)
        return parts.astype(np.float32)


def measured_max_gap(scorer: Scorer, vectors: Mapping[str, np.ndarray]) -> float:
    """max_i ||t_i - v_i|| for a two-modality missrec_fusion table; 2.0 (unused) otherwise."""
    if scorer.kind == INNER_PRODUCT:
        return 2.0
    return max_modality_gap(vectors, scorer.fusion)
