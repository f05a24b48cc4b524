"""The atomic-format loader: real data, and clear errors for broken files."""

import shutil
from pathlib import Path

import numpy as np
import pytest

from missrec.data.dataset import DatasetError, load_dataset


def test_loads_real_scientific(scientific_dir):
    ds = load_dataset(scientific_dir)
    assert ds.name == "Scientific"
    assert ds.num_items == 1586 and len(ds.user_ids) == 2928
    assert set(ds.modalities) == {"text", "image"}
    assert ds.features["text"].shape == (1586, 512) and not ds.features["text"][0].any()
    assert len(ds.valid) == len(ds.test) == 2928
    assert ds.train.histories.max() < ds.num_items and (ds.train.targets >= 1).all()
    # histories are left-aligned: positions past the length are padding
    positions = np.arange(ds.max_len)[None, :]
    assert (ds.test.histories[positions >= ds.test.lengths[:, None]] == 0).all()
    assert (ds.test.histories[positions < ds.test.lengths[:, None]] > 0).all()
    assert ds.texts is not None and len(ds.texts) == 1585
    gorilla = ds.item_ids.index("B0000223UV")
    assert ds.texts[gorilla].startswith("Gorilla Original Gorilla Glue")


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    for p in dst.iterdir():
        p.chmod(0o644)
    return dst


@pytest.fixture
def scratch(scientific_dir, tmp_path):
    return _copy(scientific_dir, tmp_path / "sci")


def test_feature_width_is_derived_from_size(tmp_path, scientific_dir):
    d = _copy(scientific_dir, tmp_path / "w")
    feats = np.fromfile(d / "Scientific.feat1CLS", np.float32).reshape(1585, 512)[:, :96]
    feats.tofile(d / "Scientific.feat1CLS")
    ds = load_dataset(d)
    assert ds.features["text"].shape == (1586, 96) and ds.features["image"].shape == (1586, 512)


def test_one_modality_dataset(scratch):
    (scratch / "Scientific.feat3CLS").unlink()
    ds = load_dataset(scratch)
    assert ds.modalities == ("text",)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: (d / "Scientific.test.inter").unlink(), "missing file"),
        (lambda d: (d / "Scientific.item2index").unlink(), "missing file"),
        (lambda d: _truncate(d / "Scientific.feat3CLS", 100), "not a positive multiple"),
        (lambda d: _append(d / "Scientific.valid.inter", "0\t1 2 99999\t3\n"), "out of range"),
        (lambda d: _append(d / "Scientific.valid.inter", "0\t1 2\t-1\n"), "out of range"),
        (lambda d: _append(d / "Scientific.valid.inter", "999999\t1 2\t3\n"), "user id 999999 out of range"),
        (lambda d: _append(d / "Scientific.valid.inter", "0\tx y\t3\n"), "integers"),
        (lambda d: _replace_header(d / "Scientific.train.inter"), "header"),
        (lambda d: _append(d / "Scientific.item2index", "NEWITEM\t7\n"), "permutation"),
        (lambda d: _nan(d / "Scientific.feat1CLS"), "NaN or inf"),
    ],
)
def test_corrupt_files_give_clear_errors(scratch, mutate, message):
    mutate(scratch)
    with pytest.raises(DatasetError, match=message):
        load_dataset(scratch)


def test_missing_directory_and_ambiguous_name(tmp_path, scratch):
    with pytest.raises(DatasetError, match="does not exist"):
        load_dataset(tmp_path / "nope")
    shutil.copy(scratch / "Scientific.train.inter", scratch / "Other.train.inter")
    with pytest.raises(DatasetError, match="several datasets"):
        load_dataset(scratch)
    assert load_dataset(scratch, name="Scientific").name == "Scientific"


def test_truncation_to_max_len(scratch):
    ds = load_dataset(scratch, max_len=5)
    assert ds.train.histories.shape[1] == 5 and ds.test.lengths.max() == 5


def _truncate(path: Path, n: int) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:-n])


def _append(path: Path, line: str) -> None:
    with path.open("a") as fh:
        fh.write(line)


def _replace_header(path: Path) -> None:
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("user\titems\ttarget\n" + "".join(lines[1:]))


def _nan(path: Path) -> None:
    arr = np.fromfile(path, np.float32)
    arr[5] = np.nan
    arr.tofile(path)
