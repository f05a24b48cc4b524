"""Tests for missrec.data.prepare: raw catalog + log -> atomic dataset, checked through load_dataset.

The catalog points at the real ABO photos (read in place, never copied); the CLIP is the tiny random-init one.
The interaction log is hand-made so that the expected result is known without re-running the algorithm:

- "zz" is not in the catalog (1 row dropped before k-core);
- with min_core=3: round 1 drops user u5 (2 rows) and item i6 (1 row); round 2 drops item i5 (now 2 rows);
  round 3 drops users u6 and u7 (now 2 rows each); round 4 changes nothing;
- u3 has two events at the same time: file order (i8, then i3) decides, not the item id;
- users are indexed by first interaction time (u2, u4, u1, u3); items by first appearance along those
  sequences (i1, i2, i3, i4, i0 from u2, then i8, i9 from u4).
"""

from __future__ import annotations

import json
import logging
import os
import random
from pathlib import Path

import numpy as np
import pytest

from clip_features.torch_encoder import TINY_MODEL, ClipEncoder
from missrec.data.dataset import Interactions, load_dataset
from missrec.data.prepare import (
    Event,
    PrepareError,
    PrepareSummary,
    kcore_filter,
    prepare_dataset,
    read_interactions,
)

SEQUENCES = {  # user -> (start time, chronological items); kept users only
    "u2": (50, ["i1", "i2", "i3", "i4", "i0"]),
    "u4": (60, ["i3", "i4", "i0", "i1", "i8", "i9"]),
    "u1": (100, ["i0", "i1", "i2", "i3", "i4", "i8", "i9", "i0"]),
    "u3": (200, ["i2", "i8", "i3", "i9", "i4"]),
}
DROPPED = {"u5": (10, ["i0", "i5"]), "u6": (20, ["i5", "i1", "i2"]), "u7": (30, ["i5", "i3", "i4"])}
USERS = ["u2", "u4", "u1", "u3"]
ITEMS = ["i1", "i2", "i3", "i4", "i0", "i8", "i9"]


def _rows() -> list[tuple[str, str, str]]:
    rows = []
    for user, (start, items) in {**SEQUENCES, **DROPPED}.items():
        rows += [(user, item, str(start + 10 * k)) for k, item in enumerate(items)]
    rows[rows.index(("u3", "i3", "220"))] = ("u3", "i3", "210")  # tie with ("u3", "i8", "210")
    rows += [("u2", "i6", "95"), ("u1", "zz", "105")]
    random.Random(7).shuffle(rows)
    tie = [rows.index(("u3", "i8", "210")), rows.index(("u3", "i3", "210"))]
    rows[min(tie)], rows[max(tie)] = ("u3", "i8", "210"), ("u3", "i3", "210")  # i8's line first
    return rows


def _catalog(abo_dir: Path, folder: Path) -> list[dict]:
    photos = sorted(abo_dir.glob("*/*.jpg"))
    return [
        {"item_id": "i0", "text": "AmazonBasics LED bulb. Lighting. AmazonBasics.", "image": str(photos[0])},
        {"item_id": "i1", "text": "Yoga Bag. Sports bags. Starter.", "image": str(photos[3])},
        {
            "item_id": "i2",
            "text": "Vitamin E capsules. Health. Solimo.",
            "image": os.path.relpath(photos[8], folder),
        },  # relative to the JSONL file's folder
        {"item_id": "i3", "text": "Gym duffel,\n iron grey. Bags. Starter.", "image": str(photos[4])},
        {"item_id": "i4", "text": "Soft white bulb, 6 W. Lighting. AmazonBasics.", "image": str(photos[0])},
        {"item_id": "i5", "text": "Dropped by the k-core cascade.", "image": str(photos[5])},
        {"item_id": "i6", "text": "One interaction only.", "image": str(photos[6])},
        {"item_id": "i7", "text": "Never interacted with.", "image": str(photos[7])},
        {"item_id": "i8", "text": "Text only, no photo. Misc. Brand."},
        {"item_id": "i9", "image": str(photos[9]), "price": 3},
    ]


def _write_inputs(
    folder: Path, catalog: list[dict], rows: list[tuple[str, ...]], header: str = "user_id,item_id,timestamp"
) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    items = folder / "items.jsonl"
    items.write_text("".join(json.dumps(obj) + "\n" for obj in catalog), encoding="utf-8")
    events = folder / "events.csv"
    events.write_text(header + "\n" + "".join(",".join(r) + "\n" for r in rows), encoding="utf-8")
    return items, events


@pytest.fixture(scope="module")
def encoder() -> ClipEncoder:
    return ClipEncoder.random_init(TINY_MODEL, seed=0)


@pytest.fixture
def inputs(tmp_path: Path, abo_dir: Path) -> tuple[Path, Path]:
    return _write_inputs(tmp_path / "raw", _catalog(abo_dir, tmp_path / "raw"), _rows())


def _rows_of(split: Interactions) -> list[tuple[int, list[int], int]]:
    return [
        (int(split.users[r]), split.histories[r, : split.lengths[r]].tolist(), int(split.targets[r]))
        for r in range(len(split))
    ]


def _expected(max_len: int) -> dict[str, list[tuple[int, list[int], int]]]:
    """Leave-one-out rows written out from SEQUENCES, in internal ids (item index + 1)."""
    out: dict[str, list[tuple[int, list[int], int]]] = {"train": [], "valid": [], "test": []}
    for u, user in enumerate(USERS):
        seq = [ITEMS.index(i) + 1 for i in SEQUENCES[user][1]]
        out["train"] += [(u, seq[:k][-max_len:], seq[k]) for k in range(len(seq) - 3, 0, -1)]
        out["valid"].append((u, seq[:-2][-max_len:], seq[-2]))
        out["test"].append((u, seq[:-1][-max_len:], seq[-1]))
    return out


@pytest.fixture
def prepared(inputs: tuple[Path, Path], tmp_path: Path, encoder: ClipEncoder) -> PrepareSummary:
    return prepare_dataset(*inputs, tmp_path / "Shop", encoder, min_core=3, progress=False)


def test_prepare_round_trips_through_the_loader(prepared: PrepareSummary) -> None:
    summary = prepared
    assert (summary.name, summary.n_users, summary.n_items, summary.dim) == ("Shop", 4, 7, 512)
    assert (summary.rows_unknown_item, summary.unknown_items) == (1, 1)
    assert (summary.users_removed_by_kcore, summary.items_removed_by_kcore, summary.kcore_rounds) == (3, 2, 4)
    assert (summary.items_without_text, summary.items_without_image, summary.bad_images) == (1, 1, ())
    assert summary.n_interactions == sum(len(s) for _, s in SEQUENCES.values())

    ds = load_dataset(summary.out_dir)
    assert ds.name == "Shop" and ds.user_ids == tuple(USERS) and ds.item_ids == tuple(ITEMS)
    expected = _expected(max_len=50)
    for split in ("train", "valid", "test"):
        assert _rows_of(ds.split(split)) == expected[split], split
    assert (summary.n_train, summary.n_valid, summary.n_test) == (len(ds.train), 4, 4)


def test_features_equal_the_online_encoding(
    inputs: tuple[Path, Path], prepared: PrepareSummary, encoder: ClipEncoder, abo_dir: Path
) -> None:
    ds = load_dataset(prepared.out_dir)
    folder = inputs[0].parent
    catalog = {obj["item_id"]: obj for obj in _catalog(abo_dir, folder)}
    for idx, item in enumerate(ds.item_ids, start=1):
        raw = catalog[item]
        text = " ".join(raw["text"].split()) if "text" in raw else None
        image = (folder / raw["image"]).read_bytes() if "image" in raw else None
        features = encoder.encode_item(text, image)  # what the ingestion endpoint computes
        assert np.array_equal(ds.features["text"][idx], features["text"]), item
        assert np.array_equal(ds.features["image"][idx], features["image"]), item
        assert ds.texts is not None and ds.texts[idx - 1] == (text or "")
    i0, i4, i8, i9 = (ITEMS.index(i) + 1 for i in ("i0", "i4", "i8", "i9"))
    assert not ds.features["image"][i8].any() and ds.features["text"][i8].any()
    assert not ds.features["text"][i9].any() and ds.features["image"][i9].any()
    assert np.array_equal(ds.features["image"][i0], ds.features["image"][i4])  # same photo
    assert not np.array_equal(ds.features["text"][i0], ds.features["text"][i4])  # different text


def test_files_follow_the_scientific_layout(prepared: PrepareSummary, scientific_dir: Path) -> None:
    def first_line(path: Path) -> str:
        return path.read_text(encoding="utf-8").splitlines()[0]

    out = prepared.out_dir
    for suffix in (".train.inter", ".valid.inter", ".test.inter", ".text"):
        assert first_line(out / f"Shop{suffix}") == first_line(scientific_dir / f"Scientific{suffix}")
    assert first_line(out / "Shop.item2index") == f"{ITEMS[0]}\t0"
    assert (out / "Shop.feat1CLS").stat().st_size == len(ITEMS) * 512 * 4
    manifest = json.loads((out / "Shop.prepare.json").read_text(encoding="utf-8"))
    assert manifest["encoder"]["model_name"] == TINY_MODEL and manifest["encoder"]["dim"] == 512
    assert manifest["options"]["min_core"] == 3
    assert all(p.is_file() for p in prepared.files)


def test_dropped_rows_and_keys_are_logged(
    inputs: tuple[Path, Path], tmp_path: Path, encoder: ClipEncoder, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="missrec.data.prepare"):
        prepare_dataset(*inputs, tmp_path / "Shop", encoder, min_core=3, progress=False)
    assert "ignoring unknown keys {'price': 1}" in caplog.text
    assert "1 interaction rows with 1 item ids not in the catalog (e.g. zz)" in caplog.text


def test_histories_are_truncated_to_max_len(inputs: tuple[Path, Path], tmp_path: Path, encoder: ClipEncoder) -> None:
    prepare_dataset(*inputs, tmp_path / "short", encoder, min_core=3, max_len=3, progress=False)
    ds = load_dataset(tmp_path / "short", max_len=3)
    expected = _expected(max_len=3)
    for split in ("train", "valid", "test"):
        assert _rows_of(ds.split(split)) == expected[split], split
    assert max(ds.test.lengths) == 3 and len(SEQUENCES["u1"][1]) - 1 > 3


def test_users_need_three_interactions_whatever_min_core(
    inputs: tuple[Path, Path], tmp_path: Path, encoder: ClipEncoder
) -> None:
    summary = prepare_dataset(*inputs, tmp_path / "two", encoder, min_core=2, progress=False)
    ds = load_dataset(tmp_path / "two")
    assert "u5" not in ds.user_ids  # 2 interactions: no history for a valid and a test target
    assert {"u6", "u7"} <= set(ds.user_ids) and "i5" in ds.item_ids  # i5 keeps 2 >= min_core interactions
    u6 = ds.user_ids.index("u6")
    assert u6 not in ds.train.users and summary.n_valid == summary.n_test == len(ds.user_ids) == 6


def test_output_is_deterministic(inputs: tuple[Path, Path], tmp_path: Path, encoder: ClipEncoder) -> None:
    for out in ("a", "b"):
        prepare_dataset(*inputs, tmp_path / out / "Shop", encoder, min_core=3, progress=False)
    files_a = {p.name: p.read_bytes() for p in sorted((tmp_path / "a" / "Shop").iterdir())}
    files_b = {p.name: p.read_bytes() for p in sorted((tmp_path / "b" / "Shop").iterdir())}
    assert files_a == files_b and len(files_a) == 9


def test_kcore_filter_cascades() -> None:
    rows = [Event(u, i, int(t), n) for n, (u, i, t) in enumerate(_rows()) if i != "zz"]
    kept, rounds = kcore_filter(rows, 3, 3)
    assert rounds == 4
    assert {e.user for e in kept} == set(SEQUENCES) and {e.item for e in kept} == set(ITEMS)
    assert kcore_filter(kept, 3, 3) == (kept, 1)


def test_existing_output_needs_overwrite(inputs: tuple[Path, Path], tmp_path: Path, encoder: ClipEncoder) -> None:
    prepare_dataset(*inputs, tmp_path / "Shop", encoder, min_core=3, progress=False)
    with pytest.raises(PrepareError, match=r"already holds Shop\.train\.inter"):
        prepare_dataset(*inputs, tmp_path / "Shop", encoder, min_core=3, progress=False)
    prepare_dataset(*inputs, tmp_path / "Shop", encoder, min_core=3, progress=False, overwrite=True)
    with pytest.raises(PrepareError, match="another dataset"):
        prepare_dataset(*inputs, tmp_path / "Shop", encoder, name="Other", min_core=3, progress=False)


def test_iso_timestamps_sort_like_numbers(tmp_path: Path) -> None:
    rows = [
        ("u", "b", "2024-01-02T00:00:00Z"),
        ("u", "a", "2024-01-01T12:00:00+00:00"),
        ("u", "c", "2024-01-03"),
    ]
    _, events = _write_inputs(tmp_path, [], rows)
    parsed = read_interactions(events)
    assert [e.item for e in sorted(parsed, key=lambda e: e.timestamp)] == ["a", "b", "c"]


# ----- input errors -----------------------------------------------------------------------------------------


def _prepare(
    tmp_path: Path,
    encoder: ClipEncoder,
    catalog: list[dict],
    rows: list[tuple[str, ...]],
    *,
    header: str = "user_id,item_id,timestamp",
    min_core: int = 3,
    allow_bad_images: bool = False,
) -> PrepareSummary:
    items, events = _write_inputs(tmp_path / "raw", catalog, rows, header)
    return prepare_dataset(
        items,
        events,
        tmp_path / "out",
        encoder,
        min_core=min_core,
        allow_bad_images=allow_bad_images,
        progress=False,
    )


def test_duplicate_item_ids_are_an_error(tmp_path: Path, encoder: ClipEncoder, abo_dir: Path) -> None:
    catalog = _catalog(abo_dir, tmp_path / "raw")
    catalog.append({"item_id": "i3", "text": "again"})
    with pytest.raises(PrepareError, match=r"items.jsonl:11: duplicate item_id 'i3' \(first on line 4\)"):
        _prepare(tmp_path, encoder, catalog, _rows())


def test_invalid_json_line_is_an_error(tmp_path: Path, encoder: ClipEncoder, abo_dir: Path) -> None:
    items, events = _write_inputs(tmp_path / "raw", _catalog(abo_dir, tmp_path / "raw"), _rows())
    items.write_text(items.read_text(encoding="utf-8") + "{not json\n", encoding="utf-8")
    with pytest.raises(PrepareError, match=r"items.jsonl:11: invalid JSON"):
        prepare_dataset(items, events, tmp_path / "out", encoder, min_core=3, progress=False)


@pytest.mark.parametrize(
    ("header", "rows", "message"),
    [
        ("user_id,item_id,time", [("u", "i0", "1")], r"missing column\(s\) timestamp"),
        ("user_id,item_id,timestamp", [("u", "i0", "yesterday")], r"events.csv:2: timestamp 'yesterday'"),
        ("user_id,item_id,timestamp", [("u", "i0", "nan")], "not finite"),
        ("user_id,item_id,timestamp", [("u", "i0", "1"), ("u", "i1", "2024-01-01")], "mix numbers and ISO"),
        ("user_id,item_id,timestamp", [("u", "i0")], r"events.csv:2: 2 fields, header has 3"),
        ("user_id,item_id,timestamp", [("", "i0", "1")], "events.csv:2: id '' is empty"),
        ("user_id,item_id,timestamp", [], "holds no interactions"),
    ],
)
def test_bad_interaction_files_are_errors(
    inputs: tuple[Path, Path], encoder: ClipEncoder, header: str, rows: list[tuple[str, ...]], message: str
) -> None:
    items, events = inputs
    events.write_text(header + "\n" + "".join(",".join(r) + "\n" for r in rows), encoding="utf-8")
    with pytest.raises(PrepareError, match=message):
        prepare_dataset(items, events, items.parent / "out", encoder, min_core=3, progress=False)


def test_nothing_left_after_kcore_is_an_error(tmp_path: Path, encoder: ClipEncoder, abo_dir: Path) -> None:
    with pytest.raises(PrepareError, match="no interactions left after k-core"):
        _prepare(tmp_path, encoder, _catalog(abo_dir, tmp_path / "raw"), _rows(), min_core=6)
    assert not (tmp_path / "out").exists()


def test_unreadable_images_are_errors_naming_the_items(tmp_path: Path, encoder: ClipEncoder, abo_dir: Path) -> None:
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "fake.jpg").write_bytes(b"this is not a JPEG")
    catalog = _catalog(abo_dir, raw)
    catalog[3]["image"] = "fake.jpg"  # i3
    catalog[9]["image"] = "missing.jpg"  # i9
    with pytest.raises(PrepareError, match="2 item image") as err:
        _prepare(tmp_path, encoder, catalog, _rows())
    assert "item i3: " in str(err.value) and "not a supported image" in str(err.value)
    assert "item i9: " in str(err.value) and "missing.jpg: cannot read" in str(err.value)
    assert not (tmp_path / "out").exists()

    summary = _prepare(tmp_path, encoder, catalog, _rows(), allow_bad_images=True)
    assert summary.bad_images == ("i3", "i9")
    ds = load_dataset(tmp_path / "out")
    i3 = ds.item_index()["i3"]
    assert not ds.features["image"][i3].any() and ds.features["text"][i3].any()


def test_urls_are_refused(tmp_path: Path, encoder: ClipEncoder, abo_dir: Path) -> None:
    catalog = _catalog(abo_dir, tmp_path / "raw")
    catalog[0]["image"] = "https://example.com/i0.jpg"
    with pytest.raises(PrepareError, match="URLs are never fetched"):
        _prepare(tmp_path, encoder, catalog, _rows())


def test_prepare_through_onnx_gives_the_online_onnx_features(
    inputs: tuple[Path, Path], prepared: PrepareSummary, tmp_path: Path, tiny_clip_onnx: Path, abo_dir: Path
) -> None:
    """`missrec prepare --clip-onnx DIR` encodes with the graphs the service ingests with (MISSREC_CLIP_ONNX=DIR):
    offline and online features are bit-identical, and within 1e-4 of open_clip's (the torch-prepared dataset)."""
    from typer.testing import CliRunner

    from clip_features.onnx_encoder import OnnxClipEncoder
    from missrec_cli.main import app

    out = tmp_path / "ShopOnnx"
    args = ["prepare", "--items", str(inputs[0]), "--interactions", str(inputs[1]), "--out", str(out)]
    result = CliRunner().invoke(app, [*args, "--min-core", "3", "--clip-onnx", str(tiny_clip_onnx)])
    assert result.exit_code == 0, result.output
    online = OnnxClipEncoder(tiny_clip_onnx)
    ds, torch_ds = load_dataset(out), load_dataset(prepared.out_dir)
    assert ds.item_ids == torch_ds.item_ids
    folder = inputs[0].parent
    catalog = {obj["item_id"]: obj for obj in _catalog(abo_dir, folder)}
    for idx, item in enumerate(ds.item_ids, start=1):
        raw = catalog[item]
        text = " ".join(raw["text"].split()) if "text" in raw else None
        features = online.encode_item(text, (folder / raw["image"]).read_bytes() if "image" in raw else None)
        for m in ("text", "image"):
            assert np.array_equal(ds.features[m][idx], features[m]), (item, m)
            assert np.abs(ds.features[m][idx] - torch_ds.features[m][idx]).max() <= 1e-4, (item, m)
    manifest = json.loads((out / "ShopOnnx.prepare.json").read_text(encoding="utf-8"))
    assert manifest["encoder"]["clip_onnx"] == str(tiny_clip_onnx.resolve())
    refused = CliRunner().invoke(app, [*args, "--clip-onnx", str(tiny_clip_onnx), "--clip-model", "ViT-B-32"])
    assert refused.exit_code == 2 and "leave out --clip-model" in refused.output


def test_catalog_attributes_go_to_the_attr_file_for_kept_items(tmp_path: Path, encoder: ClipEncoder, abo_dir: Path):
    catalog = _catalog(abo_dir, tmp_path / "raw")
    catalog[0]["attributes"] = {"brand": "AmazonBasics", "categories": ["Lighting"], "price": 9.5}
    catalog[5]["attributes"] = {"brand": "dropped by the k-core"}  # i5: not kept
    inputs = _write_inputs(tmp_path / "raw", catalog, _rows())
    summary = prepare_dataset(*inputs, tmp_path / "Shop", encoder, min_core=3, progress=False)
    lines = [json.loads(line) for line in (summary.out_dir / "Shop.attr").read_text().splitlines()]
    assert [line["item_id"] for line in lines] == list(ITEMS)
    assert lines[ITEMS.index("i0")]["attributes"] == catalog[0]["attributes"]
    assert all(line["attributes"] == {} for line in lines if line["item_id"] != "i0")
    plain = prepare_dataset(*_write_inputs(tmp_path / "raw2", _catalog(abo_dir, tmp_path / "raw2"), _rows()),
                            tmp_path / "Plain", encoder, min_core=3, progress=False)  # fmt: skip
    assert not (plain.out_dir / "Plain.attr").exists()
