"""Multi-domain contrastive pre-training (spec section 6): seq->item and seq->augmented-seq InfoNCE + diversity.

loss = CE(seq -> item, in-batch) + lambda * CE(seq -> augmented seq, in-batch) + gamma * (R + R_aug).
Augmentation, per sequence: with probability 0.9 drop items (keep each with probability 0.8, always keep the
first, compact left); otherwise replace the text features of ~20% of positions with word-dropped text features
(when the dataset ships them as ``<Name>.feat1CLS.worddrop``; without them item drop is used).
Dropping works on item ids, so the text and image features of every kept position always belong to the same
item (the authors' code forgets to re-index the image side).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from missrec.data.batching import epoch_order, iter_batches
from missrec.data.dataset import Interactions, SeqDataset
from missrec.models.missrec import MISSRec, MISSRecConfig, interest_diversity, lengths_to_padding
from missrec.nn.fusion import fuse_sims
from missrec.training.loop import deterministic

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PretrainOptions:
    epochs: int = 20
    batch_size: int = 512
    lr: float = 1e-3
    lam: float = 1e-3
    gamma: float = 1e-4
    interest_ratio: float = 0.02
    drop_prob: float = 0.9
    keep_prob: float = 0.8
    worddrop_fraction: float = 0.2
    seed: int = 0
    device: str = "cpu"
    progress: bool = True


@dataclass(frozen=True)
class MergedDomains:
    """Several datasets as one item table: features (N, width) per modality, train rows with offset ids."""

    features: dict[str, np.ndarray]
    worddrop_text: np.ndarray | None
    train: Interactions
    offsets: dict[str, int]


def merge_domains(datasets: list[SeqDataset]) -> MergedDomains:
    """Concatenate item tables (row 0 padding; a modality missing in one domain is zero there)."""
    widths: dict[str, int] = {}
    for ds in datasets:
        for m, feat in ds.features.items():
            if widths.setdefault(m, feat.shape[1]) != feat.shape[1]:
                raise ValueError(f"{m} features are {feat.shape[1]}-d in {ds.name} but {widths[m]}-d elsewhere")
    if not widths:
        raise ValueError("pre-training needs item features in at least one domain")
    total = 1 + sum(ds.num_items - 1 for ds in datasets)
    features = {m: np.zeros((total, w), dtype=np.float32) for m, w in widths.items()}
    has_worddrop = "text" in widths and all("text_worddrop" in ds.extra for ds in datasets)
    worddrop = np.zeros((total, widths["text"]), dtype=np.float32) if has_worddrop else None
    offsets: dict[str, int] = {}
    parts: list[Interactions] = []
    start = 0
    for ds in datasets:
        offsets[ds.name] = start
        rows = slice(start + 1, start + ds.num_items)
        for m, feat in ds.features.items():
            features[m][rows] = feat[1:]
        if worddrop is not None:
            worddrop[rows] = np.asarray(ds.extra["text_worddrop"])[1:]
        hist = np.where(ds.train.histories > 0, ds.train.histories + start, 0)
        parts.append(Interactions(ds.train.users, hist, ds.train.lengths, ds.train.targets + start))
        start += ds.num_items - 1
    train = Interactions(
        *(np.concatenate([getattr(p, f) for p in parts]) for f in ("users", "histories", "lengths", "targets"))
    )
    return MergedDomains(features, worddrop, train, offsets)


def drop_items(
    items: torch.Tensor, lengths: torch.Tensor, keep_prob: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep each real item with probability keep_prob (the first always), compact left. (B, L) -> (B, L), (B,)."""
    real = ~lengths_to_padding(lengths, items.shape[1])
    keep = (torch.rand(items.shape, generator=generator) < keep_prob).to(items.device) & real
    keep[:, 0] = True
    order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices  # kept positions first, in order
    dropped = torch.where(keep, items, torch.zeros_like(items)).gather(1, order)
    return dropped, keep.sum(dim=1)


class Pretrainer:
    """Holds the model and the merged item table; one call to :meth:`step` per batch."""

    def __init__(self, model: MISSRec, merged: MergedDomains, opts: PretrainOptions) -> None:
        self.model, self.merged, self.opts = model, merged, opts
        self.worddrop = (
            torch.from_numpy(merged.worddrop_text).to(opts.device) if merged.worddrop_text is not None else None
        )

    def _in_batch_item_logits(self, u: torch.Tensor, targets: torch.Tensor, tables) -> torch.Tensor:
        sims = [u @ tables.normed[m][targets].T for m in self.model.cfg.modalities]  # each (B, B)
        s = fuse_sims(sims, self.model.alpha)
        same = targets[:, None] == targets[None, :]
        same.fill_diagonal_(False)  # the same item as another row's target is not a negative
        return (s / self.model.cfg.tau).masked_fill(same, float("-inf"))

    def _augmented_tokens(self, items, lengths, tables, generator):
        """Tokens, lengths and item ids of the augmented sequences (B, L, D), (B,), (B, L)."""
        b = items.shape[0]
        use_drop = torch.rand(b, generator=generator) < self.opts.drop_prob
        if self.worddrop is None:
            use_drop[:] = True
        dropped, dropped_len = drop_items(items, lengths, self.opts.keep_prob, generator)
        use_drop = use_drop.to(items.device)
        aug_items = torch.where(use_drop[:, None], dropped, items)
        aug_len = torch.where(use_drop, dropped_len, lengths)
        tokens = tables.tokens[aug_items]
        if self.worddrop is not None:
            adapter = self.model.adapters["text"]
            pick = (torch.rand(items.shape, generator=generator) < self.opts.worddrop_fraction).to(items.device)
            pick &= ~use_drop[:, None]
            delta = adapter(self.worddrop[aug_items]) - adapter(self.model.text_features[aug_items])
            tokens = tokens + delta * pick[..., None]
        return tokens, aug_len, aug_items

    def step(self, items, lengths, targets, generator) -> torch.Tensor:
        model, opts = self.model, self.opts
        tables = model.item_tables()
        u, xi, interest_pad = model.encode(items, lengths, tables)
        tokens, aug_len, aug_items = self._augmented_tokens(items, lengths, tables, generator)
        ids = model.interest_ids(aug_items)
        u_aug, xi_aug = model.user_tower(tokens, aug_len, model.centroids[ids], (ids > 0).sum(1).clamp(min=1))
        labels = torch.arange(items.shape[0], device=items.device)
        seq_item = F.cross_entropy(self._in_batch_item_logits(u, targets, tables), labels)
        seq_seq = F.cross_entropy(u @ u_aug.T / model.cfg.tau, labels)
        slots = model.interest_slots
        reg = interest_diversity(xi, interest_pad, slots) + interest_diversity(xi_aug, ids == 0, slots)
        return seq_item + opts.lam * seq_seq + opts.gamma * reg


def pretrain(datasets: list[SeqDataset], opts: PretrainOptions) -> tuple[MISSRec, list[dict[str, float]]]:
    """Pre-train an inductive MISSRec on the union of the datasets' training sequences (deterministic)."""
    with deterministic():
        return _pretrain(datasets, opts)


def _pretrain(datasets: list[SeqDataset], opts: PretrainOptions) -> tuple[MISSRec, list[dict[str, float]]]:
    merged = merge_domains(datasets)
    torch.manual_seed(opts.seed)
    n_items = merged.train.histories.max() + 1
    cfg = MISSRecConfig(
        num_items=int(max(n_items, next(iter(merged.features.values())).shape[0])),
        text_dim=merged.features["text"].shape[1] if "text" in merged.features else 0,
        image_dim=merged.features["image"].shape[1] if "image" in merged.features else 0,
        mode="inductive",
        interest_ratio=opts.interest_ratio,
    )
    model = MISSRec(cfg).to(opts.device)
    model.set_item_features({m: torch.from_numpy(f) for m, f in merged.features.items()})
    trainer = Pretrainer(model, merged, opts)
    optimizer = torch.optim.Adam(model.parameters(), lr=opts.lr)
    rng = np.random.default_rng(opts.seed)
    generator = torch.Generator().manual_seed(opts.seed)
    history: list[dict[str, float]] = []
    bar = tqdm(range(opts.epochs), desc="pretrain", disable=not opts.progress, leave=False)
    for epoch in bar:
        model.train()
        model.discover_interests(None, generator)
        total, count = 0.0, 0
        order = epoch_order(merged.train.lengths, opts.batch_size, rng, bucket=True)
        for _, items, lengths, targets in iter_batches(merged.train, opts.batch_size, order):
            loss = trainer.step(items.to(opts.device), lengths.to(opts.device), targets.to(opts.device), generator)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(targets)
            count += len(targets)
        history.append({"epoch": epoch, "loss": total / max(count, 1)})
        bar.set_postfix(loss=f"{total / max(count, 1):.4f}")
        log.info("pretrain epoch %d loss %.4f", epoch, total / max(count, 1))
    model.eval()
    return model, history
