"""DistributedDataParallel fine-tuning (missrec.training.distributed): two gloo processes on CPU, tiny data."""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from harness.ports import free_port
from missrec.data.dataset import load_dataset
from missrec.training.loop import TrainOptions, fit
from tests.helpers import tiny_dataset, tiny_missrec
from tests.paths import ROOT

OPTS = TrainOptions(epochs=2, batch_size=64, patience=2, progress=False, lr=3e-3)


def _fit_one(root, seed=0):
    ds = load_dataset(root)
    model = tiny_missrec(ds, seed=seed, dropout=0.0)  # no dropout: the two runs must compute the same gradients
    result = fit(model, ds.train, ds.valid, OPTS)
    return model, result


def _rank(rank: int, world: int, init: str, root: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        model, result = _fit_one(root)
        torch.save(model.state_dict(), f"{out}/state-{rank}.pt")
        with open(f"{out}/history-{rank}.json", "w") as f:
            json.dump({"best_epoch": result.best_epoch, "history": result.history}, f)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    tiny_dataset(path)
    return path


def test_two_gloo_processes_train_as_one(root, tmp_path):
    """Same weights as one process (the ranks' scaled gradients average to the whole batch's), the same
    validation metrics and early-stopping epoch on both ranks (all-reduced), clusters broadcast from rank 0."""
    init = f"file://{tmp_path}/rendezvous"
    mp.spawn(_rank, args=(2, init, str(root), str(tmp_path)), nprocs=2, join=True)
    single, single_result = _fit_one(root)
    ranks = [json.loads((tmp_path / f"history-{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] == ranks[1]  # every rank saw the same validation and stopped at the same epoch
    assert ranks[0]["best_epoch"] == single_result.best_epoch
    for mine, one in zip(ranks[0]["history"], single_result.history, strict=True):
        assert mine["ndcg@10"] == pytest.approx(one["ndcg@10"], abs=1e-3)
        assert mine["n"] == one["n"]
        assert mine["loss"] == pytest.approx(one["loss"], rel=1e-4)
    states = [torch.load(tmp_path / f"state-{r}.pt") for r in (0, 1)]
    for name in states[0]:
        assert torch.equal(states[0][name], states[1][name]), name  # the ranks hold one model
    # Against one process: the same scores (float summation order differs; parameters whose exact gradient is 0,
    # like the attention key bias, pick up Adam-normalised rounding noise that does not change any score).
    ds = load_dataset(root)
    items, lengths = torch.from_numpy(ds.test.histories), torch.from_numpy(ds.test.lengths)
    with torch.no_grad():
        one = single.eval().full_scores(items, lengths)
        single.load_state_dict(states[0])
        two = single.full_scores(items, lengths)
    torch.testing.assert_close(two, one, rtol=1e-3, atol=1e-3)


@pytest.mark.slow
def test_missrec_train_distributed_under_torchrun_writes_once(root, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port())]
    cmd += ["-m", "missrec_cli.main", "train", "--distributed", "--data", str(root), "--model", "sasrec"]
    cmd += ["--epochs", "2", "--batch-size", "64", "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "metrics.json"]
    info = json.loads((out / "metrics.json").read_text())["info"]
    assert info["epochs_run"] == 2


def test_distributed_without_torchrun_is_refused(root, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR")}
    cmd = [sys.executable, "-m", "missrec_cli.main", "train", "--distributed", "--data", str(root)]
    cmd += ["--out", str(tmp_path / "run")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**env, "PYTHONPATH": str(ROOT)}, check=False)
    assert proc.returncode == 2
    assert not (tmp_path / "run").exists()
