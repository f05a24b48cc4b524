"""Fine-tuning loop shared by every model: full-softmax loss, early stopping on validation NDCG@10.

The loop, not the model, applies the deployment protocol (:mod:`missrec.nn.protocol`): withheld items are masked out
of the training softmax and of the validation candidates, and validation ranks as served (history excluded,
unless ``TrainOptions.exclude_history`` is False). A model supplies ``training_logits`` (full-softmax logits over
all items, their labels and a regulariser: :class:`missrec.nn.protocol.TrainingLogits`) and ``full_scores``; a
model that only has ``loss`` still trains, but not under the cold protocol (the loop could not mask its softmax).

Batches are bucketed: rows are shuffled, then stably sorted by a cost key (history length; for MISSRec the number
of interest tokens), cut into batches, and the batch order is shuffled. Each batch is trimmed to its longest
history (and interest set), so little compute goes to padding.
"""

from __future__ import annotations

import copy
import logging
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from tqdm.auto import tqdm

from missrec.data.batching import chunks_of, epoch_order, row_costs
from missrec.data.dataset import Interactions
from missrec.evaluation.metrics import evaluate
from missrec.models.checkpoint import restore_state
from missrec.nn.protocol import TrainingLogits, banned_items, softmax_loss
from missrec.training.distributed import Ranks
from missrec.training.optim import make_optimizer, sparse_gradients, sparse_tables
from missrec.training.sampled import Candidates, in_batch_items, make_sampler, sampled_loss

log = logging.getLogger(__name__)


class Trainable(Protocol):
    training: bool

    def training_logits(self, items: torch.Tensor, lengths: torch.Tensor, targets: torch.Tensor) -> TrainingLogits:
        """(B, L) ids, (B,) lengths, (B,) next items -> logits over all items, labels, regulariser."""
        ...

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
    # Weight decay: Adam's L2 term (0 = the spec), or AdamW's decoupled decay when decoupled_weight_decay is set.
    # Optimiser details some models' recipes set (MSM4SR: clip 5; MMSRec: AdamW, weight decay 0.01, clip 1).
    weight_decay: float = 0.0
    decoupled_weight_decay: bool = False  # True: AdamW
    grad_clip: float | None = None  # max global gradient norm
    exclude_history: bool = True  # validation (early stopping) as served; False = ranked-history protocol
    train_exclude_history: bool = False  # lever: history items out of the training softmax too; False = paper
    lr_scales: tuple[tuple[str, float], ...] = ()  # lever: (parameter-name prefix, lr multiplier); () = paper
    # lever for feature-based models (missrec.training.levers): none (paper), center, standardize
    feature_norm: str = "none"
    # Lever: logit adjustment (Menon et al., ICLR 2021): train on logits + logit_adjust * log(prior), the prior
    # being each item's training popularity (Laplace-smoothed), and serve the plain logits. Popular items need
    # less score to win while training, so the model stops pushing rare items down. 0 = the paper's loss.
    logit_adjust: float = 0.0
    # Sampled softmax (missrec.training.sampled): negatives per step, None = from the catalogue size (full softmax,
    # exact, up to FULL_SOFTMAX_MAX_ITEMS items), 0 = full softmax; sampler "uniform" or "mixed" (with popularity).
    negatives: int | None = None
    sampler: str = "mixed"
    valid_rows: int = 0  # early stopping on this many validation rows (a fixed seeded sample); 0 = all
    # Mixed precision of the training forward passes (torch.autocast): "none" (float32, the papers) or "bf16"
    # (bfloat16 matrix products where autocast allows; weights, optimiser and validation stay float32).
    autocast: str = "none"
    # Sampled softmax only: lazy sparse updates of the ID tables a model lists (missrec.training.optim); False =
    # dense Adam on every row every step.
    sparse_ids: bool = True
    test_rows: int = 0  # the final test metrics on this many test rows (one fixed sample, seed 0); 0 = all


@dataclass
class FitResult:
    best_epoch: int
    best_valid: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


EpochCallback = Callable[[int, dict[str, float]], None]


def param_groups(model: torch.nn.Module, params: list[torch.nn.Parameter], opts: TrainOptions) -> list[dict]:
    """Adam parameter groups: ``params`` at ``opts.lr``, those whose name starts with a prefix in
    ``opts.lr_scales`` at lr * multiplier (e.g. ("alpha", 100.0): the fusion scalar learns 100x faster)."""
    if not opts.lr_scales:
        return [{"params": params}]
    chosen = {id(p) for p in params}
    scaled: dict[float, list[torch.nn.Parameter]] = {}
    rest = []
    for name, p in model.named_parameters():
        if id(p) not in chosen:
            continue
        scale = next((m for prefix, m in opts.lr_scales if name.startswith(prefix)), None)
        (scaled.setdefault(scale, []) if scale is not None else rest).append(p)
    unmatched = [
        prefix for prefix, _ in opts.lr_scales if not any(n.startswith(prefix) for n, _ in model.named_parameters())
    ]
    if unmatched:  # a compare trains several models: a prefix may belong to only some of them
        log.warning("lr_scales prefixes match no parameter of %s: %s", type(model).__name__, unmatched)
    return [{"params": rest}] + [{"params": ps, "lr": opts.lr * m} for m, ps in scaled.items()]


def training_loss(
    model: Any,
    items: torch.Tensor,
    lengths: torch.Tensor,
    targets: torch.Tensor,
    batch_size: int,
    banned: torch.Tensor | None,
    exclude_history: bool = False,
    log_prior: torch.Tensor | None = None,
    candidates: Candidates | None = None,
) -> torch.Tensor:
    """Loss of one chunk: full softmax with the ``banned`` (N,) columns (padding, withheld items) left out
    (and each row's history items, target excepted, when ``exclude_history``); ``log_prior`` (N,): added to every
    row's logits (logit adjustment, already scaled), None = none. ``candidates``: the step's sampled softmax
    (:mod:`missrec.training.sampled`); None = the full softmax."""
    if candidates is not None:
        return sampled_loss(model, items, lengths, targets, batch_size, candidates, banned, exclude_history, log_prior)
    if hasattr(model, "training_logits"):
        out: TrainingLogits = model.training_logits(items, lengths, targets)
        history = None
        if exclude_history:
            history = items if out.rows is None else items[out.rows]
        logits = out.logits if log_prior is None else out.logits + log_prior[None, :]
        return softmax_loss(logits, out.labels, batch_size, banned, history) + out.regulariser
    withheld = banned is not None and bool(banned[1:].any())
    # A loss that scores only the items of its own batch (in-batch negatives) never meets a withheld item: the
    # cold protocol already removed them from the training rows.
    if exclude_history or log_prior is not None or (withheld and not getattr(model, "scores_batch_items_only", False)):
        raise TypeError(
            f"{type(model).__name__} has no training_logits(): the loop cannot mask withheld items out of its "
            "softmax, so it cannot be trained under the cold-item protocol (or with train_exclude_history or "
            "logit_adjust)"
        )
    return model.loss(items, lengths, targets, batch_size=batch_size)


def training_log_prior(model: Any, train: Interactions, scale: float, device: torch.device) -> torch.Tensor | None:
    """scale * log of each item's training popularity (counts + 1, normalised; (N,) over the model's catalogue)
    for the logit-adjustment lever; None when scale is 0."""
    if not scale:
        return None
    num_items = getattr(getattr(model, "cfg", None), "num_items", None)
    if num_items is None:
        raise TypeError(f"{type(model).__name__} has no cfg.num_items: logit_adjust needs the catalogue size")
    from missrec.models.popularity import item_popularity

    counts = item_popularity(train, num_items) + 1.0
    return (scale * torch.log(torch.as_tensor(counts / counts.sum(), dtype=torch.float32))).to(device)


AUTOCAST = {"none": None, "bf16": torch.bfloat16}


def forward_precision(opts: TrainOptions, device: torch.device) -> Any:
    """The autocast context of one training forward pass (``opts.autocast``); refuses an unknown value."""
    if opts.autocast not in AUTOCAST:
        raise ValueError(f"autocast must be one of {', '.join(AUTOCAST)}, not {opts.autocast!r}")
    dtype = AUTOCAST[opts.autocast]
    return torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)


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
    on_epoch_end: EpochCallback | None = None,
) -> FitResult:
    """Train ``model`` (a :class:`Trainable`) in place; on return it holds the weights of the best epoch.
    Deterministic for a given seed (see :func:`deterministic`).

    known_items: (N,) bool, the items that exist at training time (cold-item protocol: every other real item is
    withheld: masked out of the softmax and the validation candidates, and kept out of the interest clusters);
    None = all. parameters: what to optimise (default: everything that requires grad).
    on_epoch_end(epoch, validation metrics): called after each epoch (tuning reports and prunes there).
    """
    with deterministic():
        return _fit(model, train, valid, opts, known_items, parameters, name, on_epoch_end)


def _fit(
    model: torch.nn.Module,
    train: Interactions,
    valid: Interactions,
    opts: TrainOptions,
    known_items: torch.Tensor | None,
    parameters: list[torch.nn.Parameter] | None,
    name: str,
    on_epoch_end: EpochCallback | None,
) -> FitResult:
    device = torch.device(opts.device)
    forward_precision(opts, device)  # an unknown autocast value is refused before any work
    model.to(device)
    params = parameters if parameters is not None else [p for p in model.parameters() if p.requires_grad]
    groups = param_groups(model, params, opts)
    # Columns no step may score: padding + withheld items (None: padding only, handled by the loss).
    banned = None if known_items is None else banned_items(len(known_items), ~known_items.cpu().numpy()).to(device)
    log_prior = training_log_prior(model, train, opts.logit_adjust, device)
    sampler = make_sampler(model, train.targets, banned, opts.negatives, opts.sampler, opts.seed)
    valid = valid.sample(opts.valid_rows, opts.seed)  # bounded validation at a large catalogue (evaluate_run too)
    rng = np.random.default_rng(opts.seed)
    generator = torch.Generator(device="cpu").manual_seed(opts.seed)
    ranks = Ranks.of(model, training_loss, opts.seed)  # None: one process (torchrun: missrec.training.distributed)
    tables = sparse_tables(model, opts, sampler is not None, ranks is not None)
    optimizer = make_optimizer(params, groups, opts, tables)
    result = FitResult(best_epoch=-1, best_valid={})
    best_state: dict[str, torch.Tensor] | None = None
    best_ndcg = -1.0
    stale = 0
    started = time.perf_counter()
    with sparse_gradients(tables):  # restored for what follows (export, evaluation)
        bar = tqdm(range(opts.epochs), desc=f"train {name}", disable=not opts.progress, leave=False)
        for epoch in bar:
            model.train()
            model.on_epoch_start(known_items, generator)
            if ranks is not None:
                ranks.sync_buffers(model)
            total, count = 0.0, 0
            keys = row_costs(model, train)
            order = epoch_order(keys, opts.batch_size, rng, opts.bucket_by_length)
            for start in range(0, len(order), opts.batch_size):
                batch = order[start : start + opts.batch_size]
                if ranks is not None and len(batch) < ranks.world:
                    continue  # a rank's shard would be empty (every rank skips the same batch)
                # Exact gradient accumulation over cost-bounded chunks: a long-tailed batch is not padded to its
                # longest row. The chunk losses sum to the batch loss (see the models' ``loss``).
                optimizer.zero_grad(set_to_none=True)
                batch_loss = 0.0
                cands = (
                    None
                    if sampler is None
                    else sampler.draw(in_batch_items(model, train.histories[batch], train.targets[batch]))
                )
                parts = list(chunks_of(train, batch if ranks is None else ranks.shard(batch), keys, opts.chunk_tokens))
                for i, (_, items, lengths, targets) in enumerate(parts):
                    args = (items.to(device), lengths.to(device), targets.to(device), len(batch), banned)
                    args += (opts.train_exclude_history, log_prior, cands)
                    if ranks is None:
                        with forward_precision(opts, device):
                            loss = training_loss(model, *args)
                        loss.backward()
                    else:  # DDP averages the ranks' gradients: x world = the whole batch's gradient
                        with ranks.step_context(last=i == len(parts) - 1):
                            with forward_precision(opts, device):
                                loss = ranks.ddp(*args)
                            (loss * ranks.world).backward()
                    batch_loss += float(loss.detach())
                if opts.grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_(params, opts.grad_clip)
                optimizer.step()
                total += batch_loss * len(batch)
                count += len(batch)

            def metrics_of(rows: Interactions) -> dict[str, float]:
                return evaluate(
                    model, rows, opts.eval_batch_size, opts.device, banned=banned, exclude_history=opts.exclude_history
                )["all"]

            valid_metrics = metrics_of(valid) if ranks is None else ranks.agree(metrics_of, valid)
            if ranks is not None:
                total = ranks.sum(total)
            ndcg = valid_metrics["ndcg@10"]
            result.history.append({"epoch": epoch, "loss": total / max(count, 1), **valid_metrics})
            bar.set_postfix(loss=f"{total / max(count, 1):.4f}", ndcg10=f"{ndcg:.4f}")
            if on_epoch_end is not None:
                on_epoch_end(epoch, valid_metrics)
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
