"""Turn a raw catalog (JSON lines) and an interaction log (CSV) into a MISSRec atomic dataset directory.

Inputs:

- items (JSON lines): one object per line, ``{"item_id": str, "text": str (optional), "image": path
  (optional)}``. Relative image paths are relative to the JSONL file's directory; URLs are refused (download
  the images first). Other keys are ignored with a warning. A repeated ``item_id`` is an error.
- interactions (CSV, header ``user_id,item_id,timestamp``; extra columns ignored): timestamps are numbers
  (e.g. unix seconds) or ISO 8601 date-times (naive ones taken as UTC), not both in one file. Repeated
  interactions are kept (they are real events).

Steps, each deterministic:

1. Rows whose item is not in the catalog are dropped (count logged). Catalog items never interacted with are
   not part of the dataset.
2. Iterative k-core: keep users with >= max(min_core, 3) interactions (3 = the leave-one-out minimum: one
   valid and one test target after a non-empty history) and items with >= min_core, until nothing changes.
3. Per user, a stable chronological sort (ties keep file order). Users are indexed in order of their first
   interaction in the time-sorted log; items in order of first appearance when reading the users' sequences
   in user-index order (so ids grow down the test file, like the shipped Scientific data).
4. Leave-one-out with seq = s_0..s_{n-1}: train = every prefix -> next item over seq[:-2] (longest prefix
   first, as in the Scientific files), valid = seq[:-2] -> s_{n-2}, test = seq[:-1] -> s_{n-1}; histories
   truncated to the last ``max_len`` items.
5. Features: one ``encode_item`` call per item on the image file's bytes, the same code path as online
   ingestion, so offline and online features of an item are bit-identical: the torch ``ClipEncoder`` or, with
   ``missrec prepare --clip-onnx DIR``, the exported ONNX graphs
   (:class:`~clip_features.onnx_encoder.OnnxClipEncoder`) that the service ingests with when ``MISSREC_CLIP_ONNX`` points at the same directory. Texts are
   whitespace-normalised first (the form written to ``<name>.text``); blank text or no image -> zero row.
   Images are all decoded up front, so every broken or missing image is reported at once, before the slow
   encoding starts: an error naming the items, or with ``allow_bad_images=True`` a zero image row for each
   (listed in the summary and logged). An image that exists but does not decode is never silently dropped.

Outputs, ``<name>.*`` in the layout of ``shared/data/scientific`` (read by :func:`missrec.data.dataset.load_dataset`):
``train/valid/test.inter``, ``item2index``, ``user2index``, ``text`` (item-index order), ``feat1CLS`` (text),
``feat3CLS`` (image), plus ``<name>.prepare.json``: the encoder identity (model, weights, checksum), options
and counts, so the service can check that it encodes cold-start items with the same CLIP.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import re
from collections import Counter
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from tqdm import tqdm

from clip_features.preprocess import ImageDecodeError, ItemEncoder, decode_image, file_sha256
from missrec.data.attributes import catalog_attributes, write_attr
from missrec.data.dataset import MAX_LEN, MODALITY_SUFFIXES, split_leave_one_out, write_atomic, write_dataset

log = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("user_id", "item_id", "timestamp")
CATALOG_KEYS = {"item_id", "text", "image", "attributes"}  # attributes: to <name>.attr (missrec.data.attributes)
MIN_USER_INTERACTIONS = 3  # leave-one-out needs a history, a valid target and a test target
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_MAX_LISTED = 20  # problems listed in one error message


class PrepareError(ValueError):
    """The raw inputs cannot be turned into a dataset; the message names the file, line or item."""


@dataclass(frozen=True)
class CatalogItem:
    item_id: str
    text: str | None  # whitespace-normalised; None when absent or blank
    image: Path | None  # resolved path; None when absent
    line: int


class Event(NamedTuple):
    user: str
    item: str
    timestamp: float | int
    line: int


@dataclass(frozen=True)
class PrepareSummary:
    """What :func:`prepare_dataset` wrote and what it dropped."""

    name: str
    out_dir: Path
    n_users: int
    n_items: int
    n_interactions: int
    n_train: int
    n_valid: int
    n_test: int
    dim: int
    rows_unknown_item: int  # log rows whose item is not in the catalog
    unknown_items: int  # distinct such items
    users_removed_by_kcore: int
    items_removed_by_kcore: int
    kcore_rounds: int
    items_without_text: int
    items_without_image: int
    bad_images: tuple[str, ...]  # item ids whose image was replaced by a zero row (allow_bad_images)
    files: tuple[Path, ...]

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["out_dir"] = str(self.out_dir)
        out["files"] = [str(p) for p in self.files]
        out["bad_images"] = list(self.bad_images)
        return out


def _clean_id(value: object, where: str) -> str:
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise PrepareError(f"{where}: id must be a string, got {value!r}")
    text = str(value).strip()
    if not text or any(c in text for c in "\t\r\n"):
        raise PrepareError(f"{where}: id {text!r} is empty or contains a tab or newline")
    return text


def _clean_text(value: object, where: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise PrepareError(f"{where}: 'text' must be a string or null, got {type(value).__name__}")
    text = " ".join(value.split())  # one line, single spaces: the form stored in <name>.text
    return text or None


def read_catalog(path: Path) -> dict[str, CatalogItem]:
    """Parse the items JSONL file; image paths are resolved (not opened)."""
    if not path.is_file():
        raise PrepareError(f"items file {path} does not exist")
    items: dict[str, CatalogItem] = {}
    unknown_keys: Counter[str] = Counter()
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise PrepareError(f"{where}: invalid JSON ({exc.msg})") from None
            if not isinstance(obj, dict):
                raise PrepareError(f"{where}: expected a JSON object, got {type(obj).__name__}")
            if "item_id" not in obj:
                raise PrepareError(f"{where}: missing 'item_id'")
            item_id = _clean_id(obj["item_id"], where)
            if item_id in items:
                raise PrepareError(f"{where}: duplicate item_id {item_id!r} (first on line {items[item_id].line})")
            unknown_keys.update(set(obj) - CATALOG_KEYS)
            image = obj.get("image")
            if image is not None:
                if not isinstance(image, str) or not image.strip():
                    raise PrepareError(f"{where}: 'image' must be a non-empty path or null, got {image!r}")
                if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", image):
                    raise PrepareError(
                        f"{where}: 'image' is a URL ({image}); URLs are never fetched, "
                        "download the images and give local paths"
                    )
                image = (path.parent / image).resolve()
            items[item_id] = CatalogItem(item_id, _clean_text(obj.get("text"), where), image, lineno)
    if not items:
        raise PrepareError(f"{path} holds no items")
    if unknown_keys:
        log.warning("%s: ignoring unknown keys %s", path, dict(unknown_keys))
    return items


def _parse_timestamp(raw: str, where: str) -> tuple[float | int, bool]:
    """-> (sortable value, is_iso)."""
    try:
        return int(raw), False  # exact for ms/us/ns epochs
    except ValueError:
        pass
    try:
        value = float(raw)
    except ValueError:
        try:
            moment = datetime.fromisoformat(raw)
        except ValueError:
            raise PrepareError(
                f"{where}: timestamp {raw[:40]!r} is neither a number nor an ISO 8601 date-time"
            ) from None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        return moment.timestamp(), True
    if not math.isfinite(value):
        raise PrepareError(f"{where}: timestamp {raw!r} is not finite")
    return value, False


def read_interactions(path: Path) -> list[Event]:
    """Parse the interactions CSV (header ``user_id,item_id,timestamp``, extra columns ignored)."""
    if not path.is_file():
        raise PrepareError(f"interactions file {path} does not exist")
    events: list[Event] = []
    kinds: set[bool] = set()
    with path.open(encoding="utf-8-sig", newline="") as fh:
        reader = csv.reader(fh)
        header = [h.strip() for h in next(reader, [])]
        missing = [c for c in REQUIRED_COLUMNS if c not in header]
        if missing:
            raise PrepareError(
                f"{path}: missing column(s) {', '.join(missing)} in header {header}; "
                f"expected {','.join(REQUIRED_COLUMNS)}"
            )
        cols = [header.index(c) for c in REQUIRED_COLUMNS]
        for row in reader:
            if not row or not any(field.strip() for field in row):
                continue
            where = f"{path}:{reader.line_num}"
            if len(row) != len(header):
                raise PrepareError(f"{where}: {len(row)} fields, header has {len(header)}")
            user, item, raw_ts = (row[c].strip() for c in cols)
            timestamp, is_iso = _parse_timestamp(raw_ts, where)
            kinds.add(is_iso)
            events.append(Event(_clean_id(user, where), _clean_id(item, where), timestamp, reader.line_num))
    if len(kinds) > 1:
        raise PrepareError(f"{path}: timestamps mix numbers and ISO 8601 date-times; use one format")
    if not events:
        raise PrepareError(f"{path} holds no interactions")
    return events


def kcore_filter(events: list[Event], min_user: int, min_item: int) -> tuple[list[Event], int]:
    """Drop users with < min_user and items with < min_item interactions until stable -> (events, rounds)."""
    rounds = 0
    while True:
        rounds += 1
        users = Counter(e.user for e in events)
        items = Counter(e.item for e in events)
        kept = [e for e in events if users[e.user] >= min_user and items[e.item] >= min_item]
        if len(kept) == len(events):
            return kept, rounds
        events = kept


def build_sequences(events: list[Event]) -> tuple[list[str], list[str], list[list[int]]]:
    """-> (user ids by index, item ids by index, per-user chronological item-index sequences)."""
    by_user: dict[str, list[str]] = {}
    for event in sorted(events, key=lambda e: (e.timestamp, e.line)):  # stable: file order breaks ties
        by_user.setdefault(event.user, []).append(event.item)
    item_index: dict[str, int] = {}
    sequences = []
    for seq in by_user.values():  # dicts keep insertion order = first interaction time
        sequences.append([item_index.setdefault(item, len(item_index)) for item in seq])
    return list(by_user), list(item_index), sequences


def _check_images(items: list[CatalogItem], max_pixels: int, progress: bool) -> dict[str, str]:
    """Decode every image once (cheap next to CLIP) -> {item_id: problem} for missing or broken ones."""
    bad: dict[str, str] = {}
    for item in tqdm(items, desc="checking images", unit="item", disable=not progress, leave=False):
        if item.image is None:
            continue
        try:
            decode_image(item.image.read_bytes(), max_pixels=max_pixels)
        except OSError as exc:
            bad[item.item_id] = f"{item.image}: cannot read ({exc.strerror or exc})"
        except ImageDecodeError as exc:
            bad[item.item_id] = f"{item.image}: {exc}"
    return bad


def prepare_dataset(
    items: Path,
    interactions: Path,
    out_dir: Path,
    encoder: ItemEncoder,
    *,
    name: str | None = None,
    min_core: int = 5,
    max_len: int = MAX_LEN,
    allow_bad_images: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> PrepareSummary:
    """Write ``out_dir/<name>.*`` from the raw catalog and log (see the module docstring for every rule).

    ``name`` defaults to the output folder's name. Raises :class:`PrepareError` on any input problem, before
    anything is written; existing dataset files are only replaced with ``overwrite=True``.
    """
    items, interactions, out_dir = Path(items), Path(interactions), Path(out_dir)
    name = name or out_dir.resolve().name
    if not _NAME_RE.fullmatch(name):
        raise PrepareError(f"dataset name {name!r} must match {_NAME_RE.pattern}")
    if min_core < 1 or max_len < 1:
        raise PrepareError(f"min_core ({min_core}) and max_len ({max_len}) must be >= 1")
    base = out_dir / name
    outputs = [Path(f"{base}.{s}.inter") for s in ("train", "valid", "test")]
    outputs += [
        Path(f"{base}{suffix}")
        for suffix in (".item2index", ".user2index", ".text", *MODALITY_SUFFIXES.values(), ".prepare.json")
    ]
    existing = [p.name for p in outputs if p.exists()]
    if existing and not overwrite:
        raise PrepareError(f"{out_dir} already holds {', '.join(existing)}; pass overwrite=True to replace")
    others = [p.name for p in out_dir.glob("*.train.inter") if p.name != f"{name}.train.inter"]
    if others:
        raise PrepareError(
            f"{out_dir} already holds another dataset ({', '.join(others)}); "
            "the loader expects one dataset per directory"
        )

    catalog = read_catalog(items)
    events = read_interactions(interactions)
    unknown = Counter(e.item for e in events if e.item not in catalog)
    if unknown:
        log.warning(
            "dropping %d interaction rows with %d item ids not in the catalog (e.g. %s)",
            sum(unknown.values()),
            len(unknown),
            ", ".join(list(unknown)[:5]),
        )
        events = [e for e in events if e.item in catalog]
    n_users_known, n_items_known = len({e.user for e in events}), len({e.item for e in events})
    min_user = max(min_core, MIN_USER_INTERACTIONS)
    events, rounds = kcore_filter(events, min_user, min_core)
    if not events:
        raise PrepareError(
            f"no interactions left after k-core filtering (users >= {min_user}, items >= "
            f"{min_core} interactions); lower min_core or provide more data"
        )
    user_ids, item_ids, sequences = build_sequences(events)
    log.info(
        "k-core (%d rounds): %d users, %d items, %d interactions (from %d users, %d known items)",
        rounds,
        len(user_ids),
        len(item_ids),
        len(events),
        n_users_known,
        n_items_known,
    )
    splits = split_leave_one_out(sequences, max_len)
    if not splits["train"]:
        raise PrepareError("no training rows: every user has exactly 3 interactions (need 4+ for one)")

    kept = [catalog[i] for i in item_ids]
    bad = _check_images(kept, encoder.max_image_pixels, progress)
    if bad:
        listing = "\n".join(f"  item {k}: {v}" for k, v in list(bad.items())[:_MAX_LISTED])
        more = f"\n  ... and {len(bad) - _MAX_LISTED} more" if len(bad) > _MAX_LISTED else ""
        if not allow_bad_images:
            raise PrepareError(
                f"{len(bad)} item image(s) cannot be used "
                f"(allow_bad_images=True gives them a zero image row):\n{listing}{more}"
            )
        log.warning("%d item image(s) replaced by zero rows:\n%s%s", len(bad), listing, more)

    feats = {m: np.zeros((len(kept), encoder.dim), dtype=np.float32) for m in MODALITY_SUFFIXES}
    for row, item in enumerate(tqdm(kept, desc="CLIP features", unit="item", disable=not progress)):
        try:
            image = None if item.image is None or item.item_id in bad else item.image.read_bytes()
            vectors = encoder.encode_item(item.text, image)
        except (OSError, ImageDecodeError) as exc:  # the file changed since it was checked
            raise PrepareError(f"item {item.item_id}: image {item.image}: {exc}") from exc
        for modality, vector in vectors.items():
            feats[modality][row] = vector

    out_dir.mkdir(parents=True, exist_ok=True)
    write_dataset(base, splits, user_ids, [it.item_id for it in kept], [it.text for it in kept], feats)
    write_attr(base, catalog_attributes(items), [it.item_id for it in kept])
    summary = PrepareSummary(
        name=name,
        out_dir=out_dir,
        n_users=len(user_ids),
        n_items=len(item_ids),
        n_interactions=len(events),
        n_train=len(splits["train"]),
        n_valid=len(splits["valid"]),
        n_test=len(splits["test"]),
        dim=encoder.dim,
        rows_unknown_item=sum(unknown.values()),
        unknown_items=len(unknown),
        users_removed_by_kcore=n_users_known - len(user_ids),
        items_removed_by_kcore=n_items_known - len(item_ids),
        kcore_rounds=rounds,
        items_without_text=sum(it.text is None for it in kept),
        items_without_image=sum(it.image is None for it in kept),
        bad_images=tuple(bad),
        files=tuple(outputs),
    )
    manifest = {
        "format": "missrec-atomic",
        "encoder": encoder.describe(),
        "options": {
            "min_core": min_core,
            "min_user_interactions": min_user,
            "max_len": max_len,
            "allow_bad_images": allow_bad_images,
        },
        "sources": {
            "items": {"file": items.name, "sha256": file_sha256(items)},
            "interactions": {"file": interactions.name, "sha256": file_sha256(interactions)},
        },
        "summary": {k: v for k, v in summary.to_dict().items() if k not in {"out_dir", "files"}},
    }
    write_atomic(Path(f"{base}.prepare.json"), json.dumps(manifest, indent=2) + "\n")
    log.info(
        "wrote dataset %s to %s: %d users, %d items, %d/%d/%d train/valid/test rows",
        name,
        out_dir,
        summary.n_users,
        summary.n_items,
        summary.n_train,
        summary.n_valid,
        summary.n_test,
    )
    return summary
