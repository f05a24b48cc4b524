"""The one report of every model, after training: valid and test metrics under the served protocol, test under
the other one, and the item groups (few-interaction targets; cold and warm targets under the cold protocol)."""

from __future__ import annotations

from typing import Any

import numpy as np

from missrec.data.dataset import SeqDataset
from missrec.evaluation.cold import TrainingData
from missrec.evaluation.metrics import compute_ranks, metrics_from_ranks, protocol_name
from missrec.models.popularity import item_popularity
from missrec.nn.protocol import banned_items

METRIC_KEYS = ("recall@10", "ndcg@10", "recall@50", "ndcg@50")
FEW_INTERACTIONS = 2  # the few-interaction cold view: targets with 1..2 training interactions


def _metrics_only(m: dict[str, float]) -> dict[str, float]:
    return {k: m[k] for k in METRIC_KEYS}


def evaluate_run(
    model: Any, ds: SeqDataset, data: TrainingData, opts: Any
) -> tuple[dict[str, dict[str, float]], dict[str, Any], dict[str, np.ndarray]]:
    """The same report for every model: (metrics by split, group sizes, test ranks by protocol).

    ``opts``: the run's :class:`~missrec.training.loop.TrainOptions` (exclude_history, eval_batch_size, device).
    valid: the validation rows the model was early-stopped on, withheld items banned from the candidates;
    test: every item ranked (withheld ones included); both under the headline protocol (``opts``), plus
    test under the other protocol. Target groups on test: test_few (a warm target with 1 or 2 interactions
    in the training rows used), and under the cold protocol test_cold (withheld target) / test_warm (the rest).
    """
    headline = protocol_name(opts.exclude_history)
    other = protocol_name(not opts.exclude_history)
    banned = banned_items(ds.num_items, data.withheld) if data.withheld is not None else None
    # valid: the rows fit() early-stopped on (the same sample of --valid-rows); test: one fixed sample of --test-rows
    # (seed 0 whatever the run's seed, so per-user metrics stay paired across models and seeds), else every row
    valid = data.valid.sample(getattr(opts, "valid_rows", 0), opts.seed)
    valid_ranks = compute_ranks(model, valid, opts.eval_batch_size, opts.device, banned)[headline]
    test = ds.test.sample(getattr(opts, "test_rows", 0), 0)
    test_ranks = compute_ranks(model, test, opts.eval_batch_size, opts.device)
    metrics = {
        "valid": metrics_from_ranks(valid_ranks),
        "test": metrics_from_ranks(test_ranks[headline]),
        f"test_{other}": metrics_from_ranks(test_ranks[other]),
    }
    counts = item_popularity(data.train, ds.num_items)[test.targets]
    warm = np.ones(len(test), dtype=bool) if data.withheld is None else ~data.withheld[test.targets]
    groups = {"few": warm & (counts >= 1) & (counts <= FEW_INTERACTIONS)}
    if data.withheld is not None:
        groups |= {"cold": ~warm, "warm": warm}
    info: dict[str, Any] = {"protocol": headline, "valid_rows": len(valid), "test_rows": len(test)}
    for group, mask in groups.items():
        metrics[f"test_{group}"] = metrics_from_ranks(test_ranks[headline][mask])
        info[f"test_{group}_users"] = int(mask.sum())
    return {k: _metrics_only(v) for k, v in metrics.items()}, info, test_ranks
