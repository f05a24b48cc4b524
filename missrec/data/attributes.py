"""Item attributes in the atomic format: ``<Name>.attr``, JSON lines ``{"item_id": str, "attributes": {...}}``.

``missrec prepare`` copies the ``"attributes"`` object of each catalog line into it, for the items it keeps; ``missrec
export`` carries it into the bundle, where the types are inferred and checked (serving_core.attribute_schema). Here
only the shape is checked: an object per item.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from missrec.data.dataset import write_atomic

ATTR_SUFFIX = ".attr"


def catalog_attributes(path: Path) -> dict[str, dict[str, Any]]:
    """item id -> the "attributes" object of its catalog line (lines without one are left out)."""
    out: dict[str, dict[str, Any]] = {}
    with Path(path).open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            obj = json.loads(line)
            attrs = obj.get("attributes")
            if attrs is None:
                continue
            if not isinstance(attrs, dict):
                raise ValueError(f"{path}:{lineno}: 'attributes' must be an object, got {type(attrs).__name__}")
            out[str(obj["item_id"]).strip()] = attrs
    return out


def write_attr(base: Path, attributes: dict[str, dict[str, Any]], item_ids: list[str]) -> None:
    """``<base>.attr`` for ``item_ids`` (in dataset order) when any of them has attributes; nothing otherwise."""
    if not any(i in attributes for i in item_ids):
        Path(f"{base}{ATTR_SUFFIX}").unlink(missing_ok=True)  # none left from an earlier run (overwrite)
        return
    lines = [json.dumps({"item_id": i, "attributes": attributes.get(i, {})}, ensure_ascii=False) for i in item_ids]
    write_atomic(Path(f"{base}{ATTR_SUFFIX}"), "\n".join(lines) + "\n")
