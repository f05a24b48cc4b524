"""Tests for missrec.data.synthetic: the files load, are deterministic, and really carry the topic signal."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from missrec.data.dataset import SeqDataset, load_dataset
from missrec.data.synthetic import generate_synthetic, read_topics

SMALL = {
    "num_users": 400,
    "num_items": 240,
    "num_topics": 8,
    "text_dim": 64,
    "image_dim": 48,
    "min_seq_len": 4,
    "max_seq_len": 14,
    "seed": 3,
}


def _files(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def _read_rows(path: Path) -> list[tuple[int, list[int], int]]:
    lines = path.read_text(encoding="utf-8").splitlines()[1:]
    return [(int(u), [int(i) for i in h.split()], int(t)) for u, h, t in (ln.split("\t") for ln in lines)]


def _last_items(split) -> np.ndarray:
    """0-based index of the last history item of every row."""
    return split.histories[np.arange(len(split)), split.lengths - 1] - 1


@pytest.fixture(scope="module")
def small_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_synthetic(tmp_path_factory.mktemp("syn") / "data", **SMALL)


@pytest.fixture(scope="module")
def small(small_dir: Path) -> SeqDataset:
    return load_dataset(small_dir)


def test_loads_with_the_requested_counts_and_widths(small_dir: Path, small: SeqDataset) -> None:
    assert small.name == "Synthetic"
    assert small.num_items == SMALL["num_items"] + 1
    assert small.item_ids[:2] == ("syn-item-000000", "syn-item-000001")
    assert small.user_ids[7] == "syn-user-000007"
    assert len(small.user_ids) == SMALL["num_users"]
    assert small.modalities == ("text", "image")
    assert small.features["text"].shape == (SMALL["num_items"] + 1, SMALL["text_dim"])
    assert small.features["image"].shape == (SMALL["num_items"] + 1, SMALL["image_dim"])
    for feats in small.features.values():
        assert not feats[0].any()  # padding row added by the loader
        assert (np.linalg.norm(feats[1:], axis=1) > 1.0).all()
    # One valid and one test row per user; train holds every prefix of seq[:-2] (length - 3 rows per user).
    assert sorted(small.valid.users.tolist()) == list(range(SMALL["num_users"]))
    assert sorted(small.test.users.tolist()) == list(range(SMALL["num_users"]))
    seq_len = np.zeros(SMALL["num_users"], dtype=np.int64)
    seq_len[small.test.users] = small.test.lengths + 1
    assert seq_len.min() >= SMALL["min_seq_len"]
    assert seq_len.max() <= SMALL["max_seq_len"]
    assert len(small.train) == int((seq_len - 3).sum())
    assert small.texts is not None
    assert all("synthetic" in text.lower() for text in small.texts)
    manifest = json.loads((small_dir / "Synthetic.synthetic.json").read_text())
    assert manifest["synthetic"] is True
    assert manifest["params"]["num_items"] == SMALL["num_items"]


def test_splits_are_chronological_leave_one_out(small_dir: Path) -> None:
    train = _read_rows(small_dir / "Synthetic.train.inter")
    valid = {u: (h, t) for u, h, t in _read_rows(small_dir / "Synthetic.valid.inter")}
    test = {u: (h, t) for u, h, t in _read_rows(small_dir / "Synthetic.test.inter")}
    last_train: dict[int, tuple[list[int], int]] = {}
    for u, h, t in train:
        if u in last_train:  # rows of a user are consecutive prefixes, oldest first
            prev_h, prev_t = last_train[u]
            assert h == [*prev_h, prev_t]
        else:
            assert len(h) == 1
        last_train[u] = (h, t)
    repeats = 0
    for u, (h, t) in test.items():
        assert h == [*valid[u][0], valid[u][1]]
        repeats += t in h
        if u in last_train:
            assert valid[u][0] == [*last_train[u][0], last_train[u][1]]
        else:
            assert len(valid[u][0]) == 1
    assert repeats < 0.03 * len(test)  # repeats within a sequence are avoided where the topic allows


def test_histories_keep_the_last_max_len_items(tmp_path: Path) -> None:
    out = generate_synthetic(
        tmp_path,
        num_users=50,
        num_items=80,
        num_topics=4,
        text_dim=8,
        image_dim=8,
        min_seq_len=9,
        max_seq_len=12,
        max_len=5,
    )
    valid = {u: (h, t) for u, h, t in _read_rows(out / "Synthetic.valid.inter")}
    for split in ("train", "valid", "test"):
        assert max(len(h) for _, h, _ in _read_rows(out / f"Synthetic.{split}.inter")) == 5
    for u, h, _ in _read_rows(out / "Synthetic.test.inter"):
        assert h == [*valid[u][0][1:], valid[u][1]]  # window slid by one item


def test_feature_norms_resemble_clip(tmp_path: Path) -> None:
    # Real CLIP ViT-B/32 rows (Scientific) have mean norm ~7.3 (text), ~10.3 (image); they are not normalised.
    ds = load_dataset(generate_synthetic(tmp_path, num_users=20, num_items=300, num_topics=6))
    text_norm = np.linalg.norm(ds.features["text"][1:], axis=1)
    image_norm = np.linalg.norm(ds.features["image"][1:], axis=1)
    assert 6.5 < text_norm.mean() < 9.5
    assert 9.0 < image_norm.mean() < 11.5
    assert text_norm.std() > 0.1  # not L2-normalised to a constant


def test_same_arguments_give_identical_files(tmp_path: Path, small_dir: Path) -> None:
    again = generate_synthetic(tmp_path / "again", **SMALL)
    assert _files(again) == _files(small_dir)
    other = _files(generate_synthetic(tmp_path / "other", **{**SMALL, "seed": 4}))
    first = _files(small_dir)
    assert other.keys() == first.keys()
    for suffix in (".train.inter", ".test.inter", ".feat1CLS", ".feat3CLS", ".topics"):
        assert other[f"Synthetic{suffix}"] != first[f"Synthetic{suffix}"], suffix


def test_one_modality(tmp_path: Path, small_dir: Path, small: SeqDataset) -> None:
    out = tmp_path / "one"
    generate_synthetic(out, **SMALL)  # both modalities first: the image file must then be removed
    assert (out / "Synthetic.feat3CLS").is_file()
    generate_synthetic(out, **{**SMALL, "modalities": ("text",)})
    assert not (out / "Synthetic.feat3CLS").exists()
    ds = load_dataset(out)
    assert ds.modalities == ("text",)
    # Independent random streams: the text features and the sequences do not depend on the other modality.
    np.testing.assert_array_equal(ds.features["text"], small.features["text"])
    np.testing.assert_array_equal(ds.test.histories, small.test.histories)
    image_only = load_dataset(generate_synthetic(tmp_path / "img", **{**SMALL, "modalities": ("image",)}))
    assert image_only.modalities == ("image",)
    np.testing.assert_array_equal(image_only.features["image"], small.features["image"])


def test_read_topics(small_dir: Path) -> None:
    topic, secondary = read_topics(small_dir)
    assert topic.shape == secondary.shape == (SMALL["num_items"],)
    assert sorted(set(topic.tolist())) == list(range(SMALL["num_topics"]))  # every topic has items
    has = secondary >= 0
    assert 0.1 < has.mean() < 0.4
    assert (secondary[has] < SMALL["num_topics"]).all()
    assert (secondary[has] != topic[has]).all()


@pytest.mark.parametrize("modality", ["text", "image"])
def test_same_topic_items_are_more_similar(small_dir: Path, small: SeqDataset, modality: str) -> None:
    topic, _ = read_topics(small_dir)
    x = small.features[modality][1:]
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    cos = x @ x.T
    same = topic[:, None] == topic[None, :]
    np.fill_diagonal(same, False)
    cross = topic[:, None] != topic[None, :]
    assert cos[same].mean() > cos[cross].mean() + 0.15


def test_next_topic_is_predictable_from_the_last_item(small_dir: Path, small: SeqDataset) -> None:
    topic, _ = read_topics(small_dir)
    target_topic = topic[small.test.targets - 1]
    accuracy = (topic[_last_items(small.test)] == target_topic).mean()
    majority = np.bincount(target_topic).max() / len(target_topic)  # best constant guess
    assert accuracy > 0.6
    assert accuracy > majority + 0.35


def test_popularity_is_skewed_and_content_beats_it(small: SeqDataset) -> None:
    counts = np.bincount(small.train.targets, minlength=small.num_items)[1:].astype(np.float64)
    top_tenth = np.sort(counts)[::-1][: len(counts) // 10].sum() / counts.sum()
    assert top_tenth > 0.27  # Zipf-like: the top 10% of items take a large share (~0.19 if uniform)

    test = small.test
    pop = np.log1p(np.concatenate([[0.0], counts]))  # (N+1,)
    x = small.features["text"]
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-9)
    cos = x[_last_items(test) + 1] @ x.T  # (R, N+1) similarity to the last history item

    def hit_rate_at_10(scores: np.ndarray) -> float:
        scores = scores.copy()
        scores[:, 0] = -np.inf
        rows = np.repeat(np.arange(len(test)), test.histories.shape[1])
        scores[rows, test.histories.reshape(-1)] = -np.inf  # seen items (and padding) never recommended
        top = np.argsort(-scores, axis=1, kind="stable")[:, :10]
        return float((top == test.targets[:, None]).any(axis=1).mean())

    popularity = hit_rate_at_10(np.broadcast_to(pop, cos.shape))
    content = hit_rate_at_10(pop + 10.0 * cos)  # popularity near the last item: a crude content model
    assert content > popularity + 0.2
    assert content > 1.8 * popularity


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"modalities": ("text", "audio")}, "unknown modality 'audio'"),
        ({"modalities": "text"}, "not the string"),
        ({"modalities": ()}, "at least one"),
        ({"modalities": ("text", "text")}, "repeated"),
        ({"num_topics": 11, "num_items": 10}, "num_topics"),
        ({"min_seq_len": 2}, "min_seq_len must be >= 3"),
        ({"min_seq_len": 10, "max_seq_len": 9}, "max_seq_len"),
        ({"num_users": 0}, "num_users"),
        ({"text_dim": 0}, "text_dim"),
        ({"max_len": 0}, "max_len"),
        ({"seed": -1}, "seed"),
        ({"num_items": 10.5}, "num_items must be an integer"),
        ({"name": "a/b"}, "name"),
        ({"name": ""}, "name"),
    ],
)
def test_bad_arguments_raise_value_error(tmp_path: Path, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        generate_synthetic(tmp_path / "bad", **kwargs)
    assert not (tmp_path / "bad").exists()  # validated before anything is written
