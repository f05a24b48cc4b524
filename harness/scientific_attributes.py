"""Write an atomic-format ``<Name>.attr`` for the Amazon Scientific data from what its ``.text`` holds.

Each Scientific text reads ``<title>. Industrial & Scientific <category path>. <brand>.`` (checked: lines that do
not match are counted and get no attributes). Derived per item:

- ``brand`` (string): the last sentence;
- ``categories`` (categories): the prefixes of the category path (whole words, without the common root
  ``Industrial & Scientific``) that at least ``--min-items`` items share, dropping a prefix whose items are exactly
  those of a longer one (the path has no separators, so shared prefixes stand in for its levels);
- ``title_words`` (number): the number of words of the title.

Usage (never into ../shared: the file goes next to a copy of the dataset, or under runs/)::

    python -m harness.scientific_attributes --data ../shared/data/scientific --out runs/scientific-attr
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
from collections import Counter
from pathlib import Path

ROOT = "Industrial & Scientific "
LINE = re.compile(r"^(?P<title>.*)\. Industrial & Scientific (?P<path>.*?)\. (?P<brand>[^.]*?)\.?\s*$")


def derive(texts: dict[str, str], min_items: int = 10) -> tuple[dict[str, dict], int]:
    """item id -> attributes, and how many texts did not match the pattern."""
    parsed, unmatched = {}, 0
    for item, text in texts.items():
        m = LINE.match(text.strip())
        if m is None:
            unmatched += 1
            continue
        parsed[item] = (m["title"], m["path"].split(), m["brand"].strip())
    counts = Counter(" ".join(words[:i]) for _, words, _ in parsed.values() for i in range(1, len(words) + 1))
    out = {}
    for item, (title, words, brand) in parsed.items():
        prefixes = [" ".join(words[:i]) for i in range(1, len(words) + 1)]
        cats = [p for j, p in enumerate(prefixes) if counts[p] >= min_items
                and (j + 1 == len(prefixes) or counts[prefixes[j + 1]] < counts[p])]  # fmt: skip
        attrs: dict = {"title_words": len(title.split())}
        if brand:
            attrs["brand"] = brand
        if cats:
            attrs["categories"] = cats
        out[item] = attrs
    return out, unmatched


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, required=True, help="the dataset folder (read only)")
    ap.add_argument("--out", type=Path, required=True, help="a new folder: a copy of the dataset plus <Name>.attr")
    ap.add_argument("--min-items", type=int, default=10)
    args = ap.parse_args()
    (text_file,) = args.data.glob("*.text")
    name = text_file.name[: -len(".text")]
    texts = {}
    for line in text_file.read_text(encoding="utf-8").splitlines()[1:]:
        item, _, text = line.partition("\t")
        texts[item] = text
    attrs, unmatched = derive(texts, args.min_items)
    args.out.mkdir(parents=True, exist_ok=True)
    for f in args.data.iterdir():
        if f.is_file() and not (args.out / f.name).exists():
            shutil.copy2(f, args.out / f.name)
    with (args.out / f"{name}.attr").open("w", encoding="utf-8") as f:
        for item in texts:
            f.write(json.dumps({"item_id": item, "attributes": attrs.get(item, {})}) + "\n")
    brands = len({a.get("brand") for a in attrs.values()})
    cats = len({c for a in attrs.values() for c in a.get("categories", [])})
    print(f"{len(texts)} items, {unmatched} texts without the pattern, {brands} brands, {cats} categories")
    print(f"wrote {args.out / (name + '.attr')}")


if __name__ == "__main__":
    main()
