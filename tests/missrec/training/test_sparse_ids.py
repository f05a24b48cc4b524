"""Sparse ID-table updates under the sampled softmax (missrec.training.optim): only the rows a step touches move."""

import logging

import pytest
import torch

from missrec.evaluation.cold import withhold_items
from missrec.models.sasrec import SASRec, SASRecConfig
from missrec.training.loop import TrainOptions, fit
from missrec.training.optim import SplitAdam, make_optimizer, sparse_tables
from tests.helpers import tiny_dataset


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    return tiny_dataset(tmp_path_factory.mktemp("tiny"))


def _sasrec(ds):
    torch.manual_seed(0)
    return SASRec(SASRecConfig(num_items=ds.num_items, hidden=16, ff_dim=32, dropout=0.0))


def _opts(**kw):
    return TrainOptions(**({"epochs": 2, "batch_size": 64, "patience": 2, "progress": False, "negatives": 8} | kw))


def test_sampled_sasrec_trains_its_id_table_sparsely_and_learns(ds):
    model = _sasrec(ds)
    (table,) = sparse_tables(model, _opts(), sampled=True, distributed=False)
    params = list(model.parameters())
    optimizer = make_optimizer(params, [{"params": params}], _opts(), [table])
    assert isinstance(optimizer, SplitAdam)
    assert isinstance(optimizer.parts[-1], torch.optim.SparseAdam) and optimizer.parts[-1].param_groups[0][
        "params"
    ] == [table.weight]
    result = fit(model, ds.train, ds.valid, _opts(epochs=4, patience=4, lr=3e-3))
    losses = [h["loss"] for h in result.history]
    assert losses[-1] < losses[0]
    assert not model.item_emb.sparse  # restored after training (export and evaluation see a plain table)


def test_withheld_rows_never_move_under_sparse_updates_and_do_under_dense_adam(ds):
    # the cold protocol: withheld items are in no training row and never drawn, so no step touches their rows:
    # they keep their initial vectors under both optimisers; the touched rows differ (lazy vs dense moments),
    # which shows the option reaches the loop
    split = withhold_items(ds, 0.3, seed=1)
    known = torch.from_numpy(split.known)
    cold = torch.from_numpy(split.cold).nonzero().flatten()
    trained = {}
    for sparse in (True, False):
        model = _sasrec(ds)
        before = model.item_emb.weight.detach().clone()
        fit(model, split.train, split.valid, _opts(lr=3e-2, sparse_ids=sparse), known_items=known)
        after = model.item_emb.weight.detach()
        assert torch.equal(after[cold], before[cold])  # untouched rows: equal under both
        assert not torch.equal(after, before)
        trained[sparse] = after.clone()
    # the two optimisers are different algorithms (lazy vs dense moments): the touched rows differ
    assert not torch.equal(trained[True], trained[False])


def test_dense_updates_where_sparse_ones_cannot_be_exact(ds, caplog):
    model = _sasrec(ds)
    assert sparse_tables(model, _opts(), sampled=False, distributed=False) == []  # full softmax: as before
    assert sparse_tables(model, _opts(sparse_ids=False), sampled=True, distributed=False) == []
    assert sparse_tables(model, _opts(), sampled=True, distributed=True) == []
    with caplog.at_level(logging.INFO, logger="missrec.training.optim"):
        assert sparse_tables(model, _opts(weight_decay=0.01), sampled=True, distributed=False) == []
        assert sparse_tables(model, _opts(grad_clip=1.0), sampled=True, distributed=False) == []
    assert any("weight decay" in r.getMessage() for r in caplog.records)
    params = list(model.parameters())
    assert isinstance(make_optimizer(params, [{"params": params}], _opts(), []), torch.optim.Adam)
