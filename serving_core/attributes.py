"""Item attributes at serving time: the bundle's attribute file and the per-snapshot bitmap index filters read.

Bundle file ``items/attributes.jsonl`` (optional; its schema in ``manifest.attributes``): one JSON object per item
row, row 0 (padding) ``{}``. :class:`AttributeIndex` holds, for rows [0, n): one roaring bitmap (pyroaring) of
rows per value of every categories, string and boolean field, a float64 column per number field (NaN: not set),
and the bitmap of unavailable rows. It is immutable: :meth:`AttributeIndex.changed` returns the next one, sharing
every bitmap and column it does not touch. Filters combine the bitmaps per request (:meth:`rows_in` and friends).
"""

from __future__ import annotations

import json
from array import array
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pyroaring import BitMap

from serving_core.attribute_schema import InvalidAttributes, normalise

ATTRIBUTES_FILE = "items/attributes.jsonl"
COMPARISONS = ("lt", "lte", "gt", "gte")


def bitmap_of(rows: np.ndarray) -> BitMap:
    """A bitmap of row numbers (any integer array)."""
    return BitMap(array("I", np.asarray(rows, dtype=np.uint32).tobytes()))


def mask_of(rows: BitMap, n: int) -> np.ndarray:
    """(n,) bool with True at the rows of ``rows`` below n."""
    out = np.zeros(n, dtype=bool)
    if rows:
        idx = np.frombuffer(rows.to_array(), dtype=np.uint32)
        out[idx[idx < n]] = True
    return out


def write_attributes(root: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    """Write ``items/attributes.jsonl`` (one object per row; rows[0] is padding) under a bundle folder."""
    path = root / ATTRIBUTES_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for attrs in rows:
            f.write(json.dumps(dict(attrs), sort_keys=True, ensure_ascii=False) + "\n")


def read_attributes(root: Path, schema: Mapping[str, str], num_items: int) -> list[dict[str, Any]]:
    """The per-row attributes of a bundle (all ``{}`` without the file), checked against the schema."""
    path = Path(root) / ATTRIBUTES_FILE
    if not path.is_file():
        return [{} for _ in range(num_items)]
    rows = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            try:
                rows.append(normalise(schema, json.loads(line)))
            except (json.JSONDecodeError, InvalidAttributes) as exc:
                raise InvalidAttributes(f"{ATTRIBUTES_FILE} line {lineno}: {exc}") from None
    if len(rows) != num_items:
        raise InvalidAttributes(f"{ATTRIBUTES_FILE} has {len(rows)} rows, the item table {num_items}")
    return rows


def _values(kind: str | None, value: Any) -> list[Any]:
    """The bitmap keys of one field value: each category, or the value itself; none when the value is not of the
    field's type (an item stored under another bundle's schema) or the field is a number or not declared."""
    if kind == "categories":
        return list(value) if isinstance(value, list) else []
    if kind == "string":
        return [value] if isinstance(value, str) else []
    return [value] if kind == "boolean" and isinstance(value, bool) else []


def _number(value: Any) -> float:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else np.nan


@dataclass(frozen=True)
class AttributeIndex:
    """Attributes and availability of rows [0, n) of one catalogue snapshot (see the module docstring)."""

    schema: Mapping[str, str]
    n: int
    base: Sequence[Mapping[str, Any]]  # the bundle rows' attributes (shared, never changed)
    overlay: Mapping[int, Mapping[str, Any]]  # rows set since (own copy)
    values: Mapping[str, Mapping[Any, BitMap]]  # categories/string/boolean field -> value -> rows
    numbers: Mapping[str, np.ndarray]  # number field -> float64 column, NaN = not set (rows >= n: not ours)
    unavailable: BitMap

    @classmethod
    def build(cls, schema: Mapping[str, str], base: Sequence[Mapping[str, Any]]) -> AttributeIndex:
        n = len(base)
        values: dict[str, dict[Any, BitMap]] = {f: {} for f, k in schema.items() if k != "number"}
        numbers = {f: np.full(n, np.nan) for f, k in schema.items() if k == "number"}
        for row, attrs in enumerate(base):
            for name, value in attrs.items():
                kind = schema.get(name)
                if kind == "number":
                    numbers[name][row] = _number(value)
                for v in _values(kind, value):
                    values[name].setdefault(v, BitMap()).add(row)
        return cls(dict(schema), n, base, {}, values, numbers, BitMap())

    def of(self, row: int) -> Mapping[str, Any]:
        attrs = self.overlay.get(row)
        if attrs is not None:
            return attrs
        return self.base[row] if row < len(self.base) else {}

    def is_available(self, row: int) -> bool:
        return row not in self.unavailable

    def changed(self, n: int, rows: Mapping[int, tuple[Mapping[str, Any], bool]]) -> AttributeIndex:
        """The index over rows [0, n) (n >= self.n) with ``rows`` set: row -> (attributes, available). Bitmaps and
        columns it touches are copied first (the readers of this one never see a change)."""
        if not rows and n == self.n:
            return self
        values = {f: dict(d) for f, d in self.values.items()}
        copied: set[tuple[str, Any]] = set()

        def bitmap(name: str, value: Any) -> BitMap:
            if (name, value) not in copied:
                copied.add((name, value))
                values[name][value] = BitMap(values[name].get(value, ()))
            return values[name][value]

        numbers = dict(self.numbers)
        for name in numbers:
            if n > numbers[name].shape[0] or any(r < self.n for r in rows):  # appended rows within the
                grown = np.full(max(n, 2 * self.n), np.nan)  # capacity are written in place: no reader sees them
                grown[: self.n] = numbers[name][: self.n]
                numbers[name] = grown
        overlay = dict(self.overlay)
        unavailable = BitMap(self.unavailable)
        for row, (attrs, available) in rows.items():
            if row < self.n:  # a row already indexed: out of its old values first
                for name, value in self.of(row).items():
                    for v in _values(self.schema.get(name), value):
                        bitmap(name, v).discard(row)
            for name, col in numbers.items():
                col[row] = _number(attrs.get(name))
            for name, value in attrs.items():  # a field this bundle does not declare is kept, not indexed
                for v in _values(self.schema.get(name), value):
                    bitmap(name, v).add(row)
            overlay[row] = attrs
            if available:
                unavailable.discard(row)
            else:
                unavailable.add(row)
        return AttributeIndex(self.schema, n, self.base, overlay, values, numbers, unavailable)

    def unavailable_mask(self) -> np.ndarray:
        return mask_of(self.unavailable, self.n)

    # ----- what filters read -----------------------------------------------------------------------------------
    def field_kind(self, name: str) -> str:
        kind = self.schema.get(name)
        if kind is None:
            raise InvalidAttributes(f"unknown attribute field {name!r}; the fields are: {', '.join(self.schema)}")
        return kind

    def known_value(self, name: str, value: Any) -> bool:
        return value in self.values.get(name, {})

    def universe(self) -> BitMap:
        """Every row but padding."""
        out = BitMap()
        if self.n > 1:
            out.add_range(1, self.n)
        return out

    def rows_in(self, name: str, values: Sequence[Any]) -> BitMap:
        """Rows whose field ``name`` holds any of ``values`` (for categories: any of its categories)."""
        table = self.values.get(name, {})
        found = [table[v] for v in values if v in table]
        return BitMap.union(*found) if found else BitMap()

    def rows_compare(self, name: str, op: str, value: float) -> BitMap:
        """Rows whose number ``name`` is op (lt, lte, gt, gte) value (rows without it never match)."""
        col = self.numbers[name][: self.n]
        test = {"lt": np.less, "lte": np.less_equal, "gt": np.greater, "gte": np.greater_equal}[op]
        return bitmap_of(np.flatnonzero(test(col, value)))

    def rows_equal(self, name: str, value: Any) -> BitMap:
        if self.schema.get(name) == "number":
            return bitmap_of(np.flatnonzero(self.numbers[name][: self.n] == value))
        return self.rows_in(name, [value])


def read_attr_file(path: Path) -> dict[str, dict[str, Any]]:
    """An atomic-format ``<Name>.attr`` file: JSON lines ``{"item_id": ..., "attributes": {...}}`` -> id -> values."""
    out: dict[str, dict[str, Any]] = {}
    with Path(path).open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InvalidAttributes(f"{path} line {lineno}: not JSON ({exc})") from None
            if (
                not isinstance(obj, dict)
                or not isinstance(obj.get("item_id"), str)
                or set(obj) - {"item_id", "attributes"}
            ):
                raise InvalidAttributes(f'{path} line {lineno}: expected {{"item_id": str, "attributes": {{...}}}}')
            out[obj["item_id"]] = obj.get("attributes") or {}
    return out


def attach_attributes(root: Path, by_id: Mapping[str, Mapping[str, Any]]) -> dict[str, str]:
    """Give the bundle at ``root`` the attributes ``by_id`` (item id -> values; ids it does not hold are ignored,
    items without an entry get none): the schema inferred from the values (serving_core.attribute_schema), written
    to ``items/attributes.jsonl`` and declared in a re-finalised manifest. Returns the schema."""
    from dataclasses import replace

    from serving_core.attribute_schema import infer_schema
    from serving_core.bundle import BundleWriter, read_manifest

    root = Path(root)
    manifest = read_manifest(root)
    ids = json.loads((root / "items/ids.json").read_text(encoding="utf-8"))
    schema = infer_schema(by_id.values())
    rows = [{}] + [normalise(schema, by_id.get(str(i), {})) for i in ids[1:]]
    write_attributes(root, rows)
    BundleWriter(root).finalize(replace(manifest, attributes=schema))
    return schema
