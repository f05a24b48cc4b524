"""The attribute schema, the per-snapshot bitmap index (copy on write) and attributes in a bundle."""

import json
import shutil

import numpy as np
import pytest

from serving_core.attribute_schema import InvalidAttributes, check_schema, infer_schema, normalise
from serving_core.attributes import ATTRIBUTES_FILE, AttributeIndex, attach_attributes
from serving_core.bundle import BundleError, read_bundle, read_manifest

SCHEMA = {"brand": "string", "categories": "categories", "price": "number", "organic": "boolean"}


@pytest.mark.oracle
@pytest.mark.parametrize(
    "attrs",
    [
        {"colour": "red"},  # unknown field
        {"brand": 3},
        {"price": "3"},
        {"price": True},
        {"price": float("nan")},
        {"organic": 1},
        {"categories": "kitchen"},  # a string, not a list
        {"categories": ["x" * 300]},
        {"brand": "a\x00b"},
    ],
)
def test_values_that_do_not_match_the_schema_are_refused(attrs):
    with pytest.raises(InvalidAttributes):
        normalise(SCHEMA, attrs)


@pytest.mark.oracle
def test_schema_checks_and_inference():
    assert normalise(SCHEMA, {"categories": ["b", "a", "b"], "price": 3, "brand": None}) == {
        "categories": ["a", "b"],
        "price": 3.0,
    }
    assert infer_schema([{"brand": "x", "price": 2}, {"categories": ["a"], "organic": False}]) == dict(
        sorted(SCHEMA.items())
    )
    for bad in ({"available": "boolean"}, {"a b": "string"}, {"x": "date"}):
        with pytest.raises(InvalidAttributes):
            check_schema(bad)
    with pytest.raises(InvalidAttributes, match="as string and as number"):
        infer_schema([{"x": "a"}, {"x": 1}])


@pytest.mark.oracle
def test_the_index_is_copied_on_write_and_answers_like_a_scan():
    rng = np.random.default_rng(0)
    base = [{}] + [
        {
            "brand": f"b{rng.integers(5)}",
            "categories": sorted({f"c{c}" for c in rng.integers(0, 4, 2)}),
            "price": float(rng.integers(0, 100)),
        }
        for _ in range(200)
    ]
    old = AttributeIndex.build(SCHEMA, base)
    new = old.changed(203, {5: ({"brand": "b9", "price": 1.0}, True), 7: (base[7], False), 202: ({}, True)})
    # the old index is untouched
    assert old.rows_in("brand", ["b9"]) == type(old.unavailable)() and old.is_available(7)
    assert list(new.rows_in("brand", ["b9"])) == [5] and not new.is_available(7) and new.n == 203
    expected = {r for r in range(1, 201) if base[r].get("brand") == "b1"} - {5}
    assert set(new.rows_in("brand", ["b1"])) == expected
    cheap = {r for r in range(203) if (new.of(r).get("price") is not None and new.of(r)["price"] < 10)}
    assert set(new.rows_compare("price", "lt", 10)) == cheap
    assert set(new.rows_in("categories", ["c1"])) == {r for r in range(203) if "c1" in new.of(r).get("categories", [])}
    assert new.unavailable_mask().nonzero()[0].tolist() == [7]


def test_attributes_in_a_bundle_are_checksummed_and_checked(scientific_bundle, tmp_path):
    root = tmp_path / "b"
    shutil.copytree(scientific_bundle, root)
    ids = json.loads((root / "items/ids.json").read_text())
    schema = attach_attributes(root, {ids[1]: {"brand": "x", "price": 2}, ids[2]: {"categories": ["a"]}})
    assert (
        read_manifest(root).attributes == schema == {"brand": "string", "categories": "categories", "price": "number"}
    )
    read_bundle(root)
    rows = (root / ATTRIBUTES_FILE).read_text().splitlines()
    assert len(rows) == len(ids) and json.loads(rows[1]) == {"brand": "x", "price": 2.0}
    (root / ATTRIBUTES_FILE).write_text("\n".join([rows[0], '{"brand": 5}', *rows[2:]]) + "\n")
    with pytest.raises(BundleError, match="checksum"):
        read_bundle(root)
    # an unchanged bundle without attributes keeps its manifest digest
    assert "attributes" not in json.loads((scientific_bundle / "manifest.json").read_text())
