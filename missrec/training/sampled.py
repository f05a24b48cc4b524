"""Sampled softmax for every family: the step scores its in-batch items plus sampled negatives, not the catalogue.

Each optimiser step draws one candidate set for its whole batch: the items the batch predicts (its targets; for a
masked-item model, every item of its rows) plus ``negatives`` items drawn with replacement from the allowed items
(never padding, never a withheld item of the cold protocol), uniformly or from a popularity-mixed distribution
(half uniform, half training popularity). The candidates are de-duplicated; each column's logit is corrected by
the log of its expected number of draws, log Q (Bengio & Senecal 2008; Yi et al., RecSys 2019: in-batch items are
drawn in proportion to their training popularity), which removes the sampling bias of the estimate.

A model joins by one method, ``sampled_logits(items, lengths, targets, candidates)``, that runs its item tower only
over ``candidates`` (C,) and the batch's own items and returns :class:`TrainingLogits` with (P, C) logits and item-id
labels. The full softmax (``negatives=0``) never comes here: it stays the exact, bit-identical default for
catalogues of up to :data:`FULL_SOFTMAX_MAX_ITEMS` items.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from missrec.nn.protocol import TrainingLogits

SAMPLERS: tuple[str, ...] = ("uniform", "mixed")
FULL_SOFTMAX_MAX_ITEMS = 20_000  # up to this many real items the full softmax is the default
DEFAULT_NEGATIVES = 2048  # sampled negatives per step above it
UNIFORM_SHARE = 0.5  # the "mixed" sampler: this share uniform, the rest by training popularity


def resolve_negatives(num_items: int, requested: int | None) -> int:
    """Negatives per step: ``requested`` when given (0 = full softmax), else full softmax for catalogues of up to
    :data:`FULL_SOFTMAX_MAX_ITEMS` real items and :data:`DEFAULT_NEGATIVES` above."""
    if requested is not None:
        if requested < 0:
            raise ValueError(f"negatives must be >= 0 (0 = full softmax), got {requested}")
        return requested
    return 0 if num_items - 1 <= FULL_SOFTMAX_MAX_ITEMS else DEFAULT_NEGATIVES


@dataclass(frozen=True)
class Candidates:
    """The columns of one step: ids (C,) sorted unique item ids, log_q (C,) log expected draws of each."""

    ids: torch.Tensor
    log_q: torch.Tensor


class NegativeSampler:
    """Draws the candidate set of each step.

    allowed (N,) bool: items that may be scored (not padding, not withheld); counts (N,): training popularity
    (how often each item is a label). ``sampler``: "uniform" or "mixed". Deterministic for a given generator.
    """

    def __init__(
        self,
        allowed: np.ndarray,
        counts: np.ndarray,
        negatives: int,
        sampler: str = "mixed",
        generator: torch.Generator | None = None,
    ) -> None:
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
        allowed = np.asarray(allowed, dtype=bool)
        if not allowed.any():
            raise ValueError("no item may be sampled as a negative")
        counts = np.where(allowed, np.asarray(counts, dtype=np.float64), 0.0)
        uniform = allowed / allowed.sum()
        popular = counts / counts.sum() if counts.sum() > 0 else uniform
        share = 1.0 if sampler == "uniform" else UNIFORM_SHARE
        self.p_negative = share * uniform + (1.0 - share) * popular  # (N,), 0 on banned items
        data = np.asarray(counts, dtype=np.float64)
        self.p_label = data / data.sum() if data.sum() > 0 else uniform  # how in-batch items are drawn
        self.cdf = torch.as_tensor(np.cumsum(self.p_negative))
        self.cdf[-1] = 1.0
        self.negatives = negatives
        self.generator = generator
        self._p_negative = torch.as_tensor(self.p_negative)
        self._p_label = torch.as_tensor(self.p_label)

    def draw(self, in_batch: torch.Tensor) -> Candidates:
        """in_batch: the item ids the batch predicts (any shape, 0 = padding ignored) -> the step's candidates."""
        in_batch = in_batch.flatten()
        in_batch = in_batch[in_batch > 0]
        u = torch.rand(self.negatives, generator=self.generator, dtype=torch.float64)
        drawn = torch.searchsorted(self.cdf, u, right=True).clamp(max=len(self.cdf) - 1)
        ids = torch.unique(torch.cat([in_batch.cpu(), drawn]))  # sorted
        expected = len(in_batch) * self._p_label[ids] + self.negatives * self._p_negative[ids]
        return Candidates(ids=ids, log_q=torch.log(expected.clamp(min=1e-30)).float())


def sampled_loss(
    model: object,
    items: torch.Tensor,
    lengths: torch.Tensor,
    targets: torch.Tensor,
    batch_size: int,
    candidates: Candidates,
    banned: torch.Tensor | None,
    exclude_history: bool = False,
    log_prior: torch.Tensor | None = None,
) -> torch.Tensor:
    """The sampled counterpart of :func:`missrec.training.loop.training_loss`: cross-entropy over the step's
    candidates, logits - log Q (+ logit adjustment), banned columns and (``exclude_history``) each row's history
    items, its label excepted, left out. Summed over predictions and divided by ``batch_size``."""
    device = items.device
    ids = candidates.ids.to(device)
    out: TrainingLogits = model.sampled_logits(items, lengths, targets, ids)  # type: ignore[attr-defined]
    labels = torch.searchsorted(ids, out.labels)
    if not bool((ids[labels.clamp(max=len(ids) - 1)] == out.labels).all()):
        raise ValueError("a label is not among the step's candidates (the in-batch items must include them)")
    logits = out.logits - candidates.log_q.to(device)[None, :]
    if log_prior is not None:
        logits = logits + log_prior[ids][None, :]
    if banned is not None:
        logits = logits.masked_fill(banned.to(device)[ids][None, :], float("-inf"))
    else:
        logits = logits.masked_fill((ids == 0)[None, :], float("-inf"))
    if exclude_history:
        history = items if out.rows is None else items[out.rows]  # (P, L)
        pos = torch.searchsorted(ids, history).clamp(max=len(ids) - 1)
        present = (ids[pos] == history) & (history > 0)
        hits = torch.zeros(logits.shape, dtype=torch.int32, device=device)
        mask = hits.scatter_add_(1, pos, present.to(torch.int32)) > 0
        mask.scatter_(1, labels[:, None], False)
        logits = logits.masked_fill(mask, float("-inf"))
    ce = F.cross_entropy(logits, labels, reduction="sum")
    return ce / batch_size + out.regulariser


def make_sampler(
    model: object,
    train_targets: np.ndarray,
    banned: torch.Tensor | None,
    negatives: int | None,
    sampler: str,
    seed: int,
) -> NegativeSampler | None:
    """The sampler of a run, or None for the full softmax (``negatives`` resolved by :func:`resolve_negatives`
    from the model's catalogue size). banned (N,): padding + withheld items, never drawn."""
    num_items = getattr(getattr(model, "cfg", None), "num_items", None)
    if num_items is None:
        if negatives:
            raise TypeError(f"{type(model).__name__} has no cfg.num_items: sampled softmax needs the catalogue size")
        return None
    count = resolve_negatives(num_items, negatives)
    if count == 0:
        return None
    if not hasattr(model, "sampled_logits"):
        raise TypeError(f"{type(model).__name__} has no sampled_logits(): train it with negatives=0 (full softmax)")
    allowed = np.ones(num_items, dtype=bool) if banned is None else ~banned.cpu().numpy()
    allowed[0] = False
    counts = np.bincount(train_targets, minlength=num_items).astype(np.float64)
    return NegativeSampler(allowed, counts, count, sampler, torch.Generator().manual_seed(seed + 7919))


def in_batch_items(model: object, histories: np.ndarray, targets: np.ndarray) -> torch.Tensor:
    """The items a batch predicts: its targets, and every history item for a model whose labels come from the
    whole row (``labels_from_history``, masked-item training)."""
    if getattr(model, "labels_from_history", False):
        return torch.from_numpy(np.concatenate([targets, histories[histories > 0]]))
    return torch.from_numpy(np.asarray(targets))
