"""The typed bundle contract: round trip, refusal of older formats with how to rebuild, unknown fields, scorers."""

import contextlib
import dataclasses
import json

import numpy as np
import pytest

from serving_core.bundle import (
    FORMAT,
    FORMAT_VERSION,
    INNER_PRODUCT,
    Block,
    BundleError,
    BundleWriter,
    Dims,
    ItemTable,
    Manifest,
    Scorer,
    read_bundle,
    read_manifest,
    static_vectors,
)
from serving_core.towers import tower_graphs

pytestmark = pytest.mark.oracle

N, D, T = 50, 8, 12
BLOCKS = (Block("text", 0, 4), Block("image", 4, 8))


def _inner_product_bundle(root, blocks=BLOCKS):
    """SYNTHETIC inner_product bundle (no ONNX files needed to read the contract)."""
    rng = np.random.default_rng(0)
    table = ItemTable(
        ids=["", *(f"i{r}" for r in range(1, N))],
        tokens=rng.standard_normal((N, T)).astype(np.float32),
        vectors={"item": rng.standard_normal((N, D)).astype(np.float32)},
        clusters={},
        popularity=np.arange(N, dtype=np.float32),
    )
    manifest = Manifest(
        format=FORMAT,
        format_version=FORMAT_VERSION,
        model_kind="msm4sr",
        model={"hidden": D},
        dims=Dims(hidden=D, token=T, features={"text": 6, "image": 5}),
        scorer=Scorer(INNER_PRODUCT, ("text", "image"), blocks=blocks),
        graphs=tower_graphs(("text", "image"), inner_product=True),
        num_items=N,
        num_interests=0,
        max_len=20,
    )
    writer = BundleWriter(root)
    writer.write_item_table(table)
    for g in manifest.graphs.values():
        writer.path(g.file).write_bytes(b"not a graph: the contract is read without opening it")
    return writer.finalize(manifest), table


def test_round_trip_of_a_typed_manifest(tmp_path):
    written, table = _inner_product_bundle(tmp_path)
    bundle = read_bundle(tmp_path)
    assert bundle.manifest == written and bundle.centroids is None
    assert bundle.manifest.scorer.blocks == (Block("text", 0, 4), Block("image", 4, 8))
    assert bundle.manifest.version == f"msm4sr-{written.digest[:12]}"
    np.testing.assert_array_equal(static_vectors(bundle.manifest.scorer, bundle.table.vectors), table.vectors["item"])
    mapped = read_bundle(tmp_path, mmap=True)  # large arrays memory-mapped, same values
    assert isinstance(mapped.table.vectors["item"], np.memmap)
    np.testing.assert_array_equal(mapped.table.tokens, table.tokens)


def test_an_older_format_is_refused_with_how_to_rebuild(tmp_path):
    _inner_product_bundle(tmp_path)
    data = json.loads((tmp_path / "manifest.json").read_text())
    data["format_version"] = 1
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(BundleError, match=r"format version 1 is older than the 2 this code reads; rebuild it") as e:
        read_manifest(tmp_path)
    assert "missrec export" in str(e.value) and "missrec build-index" in str(e.value)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d.update(surprise=1), "unknown field"),
        (lambda d: d["scorer"].update(kind="cosine_magic"), "unknown scorer"),
        (lambda d: d["dims"].update(features={"text": 6}), "feature widths"),
        (lambda d: d["scorer"]["blocks"].append({"name": "x", "start": 6, "stop": 99}), "outside"),
        (lambda d: d.pop("graphs"), "malformed manifest"),
    ],
)
def test_malformed_manifests_are_refused(tmp_path, edit, message):
    _inner_product_bundle(tmp_path)
    data = json.loads((tmp_path / "manifest.json").read_text())
    edit(data)
    with contextlib.suppress(BundleError, KeyError, TypeError):  # a valid digest for what parses, so that the
        data["digest"] = Manifest.from_dict(data).compute_digest()  # check under test is the one that objects
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(BundleError, match=message):
        read_manifest(tmp_path)


def test_an_edited_manifest_fails_its_digest(tmp_path):
    _inner_product_bundle(tmp_path)
    data = json.loads((tmp_path / "manifest.json").read_text())
    data["max_len"] = 21
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(BundleError, match="digest mismatch"):
        read_manifest(tmp_path)


def test_the_item_table_must_match_the_scorer(tmp_path):
    manifest, table = _inner_product_bundle(tmp_path)
    wrong = dataclasses.replace(table, vectors={"text": table.vectors["item"]})
    with pytest.raises(BundleError, match="item vectors must be exactly"):
        wrong.validate(manifest.dims, manifest.scorer, 0)
    with pytest.raises(BundleError, match=r"tokens\.npy: shape"):
        dataclasses.replace(table, tokens=table.tokens[:, :D]).validate(manifest.dims, manifest.scorer, 0)


@pytest.mark.parametrize("linked", ["manifest.json", "items/popularity.npy"])
def test_bundle_files_linked_out_of_the_bundle_are_refused_unread(tmp_path, linked):
    """A bundle file that is a symlink out of the bundle directory (here to a file with the same bytes, so every
    checksum would pass) is refused, and what it points at is never echoed in the error."""
    bundle = tmp_path / "bundle"
    _inner_product_bundle(bundle)
    outside = tmp_path / "outside"
    outside.mkdir()
    target = outside / "secret"
    if linked == "manifest.json":  # a manifest whose fields would otherwise be quoted back in the error
        target.write_text(json.dumps({"format": "SECRET-CONTENT-1234"}))
    else:
        target.write_bytes((bundle / linked).read_bytes())
    (bundle / linked).unlink()
    (bundle / linked).symlink_to(target)
    with pytest.raises(BundleError) as refused:
        read_bundle(bundle)
    assert "link out of the bundle" in str(refused.value)
    assert "SECRET" not in str(refused.value)
