"""The fine-tuning optimiser, and lazy sparse updates of an ID table under the sampled softmax.

Under the sampled softmax a step touches a few thousand rows of an N-row item-ID table, but a dense embedding
gradient is an (N, D) tensor and Adam updates all N rows every step: SASRec's "backward + step" grew with the
catalogue (20.4 s per epoch at 10k items, 422.6 s at 1M; docs/benchmarks.md). A model that lists such tables in
``sparse_embeddings()`` gets sparse gradients for them and ``torch.optim.SparseAdam`` (lazy Adam: only the rows a
step touches move, their moments too) while every other parameter keeps Adam. Used only where it is exact to the
rest of the run's options: sampled softmax on, one process, no weight decay, no gradient clipping, no per-prefix
learning rates (SparseAdam has none of these); otherwise the dense optimiser runs, as before.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

log = logging.getLogger(__name__)


class SplitAdam:
    """Adam over the dense parameters and SparseAdam over the sparse tables, stepped together."""

    def __init__(self, dense: list[torch.nn.Parameter], sparse: list[torch.nn.Parameter], lr: float) -> None:
        self.parts: list[torch.optim.Optimizer] = [torch.optim.SparseAdam(sparse, lr=lr)]
        if dense:
            self.parts.insert(0, torch.optim.Adam(dense, lr=lr))

    def zero_grad(self, set_to_none: bool = True) -> None:
        for part in self.parts:
            part.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        for part in self.parts:
            part.step()


def sparse_tables(model: Any, opts: Any, sampled: bool, distributed: bool) -> list[torch.nn.Embedding]:
    """The model's ID tables that train with sparse gradients in this run ([] = the dense optimiser)."""
    tables = list(getattr(model, "sparse_embeddings", lambda: [])())
    if not tables or not sampled or not opts.sparse_ids:
        return []
    refused = {
        "several processes": distributed,
        "weight decay": bool(opts.weight_decay),
        "gradient clipping": opts.grad_clip is not None,
        "per-prefix learning rates": bool(opts.lr_scales),
    }
    reasons = [name for name, on in refused.items() if on]
    if reasons:
        log.info("%s: dense ID-table updates (sparse ones do not support %s)", type(model).__name__, reasons)
        return []
    return tables


def make_optimizer(params: list[torch.nn.Parameter], groups: list[dict], opts: Any, tables: list) -> Any:
    """Adam/AdamW over ``groups`` (the dense run), or :class:`SplitAdam` when ``tables`` train sparsely."""
    chosen = {id(p) for p in params}
    sparse = [t.weight for t in tables if id(t.weight) in chosen]
    if not sparse:
        cls = torch.optim.AdamW if opts.decoupled_weight_decay else torch.optim.Adam
        return cls(groups, lr=opts.lr, weight_decay=opts.weight_decay)
    sparse_ids = {id(w) for w in sparse}
    return SplitAdam([p for p in params if id(p) not in sparse_ids], sparse, opts.lr)


@contextmanager
def sparse_gradients(tables: list[torch.nn.Embedding]) -> Iterator[None]:
    """Lookups in ``tables`` give sparse gradients while training; restored afterwards (export, evaluation)."""
    previous = [t.sparse for t in tables]
    for t in tables:
        t.sparse = True
    try:
        yield
    finally:
        for t, was in zip(tables, previous, strict=True):
            t.sparse = was
