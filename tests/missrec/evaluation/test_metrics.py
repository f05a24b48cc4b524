"""Full-ranking metrics against hand-computed cases."""

import math

import numpy as np
import pytest
import torch

from missrec.evaluation.metrics import metrics_from_ranks, target_ranks


def test_ranks_count_higher_scores_and_ties_against_the_target():
    scores = torch.tensor(
        [
            [float("-inf"), 0.9, 0.5, 0.1, 0.7],  # target 2: items 1 and 4 are higher -> rank 2
            [float("-inf"), 0.2, 0.2, 0.2, 0.1],  # target 1 tied with 2 and 3 -> pessimistic rank 2
            [float("-inf"), 0.0, 0.0, 0.0, 1.0],  # target 4 is the best -> rank 0
        ]
    )
    ranks = target_ranks(scores, torch.tensor([2, 1, 4]))
    assert ranks.tolist() == [2, 2, 0]


def test_padding_column_never_outranks_a_target():
    scores = torch.tensor([[float("-inf"), -5.0, -6.0]])
    assert target_ranks(scores, torch.tensor([2])).tolist() == [1]


def test_recall_and_ndcg_by_hand():
    ranks = np.array([0, 3, 9, 10, 49, 60])
    m = metrics_from_ranks(ranks, ks=(10, 50))
    # recall@10: ranks 0, 3, 9 hit -> 3/6 ; recall@50: 0, 3, 9, 10, 49 -> 5/6
    assert m["recall@10"] == pytest.approx(3 / 6)
    assert m["recall@50"] == pytest.approx(5 / 6)
    # ndcg@K = mean over rows of 1/log2(rank + 2) when rank < K else 0
    n10 = (1 / math.log2(2) + 1 / math.log2(5) + 1 / math.log2(11)) / 6
    n50 = n10 + (1 / math.log2(12) + 1 / math.log2(51)) / 6
    assert m["ndcg@10"] == pytest.approx(n10)
    assert m["ndcg@50"] == pytest.approx(n50)


def test_perfect_and_hopeless_rankings():
    assert metrics_from_ranks(np.zeros(4))["ndcg@10"] == pytest.approx(1.0)
    hopeless = metrics_from_ranks(np.full(4, 1000))
    assert hopeless["recall@50"] == 0.0 and hopeless["ndcg@50"] == 0.0
