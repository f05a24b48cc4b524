"""The deployment protocol applied by the shared loop and evaluator: withheld items and history exclusion."""

import numpy as np
import pytest
import torch

from missrec.data.dataset import Interactions
from missrec.evaluation.cold import TrainingData, training_data, withhold_items
from missrec.evaluation.metrics import MISS_RANK, compute_ranks, evaluate, metrics_from_ranks
from missrec.evaluation.report import evaluate_run
from missrec.models.popularity import item_popularity
from missrec.models.sasrec import SASRec, SASRecConfig
from missrec.nn.protocol import banned_items, softmax_loss
from missrec.training.loop import TrainOptions, fit, training_loss
from tests.helpers import tiny_dataset, tiny_missrec


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    return tiny_dataset(tmp_path_factory.mktemp("tiny"))


class FixedScores:
    """Scores every history alike: item i gets scores[i]."""

    training = False

    def __init__(self, scores: list[float]) -> None:
        self.scores = torch.tensor([float("-inf"), *scores])

    def full_scores(self, items: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return self.scores.expand(items.shape[0], -1).clone()


def test_excluding_the_history_changes_the_ranking_by_hand():
    # items 1..5 scored 5 4 3 2 1; user A saw items 1 and 2 and next chose 3; user B saw 4 and chose 4 again
    model = FixedScores([5, 4, 3, 2, 1])
    rows = Interactions.from_lists([0, 1], [[1, 2], [4]], [3, 4], max_len=3)
    ranks = compute_ranks(model, rows)
    assert ranks["history_ranked"].tolist() == [2, 3]
    assert ranks["history_excluded"].tolist() == [0, MISS_RANK]  # B's target is in its history: never served
    served = evaluate(model, rows)["all"]
    assert served["ndcg@10"] == pytest.approx((1.0 + 0.0) / 2)
    ranked = evaluate(model, rows, exclude_history=False)["all"]
    assert ranked["ndcg@10"] == pytest.approx((1 / np.log2(4) + 1 / np.log2(5)) / 2)
    assert served["recall@50"] == 0.5  # a banned target is a miss even when the catalogue is smaller than K


def test_withheld_items_are_not_validation_candidates():
    model = FixedScores([5, 4, 3, 2, 1])  # withheld items 1 and 2 outscore the target 3
    rows = Interactions.from_lists([0], [[5]], [3], max_len=2)
    withheld = np.zeros(6, dtype=bool)
    withheld[[1, 2]] = True
    assert compute_ranks(model, rows)["history_excluded"].tolist() == [2]
    assert compute_ranks(model, rows, banned=banned_items(6, withheld))["history_excluded"].tolist() == [0]


def _feature_grads(model, ds, banned):
    """Gradient of one training step's loss with respect to every item's raw features."""
    feats = {m: torch.from_numpy(ds.features[m]).clone().requires_grad_(True) for m in model.cfg.modalities}
    for m, f in feats.items():
        setattr(model, f"{m}_features", f)
    rows = ds.train
    loss = training_loss(
        model, *(torch.from_numpy(a) for a in (rows.histories, rows.lengths, rows.targets)), len(rows), banned
    )
    loss.backward()
    return {m: f.grad.abs().sum(dim=1) for m, f in feats.items()}


def test_withheld_items_get_no_gradient_and_no_probability(ds):
    split = withhold_items(ds, 0.2, seed=0)
    data = TrainingData(split.train, split.valid, split.cold)
    model = tiny_missrec(ds).eval()  # eval: no dropout, deterministic
    model.discover_interests(data.known, torch.Generator().manual_seed(0))
    cold_ds = type(ds)(**{**ds.__dict__, "train": split.train})
    masked = _feature_grads(model, cold_ds, banned_items(ds.num_items, split.cold))
    for grad in masked.values():
        assert (grad[split.cold] == 0).all()  # no step pushes a withheld item down
        assert (grad[1:][~split.cold[1:]] > 0).any()
    unmasked = _feature_grads(model, cold_ds, banned_items(ds.num_items))  # the old protocol: they are negatives
    assert all((g[split.cold] > 0).all() for g in unmasked.values())


def test_sasrec_withheld_embeddings_never_move(ds):
    split = withhold_items(ds, 0.2, seed=1)
    data = TrainingData(split.train, split.valid, split.cold)
    torch.manual_seed(0)
    model = SASRec(SASRecConfig(num_items=ds.num_items, hidden=32, ff_dim=48, dropout=0.1))
    before = model.item_emb.weight.detach().clone()
    opts = TrainOptions(epochs=2, batch_size=128, progress=False, lr=3e-3)
    fit(model, data.train, data.valid, opts, known_items=data.known)
    after = model.item_emb.weight.detach()
    assert torch.equal(after[split.cold], before[split.cold])
    assert not torch.equal(after[~split.cold], before[~split.cold])


def test_model_without_training_logits_refuses_the_cold_protocol():
    class LossOnly:
        def loss(self, *args, **kwargs):
            return torch.zeros(())

    banned = banned_items(4, np.array([False, True, False, False]))
    with pytest.raises(TypeError, match="cold-item protocol"):
        training_loss(LossOnly(), torch.ones(1, 1), torch.ones(1), torch.ones(1), 1, banned)
    assert training_loss(LossOnly(), torch.ones(1, 1), torch.ones(1), torch.ones(1), 1, None) == 0


def test_cold_split_validation_rows_hold_no_withheld_item(ds):
    split = withhold_items(ds, 0.2, seed=0)
    assert not split.cold[split.valid.histories[split.valid.histories > 0]].any()
    assert not split.cold[split.valid.targets].any()


def test_run_report_has_both_protocols_and_the_cold_views(ds):
    model = tiny_missrec(ds)
    data = training_data(ds, 0.2, seed=0)
    model.discover_interests(data.known, torch.Generator().manual_seed(0))
    metrics, info, ranks = evaluate_run(model, ds, data, TrainOptions(progress=False))
    assert {"valid", "test", "test_history_ranked", "test_cold", "test_warm", "test_few"} <= set(metrics)
    assert info["protocol"] == "history_excluded"
    assert info["test_cold_users"] + info["test_warm_users"] == len(ds.test)
    counts = item_popularity(data.train, ds.num_items)[ds.test.targets]
    few = ~data.withheld[ds.test.targets] & (counts >= 1) & (counts <= 2)
    assert info["test_few_users"] == few.sum()
    repeat = (ds.test.histories == ds.test.targets[:, None]).any(axis=1)
    assert (ranks["history_excluded"][repeat] == MISS_RANK).all()
    assert (ranks["history_excluded"][~repeat] <= ranks["history_ranked"][~repeat]).all()


def test_test_rows_report_one_fixed_sample_of_the_test_rows(ds):
    model = tiny_missrec(ds)
    data = training_data(ds, 0.2, seed=0)
    model.discover_interests(data.known, torch.Generator().manual_seed(0))
    _, full_info, full = evaluate_run(model, ds, data, TrainOptions(progress=False))
    n = len(ds.test) // 3
    opts = TrainOptions(progress=False, test_rows=n, valid_rows=n, seed=7)
    metrics, info, ranks = evaluate_run(model, ds, data, opts)
    assert full_info["test_rows"] == len(ds.test) and info["test_rows"] == n
    assert full_info["valid_rows"] == len(data.valid) and info["valid_rows"] == n  # the rows fit() stopped on
    valid = data.valid.sample(n, 7)
    assert metrics["valid"]["ndcg@10"] == pytest.approx(
        metrics_from_ranks(
            compute_ranks(model, valid, banned=banned_items(ds.num_items, data.withheld))["history_excluded"]
        )["ndcg@10"]
    )
    assert info["test_cold_users"] + info["test_warm_users"] == n and ranks["history_excluded"].shape == (n,)
    rows = np.sort(np.random.default_rng(0).choice(len(ds.test), n, replace=False))  # seed 0 whatever the run's
    for protocol in ("history_excluded", "history_ranked"):
        assert np.array_equal(ranks[protocol], full[protocol][rows])  # the same rows, ranked as in the full run
    assert metrics["test"] == pytest.approx(
        {k: v for k, v in metrics_from_ranks(full["history_excluded"][rows]).items() if k in metrics["test"]}
    )


def test_training_as_served_leaves_history_out_of_the_softmax_but_keeps_a_repeated_target():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0, 0.5], [0.0, 1.0, 2.0, 3.0, 4.0]])
    history = torch.tensor([[1, 3], [4, 0]])
    targets = torch.tensor([2, 4])  # row 1 repeats its history item 4: it stays a learnable target
    loss = softmax_loss(logits, targets, history=history)
    row0 = -torch.log_softmax(torch.tensor([1.0, 0.5]), 0)[0]  # items 2, 4 remain
    row1 = -torch.log_softmax(torch.tensor([1.0, 2.0, 3.0, 4.0]), 0)[3]  # items 1..4 (4 kept as the target)
    assert loss.item() == pytest.approx(((row0 + row1) / 2).item(), rel=1e-6)
    assert softmax_loss(logits, targets).item() > 0


def test_lr_scales_put_matching_parameters_in_their_own_group(ds):
    from missrec.training.loop import param_groups

    model = tiny_missrec(ds)
    params = list(model.parameters())
    groups = param_groups(model, params, TrainOptions(lr=1e-3, lr_scales=(("alpha", 100.0),)))
    assert len(groups) == 2 and groups[1]["params"] == [model.alpha] and groups[1]["lr"] == pytest.approx(0.1)
    assert sum(len(g["params"]) for g in groups) == len(params)
    assert param_groups(model, params, TrainOptions()) == [{"params": params}]
