"""Item attributes: the typed schema a bundle declares (``manifest.attributes``) and the check of one item's values.

numpy-free (the manifest reads it). A schema maps field names to one of four types:

- ``categories``: a set of strings (an item is in several: ``{"categories": ["kitchen", "tools"]}``);
- ``string``: one string (``brand``); ``number``: one finite number (``price``); ``boolean``: true or false.

Every field is optional on an item. ``available`` is not an attribute: it is the built-in availability flag of every
item (``service``: unavailable items are kept, never recommended). Values are checked at the edge by :func:`normalise`
(unknown field, wrong type, bounds: :class:`InvalidAttributes`, a 422 in the service).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from typing import Any

TYPES = ("categories", "string", "number", "boolean")
MAX_FIELDS = 32
MAX_CATEGORIES = 64  # values of one categories field on one item
MAX_VALUE_CHARS = 256  # a string or category value
FIELD_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
RESERVED = frozenset({"available", "item_id"})
ATTR_SUFFIX = ".attr"  # the atomic format's optional attribute file: <Name>.attr, JSON lines


class InvalidAttributes(ValueError):
    """Attribute values (or a schema) that do not match the schema (the message says which field and why)."""


def check_schema(schema: Any) -> dict[str, str]:
    """A schema as {field: type}, checked (names, types, count)."""
    if not isinstance(schema, Mapping):
        raise InvalidAttributes(f"an attribute schema is an object of field -> type, got {type(schema).__name__}")
    if len(schema) > MAX_FIELDS:
        raise InvalidAttributes(f"{len(schema)} attribute fields, at most {MAX_FIELDS}")
    out = {}
    for name, kind in schema.items():
        if not isinstance(name, str) or not FIELD_NAME.match(name) or name in RESERVED:
            raise InvalidAttributes(f"attribute field name {name!r}: letters, digits, _ (not {', '.join(RESERVED)})")
        if kind not in TYPES:
            raise InvalidAttributes(f"attribute field {name!r}: type {kind!r}, expected one of {', '.join(TYPES)}")
        out[name] = str(kind)
    return dict(sorted(out.items()))


def _text(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value or len(value) > MAX_VALUE_CHARS:
        raise InvalidAttributes(f"{where}: a string of 1..{MAX_VALUE_CHARS} characters, got {value!r:.80}")
    if any(ord(c) < 32 or 127 <= ord(c) < 160 for c in value):
        raise InvalidAttributes(f"{where}: control characters are not allowed")
    return value


def normalise(schema: Mapping[str, str], attributes: Any) -> dict[str, Any]:
    """One item's attributes checked against ``schema``: categories -> sorted unique list, numbers -> float.
    Unknown fields and wrong types raise :class:`InvalidAttributes`; a null value means "not set"."""
    if attributes is None:
        return {}
    if not isinstance(attributes, Mapping):
        raise InvalidAttributes(f"attributes must be an object, got {type(attributes).__name__}")
    out: dict[str, Any] = {}
    for name, value in attributes.items():
        kind = schema.get(name)
        if kind is None:
            known = ", ".join(schema) or "none (this bundle declares no attributes)"
            raise InvalidAttributes(f"unknown attribute field {name!r}; the fields are: {known}")
        if value is None:
            continue
        where = f"attribute {name!r} ({kind})"
        if kind == "categories":
            if not isinstance(value, list | tuple) or len(value) > MAX_CATEGORIES:
                raise InvalidAttributes(f"{where}: a list of at most {MAX_CATEGORIES} strings")
            out[name] = sorted({_text(v, where) for v in value})
        elif kind == "string":
            out[name] = _text(value, where)
        elif kind == "number":
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise InvalidAttributes(f"{where}: a finite number, got {value!r:.80}")
            out[name] = float(value)
        else:
            if not isinstance(value, bool):
                raise InvalidAttributes(f"{where}: true or false, got {value!r:.80}")
            out[name] = value
    return out


def infer_schema(rows: Iterable[Mapping[str, Any]]) -> dict[str, str]:
    """The schema of attribute objects as written (lists -> categories, strings, booleans, numbers); a field given
    two types is an error."""
    schema: dict[str, str] = {}
    for attrs in rows:
        for name, value in attrs.items():
            if value is None:
                continue
            if isinstance(value, list):
                kind = "categories"
            elif isinstance(value, bool):
                kind = "boolean"
            elif isinstance(value, int | float):
                kind = "number"
            elif isinstance(value, str):
                kind = "string"
            else:
                raise InvalidAttributes(f"attribute {name!r}: unsupported value {value!r:.80}")
            if schema.setdefault(name, kind) != kind:
                raise InvalidAttributes(f"attribute {name!r} is given as {schema[name]} and as {kind}")
    return check_schema(schema)
