"""Hidden-data readiness: ID-only, text-only, image-only data, odd feature widths, long histories (SYNTHETIC)."""

import json

import pytest
from typer.testing import CliRunner

from missrec.data.dataset import load_dataset
from missrec.recipes.compare import run_compare
from missrec.recipes.missrec import train_missrec
from missrec.recipes.tuned import TunedConfig
from missrec.training.loop import TrainOptions
from missrec.training.run import MissingFeatures
from missrec_cli.main import app
from tests.helpers import tiny_dataset

ONE_EPOCH = TrainOptions(epochs=1, batch_size=128, progress=False)
SMALL = {"hidden": 32, "ff_dim": 48}
runner = CliRunner()


@pytest.fixture(scope="module")
def id_only(tmp_path_factory):
    root = tmp_path_factory.mktemp("id-only")
    tiny_dataset(root, modalities=("text",), num_users=120, num_items=50, num_topics=4)
    (root / "Synthetic.feat1CLS").unlink()
    return root


@pytest.mark.parametrize("mode", ["inductive", "transductive"])
def test_missrec_refuses_id_only_data_clearly(id_only, mode):
    ds = load_dataset(id_only)
    with pytest.raises(MissingFeatures, match="needs item features"):
        train_missrec(ds, ONE_EPOCH, mode)
    result = runner.invoke(app, ["train", "--data", str(id_only), "--out", "/tmp/x", "--mode", mode])
    assert result.exit_code == 2 and "needs item features" in result.output


def test_compare_runs_what_can_run_on_id_only_data(id_only, tmp_path):
    out = tmp_path / "cmp.json"
    result = runner.invoke(app, ["compare", "--data", str(id_only), "--out", str(out), "--epochs", "1"])
    assert result.exit_code == 0, result.output
    assert "skipped missrec_inductive" in result.output
    compared = json.loads(out.read_text())
    assert set(compared["summary"]) == {"sasrec", "popularity"}
    assert set(compared["skipped"]) == {
        "missrec_inductive",
        "missrec_transductive",
        "missrec_inductive_cold",
        "msm4sr_inductive",
        "msm4sr_inductive_cold",
        "mmsrec",
        "mmsrec_cold",
    }  # every feature model, the seed towers included


@pytest.mark.parametrize("modality", ["text", "image"])
def test_one_modality_data_trains_every_model(tmp_path, modality):
    ds = tiny_dataset(tmp_path, modalities=(modality,), num_users=120, num_items=50, num_topics=4, text_dim=17)
    models = ("missrec_inductive", "missrec_transductive", "missrec_inductive_cold")
    cmp = run_compare(ds, ONE_EPOCH, models=models, configs={"missrec": TunedConfig("missrec", SMALL, {})})
    assert not cmp.skipped and set(cmp.models) == {
        "missrec_inductive",
        "missrec_transductive",
        "missrec_inductive_cold",
    }


def test_long_histories_are_truncated_and_train(tmp_path):
    ds = tiny_dataset(tmp_path, num_users=60, num_items=80, num_topics=4, min_seq_len=55, max_seq_len=60)
    assert ds.train.lengths.max() == 50 and ds.test.lengths.min() == 50
    run = train_missrec(ds, ONE_EPOCH, "inductive", config=SMALL)
    assert run.metrics["test"]["ndcg@10"] >= 0.0
