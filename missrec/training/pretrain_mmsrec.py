"""MMSRec's optional item-level multi-view pre-training (seed-towers spec B; the authors' WebVid pre-training is
not available here): each item through the item tower as image only (v), text only (t) and both (vt), each twice
with dropout, and a symmetric in-batch InfoNCE (tau ``pretrain_tau``) over the pairs (v, v'), (v, t), (t, t'),
(vt, vt'). With one modality only its (x, x') pair remains.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from missrec.models.mmsrec import MMSRec
from missrec.training.loop import TrainOptions, deterministic

log = logging.getLogger(__name__)


def symmetric_nce(a: torch.Tensor, b: torch.Tensor, keep: torch.Tensor, tau: float) -> torch.Tensor:
    """Symmetric InfoNCE between paired views a, b (B, D) of the same items, in-batch negatives, mean over the
    rows where ``keep`` (B,) is True (both views exist). -> scalar (0 when no row is kept)."""
    a, b = F.normalize(a[keep], dim=-1), F.normalize(b[keep], dim=-1)
    if a.shape[0] == 0:
        return a.sum()
    logits = a @ b.T / tau  # (K, K)
    labels = torch.arange(a.shape[0], device=a.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2.0


def view(model: MMSRec, tokens: torch.Tensor, valid: torch.Tensor, use: tuple[str, ...]) -> torch.Tensor:
    """Item-tower outputs (B, D) of items with only the modalities in ``use`` visible. tokens (B, M, D)."""
    allowed = torch.tensor([m in use for m in model.cfg.modalities], device=valid.device)
    first = torch.zeros(1, dtype=torch.long, device=tokens.device)
    return model.encode_slots(tokens[:, None], (valid & allowed)[:, None], first).squeeze(1)


def multiview_loss(model: MMSRec, items: torch.Tensor) -> torch.Tensor:
    """The multi-view loss over a batch of item ids (B,)."""
    tokens, valid = model.item_tokens({m: f[items] for m, f in model.features().items()})  # (B, M, D), (B, M)
    tau = model.cfg.pretrain_tau
    has = {m: valid[:, i] for i, m in enumerate(model.cfg.modalities)}
    total = tokens.new_zeros(())
    if "text" in has and "image" in has:
        v, v2 = view(model, tokens, valid, ("image",)), view(model, tokens, valid, ("image",))
        t, t2 = view(model, tokens, valid, ("text",)), view(model, tokens, valid, ("text",))
        both, both2 = view(model, tokens, valid, ("text", "image")), view(model, tokens, valid, ("text", "image"))
        total = total + symmetric_nce(v, v2, has["image"], tau) + symmetric_nce(v, t, has["image"] & has["text"], tau)
        total = total + symmetric_nce(t, t2, has["text"], tau)
        total = total + symmetric_nce(both, both2, has["image"] | has["text"], tau)
    else:
        (only,) = model.cfg.modalities
        x, x2 = view(model, tokens, valid, (only,)), view(model, tokens, valid, (only,))
        total = symmetric_nce(x, x2, has[only], tau)
    return total


def pretrain_items(
    model: MMSRec, items: np.ndarray, opts: TrainOptions, epochs: int, batch_size: int = 256
) -> dict[str, Any]:
    """``epochs`` passes over ``items`` (internal ids; under the cold protocol only warm ones) in shuffled batches,
    with the fine-tuning optimiser settings of ``opts``. No early stopping: the user tower is not trained here, so
    validation ranking would not measure this stage. Deterministic for ``opts.seed``. Returns the loss history."""
    with deterministic():
        device = torch.device(opts.device)
        model.to(device).train()
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=opts.lr, weight_decay=opts.weight_decay)
        rng = np.random.default_rng(opts.seed)
        history, started = [], time.perf_counter()
        for epoch in range(epochs):
            order = rng.permutation(items)
            total = 0.0
            for start in range(0, len(order), batch_size):
                batch = torch.from_numpy(order[start : start + batch_size]).to(device)
                loss = multiview_loss(model, batch)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if opts.grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_(params, opts.grad_clip)
                optimizer.step()
                total += float(loss.detach()) * len(batch)
            history.append({"epoch": epoch, "loss": total / max(len(order), 1)})
            log.info("mmsrec item pre-training epoch %d loss %.4f", epoch, history[-1]["loss"])
        model.eval()
    return {"epochs_run": epochs, "seconds": round(time.perf_counter() - started, 1), "history": history}
