"""Request-time filters over item attributes: a small typed expression (no string evaluation) and ``max_per``.

The expression is a pydantic discriminated union on ``op``: ``in`` / ``not_in`` (categories and string fields),
``eq`` (string, number, boolean), ``lt`` / ``lte`` / ``gt`` / ``gte`` (numbers), ``and`` / ``or`` (1..16 args),
``not``. Its size (MAX_FILTER_NODES) and depth (MAX_FILTER_DEPTH) are published in the OpenAPI schema (``x-``
keys of the ``filter`` field) and enforced. :func:`matching_rows` checks it against the snapshot's attribute schema
(an unknown field, a value no item has, an operator the field's type does not take: 422) and combines the per-value
roaring bitmaps into the rows it matches; the search then runs on those rows only (serving_core.filtered).
A number comparison never matches an item without that number; ``not`` is the complement among all rows.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt
from pyroaring import BitMap

from service.errors import InvalidInput
from serving_core.attribute_schema import MAX_VALUE_CHARS
from serving_core.attributes import AttributeIndex, mask_of

MAX_FILTER_DEPTH = 6
MAX_FILTER_NODES = 64
MAX_FILTER_VALUES = 256  # values of one in / not_in
MAX_FILTER_ARGS = 16  # arguments of one and / or
MAX_PER_FIELDS = 4
FieldName = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")]
Text = Annotated[str, Field(min_length=1, max_length=MAX_VALUE_CHARS)]
Number = StrictInt | StrictFloat


class _Node(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class InFilter(_Node):
    op: Literal["in", "not_in"]
    field: FieldName
    values: list[Text] = Field(min_length=1, max_length=MAX_FILTER_VALUES)


class EqFilter(_Node):
    op: Literal["eq"]
    field: FieldName
    value: StrictBool | Number | Text


class CompareFilter(_Node):
    op: Literal["lt", "lte", "gt", "gte"]
    field: FieldName
    value: Number


class AnyFilter(_Node):
    op: Literal["and", "or"]
    args: list[Filter] = Field(min_length=1, max_length=MAX_FILTER_ARGS)


class NotFilter(_Node):
    op: Literal["not"]
    arg: Filter


Filter = Annotated[InFilter | EqFilter | CompareFilter | AnyFilter | NotFilter, Field(discriminator="op")]
for _model in (AnyFilter, NotFilter):
    _model.model_rebuild()

FILTER_SCHEMA_EXTRA = {"x-max-depth": MAX_FILTER_DEPTH, "x-max-nodes": MAX_FILTER_NODES}
FILTER_DESCRIPTION = (
    f"Only items matching this expression (at most {MAX_FILTER_NODES} nodes, {MAX_FILTER_DEPTH} levels deep): the "
    "exact top-k among them, exactly k when at least k match (see `matched`)."
)
MAX_PER_DESCRIPTION = (
    f"At most n items per value of a field (up to {MAX_PER_FIELDS} fields): the exact ranking walked best first, an "
    "item taken unless a value of it reached its cap (items without the field are not capped)."
)


def size_and_depth(node: Any) -> tuple[int, int]:
    if isinstance(node, AnyFilter):
        parts = [size_and_depth(a) for a in node.args]
        return 1 + sum(p[0] for p in parts), 1 + max(p[1] for p in parts)
    if isinstance(node, NotFilter):
        size, depth = size_and_depth(node.arg)
        return size + 1, depth + 1
    return 1, 1


def check_bounds(node: Any) -> Any:
    """The model validator of a request's ``filter``: the published size and depth bounds."""
    if node is None:
        return node
    size, depth = size_and_depth(node)
    if size > MAX_FILTER_NODES or depth > MAX_FILTER_DEPTH:
        raise ValueError(
            f"filter has {size} nodes and {depth} levels, at most {MAX_FILTER_NODES} nodes and {MAX_FILTER_DEPTH} "
            "levels"
        )
    return node


def _kind(attrs: AttributeIndex, field: str, allowed: tuple[str, ...], op: str) -> str:
    kind = attrs.schema.get(field)
    if kind is None:
        known = ", ".join(attrs.schema) or "none (this bundle declares no attributes)"
        raise InvalidInput(f"filter: unknown field {field!r}; the fields are: {known}", {"field": field},
                           code="unknown_filter_field")  # fmt: skip
    if kind not in allowed:
        raise InvalidInput(f"filter: {op!r} does not apply to {kind} field {field!r}", {"field": field, "op": op},
                           code="invalid_filter")  # fmt: skip
    return kind


def _known(attrs: AttributeIndex, field: str, values: list[Any]) -> None:
    unknown = [v for v in values if not attrs.known_value(field, v)]
    if unknown:
        raise InvalidInput(f"filter: no item has {field!r} = {unknown[0]!r}", {"field": field, "values": unknown[:20]},
                           code="unknown_filter_value")  # fmt: skip


def _rows(node: Any, attrs: AttributeIndex) -> BitMap:
    if isinstance(node, InFilter):
        _kind(attrs, node.field, ("categories", "string"), node.op)
        _known(attrs, node.field, node.values)
        rows = attrs.rows_in(node.field, node.values)
        return attrs.universe() - rows if node.op == "not_in" else rows
    if isinstance(node, EqFilter):
        kind = _kind(attrs, node.field, ("string", "number", "boolean"), "eq")
        value = node.value
        fits = {"string": isinstance(value, str), "boolean": isinstance(value, bool)}
        if not fits.get(kind, isinstance(value, int | float) and not isinstance(value, bool)):
            raise InvalidInput(f"filter: eq on {kind} field {node.field!r} needs a {kind}, got {value!r:.80}",
                               {"field": node.field}, code="invalid_filter")  # fmt: skip
        if kind != "number":
            _known(attrs, node.field, [value])
        return attrs.rows_equal(node.field, float(value) if kind == "number" else value)
    if isinstance(node, CompareFilter):
        _kind(attrs, node.field, ("number",), node.op)
        return attrs.rows_compare(node.field, node.op, float(node.value))
    if isinstance(node, NotFilter):
        return attrs.universe() - _rows(node.arg, attrs)
    parts = [_rows(a, attrs) for a in node.args]
    return BitMap.intersection(*parts) if node.op == "and" else BitMap.union(*parts)


def matching_rows(node: Any, attrs: AttributeIndex, hidden: np.ndarray) -> tuple[np.ndarray, int]:
    """(rows the filter allows as a bool mask over the snapshot, how many of them are live and available)."""
    rows = _rows(node, attrs)
    allowed = mask_of(rows, hidden.shape[0])
    return allowed, int((allowed & ~hidden).sum())


def check_max_per(max_per: dict[str, int] | None, attrs: AttributeIndex) -> None:
    for field in max_per or {}:
        _kind(attrs, field, ("categories", "string", "number", "boolean"), "max_per")
