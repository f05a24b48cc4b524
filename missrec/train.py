"""Fine-tuning loop shared by MISSRec and SASRec: full-softmax loss, early stopping on validation NDCG@10.

Batches are bucketed: rows are shuffled, then stably sorted by a cost key (history length; for MISSRec the number
of interest tokens), cut into batches, and the batch order is shuffled. Each batch is trimmed to its longest
history (and interest set), so little compute goes to padding.
"""

from __future__ import annotations

import copy
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from tqdm.auto import tqdm

from missrec.batching import chunks_of, epoch_order, row_costs
from missrec.data import Interactions
from missrec.evaluate import evaluate

log = logging.getLogger(__name__)


class Trainable(Protocol):
    training: bool

    def loss(
        self, items: torch.Tensor, lengths: torch.Tensor, targets: torch.Tensor, batch_size: int | None = None
    ) -> torch.Tensor: ...

    def full_scores(self, items: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor: ...

    def on_epoch_start(self, known_items: torch.Tensor | None, generator: torch.Generator) -> None: ...


@dataclass(frozen=True)
class TrainOptions:
    """Run options for fine-tuning (spec section 6 defaults)."""

    epochs: int = 300
    batch_size: int = 512
    lr: float = 1e-3
    patience: int = 10
    eval_batch_size: int = 1024
    seed: int = 0
    device: str = "cpu"
    bucket_by_length: bool = True
    chunk_tokens: int = 8192
    progress: bool = True
    # Optimiser details some models' recipes set (MSM4SR: clip 5; MMSRec: AdamW, weight decay 0.01, clip 1).
    weight_decay: float = 0.0
    decoupled_weight_decay: bool = False  # True: AdamW
    grad_clip: float | None = None  # max global gradient norm


@dataclass
class FitResult:
    best_epoch: int
    best_valid: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@contextmanager
def deterministic() -> Iterator[None]:
    """Deterministic kernels while training (index_put accumulation order otherwise varies run to run)."""
    previous, previous_warn = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # required by cuBLAS in deterministic mode
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous, warn_only=previous_warn)


def fit(
    model: torch.nn.Module,
    train: Interactions,
    valid: Interactions,
    opts: TrainOptions,
    known_items: torch.Tensor | None = None,
    parameters: list[torch.nn.Parameter] | None = None,
    name: str = "model",
) -> FitResult:
    """Train ``model`` (a :class:`Trainable`) in place; on return it holds the weights of the best epoch.
    Deterministic for a given seed (see :func:`deterministic`).

    known_items: (N,) bool, items allowed to shape interest clusters (cold-item protocol); None = all.
    parameters: what to optimise (default: everything that requires grad).
    """
    with deterministic():
        return _fit(model, train, valid, opts, known_items, parameters, name)


def _fit(
    model: torch.nn.Module,
    train: Interactions,
    valid: Interactions,
    opts: TrainOptions,
    known_items: torch.Tensor | None,
    parameters: list[torch.nn.Parameter] | None,
    name: str,
) -> FitResult:
    device = torch.device(opts.device)
    model.to(device)
    params = parameters if parameters is not None else [p for p in model.parameters() if p.requires_grad]
    optimizer: torch.optim.Optimizer
    if opts.decoupled_weight_decay:
        optimizer = torch.optim.AdamW(params, lr=opts.lr, weight_decay=opts.weight_decay)
    else:
        optimizer = torch.optim.Adam(params, lr=opts.lr, weight_decay=opts.weight_decay)
    rng = np.random.default_rng(opts.seed)
    generator = torch.Generator(device="cpu").manual_seed(opts.seed)
    result = FitResult(best_epoch=-1, best_valid={})
    best_state: dict[str, torch.Tensor] | None = None
    best_ndcg = -1.0
    stale = 0
    started = time.perf_counter()
    bar = tqdm(range(opts.epochs), desc=f"train {name}", disable=not opts.progress, leave=False)
    for epoch in bar:
        model.train()
        model.on_epoch_start(known_items, generator)
        total, count = 0.0, 0
        keys = row_costs(model, train)
        order = epoch_order(keys, opts.batch_size, rng, opts.bucket_by_length)
        for start in range(0, len(order), opts.batch_size):
            batch = order[start : start + opts.batch_size]
            # Exact gradient accumulation over cost-bounded chunks: a long-tailed batch is not padded to its
            # longest row. The chunk losses sum to the batch loss (see the models' ``loss``).
            optimizer.zero_grad(set_to_none=True)
            batch_loss = 0.0
            for _, items, lengths, targets in chunks_of(train, batch, keys, opts.chunk_tokens):
                loss = model.loss(items.to(device), lengths.to(device), targets.to(device), batch_size=len(batch))
                loss.backward()
                batch_loss += float(loss.detach())
            if opts.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(params, opts.grad_clip)
            optimizer.step()
            total += batch_loss * len(batch)
            count += len(batch)
        valid_metrics = evaluate(model, valid, opts.eval_batch_size, opts.device)["all"]
        ndcg = valid_metrics["ndcg@10"]
        result.history.append({"epoch": epoch, "loss": total / max(count, 1), **valid_metrics})
        bar.set_postfix(loss=f"{total / max(count, 1):.4f}", ndcg10=f"{ndcg:.4f}")
        log.info("%s epoch %d loss %.4f valid ndcg@10 %.4f", name, epoch, total / max(count, 1), ndcg)
        if ndcg > best_ndcg:
            best_ndcg, stale = ndcg, 0
            result.best_epoch, result.best_valid = epoch, valid_metrics
            best_state = copy.deepcopy(model.state_dict())
        else:
            stale += 1
            if stale >= opts.patience:
                log.info("%s: early stop at epoch %d (best %d)", name, epoch, result.best_epoch)
                break
    bar.close()
    if best_state is not None:
        restore_state(model, best_state)
    model.eval()
    result.seconds = time.perf_counter() - started
    return result


def restore_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """load_state_dict that also accepts buffers whose shape changed (interest centroids, cluster tables)."""
    own = dict(model.named_buffers())
    for key, value in state.items():
        if key in own and own[key].shape != value.shape:
            module_name, _, buffer_name = key.rpartition(".")
            module = model.get_submodule(module_name) if module_name else model
            setattr(module, buffer_name, torch.empty_like(value))
    model.load_state_dict(state)
