"""ID + content hybrids (MISSRec and MSM4SR, transductive with ``id_dropout``): the flag is checked, IDs are dropped
only while training, items withheld by the cold protocol end with no ID, and a hybrid without the flag is the
papers' transductive model (SYNTHETIC data)."""

import pytest
import torch

from missrec.models.missrec import MISSRecConfig
from missrec.models.msm4sr import MSM4SRConfig
from missrec.recipes.missrec import train_missrec
from missrec.recipes.msm4sr import build_msm4sr, train_msm4sr
from missrec.training.loop import TrainOptions
from tests.helpers import tiny_dataset, tiny_missrec

ONE_EPOCH = TrainOptions(epochs=1, batch_size=256, progress=False)


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    return tiny_dataset(tmp_path_factory.mktemp("hybrid"))


@pytest.mark.parametrize("config", [MISSRecConfig, MSM4SRConfig])
def test_id_dropout_is_refused_outside_0_1_and_without_ids(config):
    assert config(num_items=10, mode="transductive", id_dropout=0.5).id_dropout == 0.5
    with pytest.raises(ValueError, match="transductive"):
        config(num_items=10, id_dropout=0.5)  # inductive: no IDs to drop
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match=r"\[0, 1\)"):
            config(num_items=10, mode="transductive", id_dropout=bad)


def test_missrec_drops_ids_only_while_training(ds):
    model = tiny_missrec(ds, mode="transductive", id_dropout=0.5)
    content = sum(a for a in model.adapted().values()).detach()
    with torch.no_grad():
        model.train()
        torch.manual_seed(0)
        tables = model.item_tables()
        dropped = (tables.ids[1:].abs().sum(-1) == 0).float().mean().item()
        assert 0.35 < dropped < 0.65  # about half of the items, this step
        gone = tables.ids.abs().sum(-1) == 0
        torch.testing.assert_close(tables.tokens[gone], content[gone])  # content alone
        model.eval()
        tables = model.item_tables()
        assert (tables.ids[1:].abs().sum(-1) > 0).all()  # serving: every trained item keeps its ID
        torch.testing.assert_close(tables.tokens, content + model.item_id.weight)


def test_msm4sr_drops_ids_only_while_training(ds):
    model = build_msm4sr(ds, "transductive", 0, id_dropout=0.5, adapter_dropout=0.0)  # no adapter noise
    with torch.no_grad():
        content = model.item_tokens(model.features(), torch.zeros(ds.num_items, dtype=torch.long))
        model.train()
        torch.manual_seed(0)
        z = model.item_table()
        same = torch.isclose(z, content, atol=0, rtol=0).flatten(1).all(-1)[1:].float().mean().item()
        assert 0.35 < same < 0.65
        model.eval()
        z = model.item_table()
        assert not torch.isclose(z, content).flatten(1).all(-1)[1:].any()


def test_the_cold_protocol_takes_the_hybrid_and_leaves_withheld_items_without_an_id(ds):
    with pytest.raises(ValueError, match="hybrid"):
        train_missrec(ds, ONE_EPOCH, "transductive", cold_fraction=0.2)
    run = train_missrec(ds, ONE_EPOCH, "transductive", cold_fraction=0.2, config={"id_dropout": 0.3, "hidden": 32})
    withheld = torch.from_numpy(run.cold_items)
    assert withheld[1:].any()
    ids = run.model.item_id.weight.detach()
    assert (ids[withheld] == 0).all() and (ids[1:][~withheld[1:]].abs().sum(-1) > 0).all()
    assert "test_cold" in run.metrics
    with pytest.raises(ValueError, match="hybrid"):
        train_msm4sr(ds, ONE_EPOCH, "transductive", cold_fraction=0.2)
    run = train_msm4sr(ds, ONE_EPOCH, "transductive", cold_fraction=0.2, id_dropout=0.3)
    withheld = torch.from_numpy(run.cold_items)
    assert (run.model.item_id.weight.detach()[withheld] == 0).all()
