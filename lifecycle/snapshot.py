"""A training dataset from a deployment: every user history and every live item in Redis, in the atomic format.

``missrec snapshot --redis URL [--cluster] --bundle CURRENT --data DIR --out OUT [--merge OLD]`` reads (never
writes) the service's keys (``service.store``):

- **histories**: SCAN over ``P:u:*:hist`` (on every primary of a Redis Cluster), LRANGE pipelined per batch of
  keys, with the user id from ``P:u:{tag}:id`` (histories written before the service stored ids are named
  ``h:<tag>``). Each history is sorted by timestamp (stable: the list order breaks ties). Only the user index,
  item indices and one timestamp per event are held, never the raw replies of more than one batch.
- **items**: the bundle's items, then the ingested ones in version order. A bundle item keeps the frozen raw
  features of the dataset the bundle was built from (``--data``; its item ids must be the bundle's), an ingested
  item gets the raw CLIP features the service stored at ingest (``feature_<m>``). Deleted items (tombstones, of
  bundle or ingested items) are left out, and so are the events on them and on ids the catalogue never held.
- **split**: per user, chronological leave-one-out as ``missrec prepare`` does (last event test, the one before
  valid, every earlier prefix train); users with fewer than 3 events are counted and left out.
- **merge** (``--merge OLD``): the histories of an older dataset in the atomic format (e.g. the previous
  snapshot, or the dataset the bundle was trained on) come first; a user's Redis history is appended after the
  longest overlap between the end of the old sequence and the start of the Redis list, so events that aged out of
  the capped list are kept and events present in both are not doubled. Old user ids are matched by the id itself.

The output is deterministic for the same Redis contents (users sorted by id, items in bundle then version order):
every file but ``snapshot.json``'s ``created_at`` is byte-identical. It is written to a temporary folder next to
``OUT`` and renamed into place, then loaded back with :func:`missrec.data.load_dataset`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import numpy as np
import redis
from redis.cluster import RedisCluster
from tqdm import tqdm

from missrec.data.dataset import (
    DatasetError,
    SeqDataset,
    load_dataset,
    split_leave_one_out,
    write_atomic,
    write_dataset,
)
from service.store import ItemRecord, ItemStore, parse_history_entry
from serving_core.bundle import read_bundle

SNAPSHOT_FILE = "snapshot.json"
FORMAT = "missrec-snapshot"
MIN_EVENTS = 3  # test + valid + one training target need three events
SCAN_COUNT = 1000
MAX_USER_EVENTS = 10_000  # most events read per user (the service keeps the serving model's max_len, ~50)
BAD_EXAMPLES = 5
DELETED, UNKNOWN = -1, -2  # history events on a deleted item, or on an id the catalogue never held


class SnapshotError(ValueError):
    """The deployment cannot be turned into a dataset (wrong bundle or dataset, unreadable Redis contents)."""


@dataclass
class Counts:
    users_seen: int = 0
    users_written: int = 0
    users_too_short: int = 0
    users_merged: int = 0
    events_read: int = 0
    events_written: int = 0
    events_on_deleted_items: int = 0
    events_on_unknown_items: int = 0
    events_from_merge: int = 0
    bundle_items: int = 0
    ingested_items: int = 0
    deleted_items_left_out: int = 0
    items_missing_a_modality: int = 0
    events_beyond_cap: int = 0
    bad_records: int = 0
    rows: dict[str, int] = field(default_factory=dict)


@dataclass
class BadRecords:
    """Redis contents the snapshot skipped (a malformed history or item record): how many, and the first reasons."""

    count: int = 0
    examples: list[str] = field(default_factory=list)

    def add(self, why: str) -> None:
        self.count += 1
        if len(self.examples) < BAD_EXAMPLES:
            self.examples.append(why)


def redacted(url: str) -> str:
    """The URL without its password (it goes into snapshot.json)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username or ''}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def connect(url: str, cluster: bool) -> redis.Redis | RedisCluster:
    return RedisCluster.from_url(url) if cluster else redis.Redis.from_url(url)


def _glob_escape(text: str) -> str:
    return "".join(f"\\{c}" if c in "*?[]\\" else c for c in text)


def scan_histories(
    client: redis.Redis | RedisCluster,
    prefix: str,
    batch: int = 500,
    progress: bool = False,
    max_events: int = 10_000,
    bad: BadRecords | None = None,
) -> Iterator[tuple[str, list[tuple[float | None, str]], int]]:
    """(user id, [(timestamp, item id), ...] in list order, events left out) for every history under ``prefix``,
    read in pipelined batches of ``batch`` keys (SCAN runs on every primary of a cluster). At most the last
    ``max_events`` entries of a list are read (the service keeps far fewer), so one user costs bounded memory.
    A history that is not a list of well-formed entries, or a user id that is not UTF-8, is skipped and counted in
    ``bad`` (with the first few reasons), never raised."""
    match = f"{_glob_escape(prefix)}:u:*:hist"
    keys: list[bytes] = []
    bad = bad if bad is not None else BadRecords()
    bar = tqdm(desc="user histories", unit="user", disable=not progress)

    def flush() -> Iterator[tuple[str, list[tuple[float | None, str]], int]]:
        pipe = client.pipeline(transaction=False)
        for key in keys:
            pipe.llen(key)
            pipe.lrange(key, -max_events, -1)
            pipe.get(key[: -len(b"hist")] + b"id")
        replies = pipe.execute(raise_on_error=False)
        for key, length, entries, user in zip(keys, replies[::3], replies[1::3], replies[2::3], strict=True):
            try:
                for reply in (length, entries, user):
                    if isinstance(reply, Exception):
                        raise ValueError(f"{type(reply).__name__}: {reply}")
                tag = key.decode("utf-8", "backslashreplace").rsplit(":", 2)[-2].strip("{}")
                name = user.decode() if user is not None else f"h:{tag}"
                events = [parse_history_entry(e) for e in entries]
            except (ValueError, UnicodeDecodeError) as exc:
                bad.add(f"history {key.decode('utf-8', 'backslashreplace')!r}: {exc}")
                continue
            yield name, events, max(int(length) - len(entries), 0)
        bar.update(len(keys))
        keys.clear()

    for key in client.scan_iter(match=match, count=SCAN_COUNT):
        keys.append(key)
        if len(keys) >= batch:
            yield from flush()
    if keys:
        yield from flush()
    bar.close()


def read_items(
    client: redis.Redis | RedisCluster, store: ItemStore, batch: int = 500, bad: BadRecords | None = None
) -> list[ItemRecord]:
    """Every stored item change (latest per id), in version order (deterministic). A record that does not parse
    (or whose id is not UTF-8) is skipped and counted in ``bad``."""
    bad = bad if bad is not None else BadRecords()
    ids = []
    for raw in client.zrange(store.ids_key, 0, -1):
        try:
            ids.append(raw.decode())
        except UnicodeDecodeError:
            bad.add(f"item id {raw!r} is not UTF-8")
    records = []
    for start in range(0, len(ids), batch):
        chunk = ids[start : start + batch]
        pipe = client.pipeline(transaction=False)
        for item_id in chunk:
            pipe.hgetall(store.item_prefix + item_id)
        for item_id, data in zip(chunk, pipe.execute(raise_on_error=False), strict=True):
            try:
                if isinstance(data, Exception):
                    raise ValueError(f"{type(data).__name__}: {data}")
                if data:
                    records.append(ItemRecord.from_hash(item_id, data))
            except (ValueError, UnicodeDecodeError) as exc:
                bad.add(f"item {item_id!r}: {exc}")
    return records


def old_sequences(ds: SeqDataset) -> dict[str, list[str]]:
    """User id -> full item-id sequence of a dataset in the atomic format, rebuilt from its leave-one-out rows
    (every train target, the valid and test targets, after the first history item); checked against every row."""
    rows: dict[int, list[tuple[np.ndarray, int]]] = {}
    for split in (ds.train, ds.valid, ds.test):
        for u, h, n, t in zip(split.users, split.histories, split.lengths, split.targets, strict=True):
            rows.setdefault(int(u), []).append((h[:n], int(t)))
    out: dict[str, list[str]] = {}
    for u, user_rows in rows.items():
        # the history lengths grow with the target's position until max_len; past that, the windows slide
        user_rows.sort(key=lambda r: len(r[0]))
        shortest = user_rows[0][0]
        if len(shortest) != 1:
            raise SnapshotError(f"{ds.path}: user {ds.user_ids[u]} has no one-item history; not leave-one-out rows")
        seq = _chain(user_rows, ds.max_len)
        if seq is None:
            raise SnapshotError(f"{ds.path}: the rows of user {ds.user_ids[u]} do not form one sequence")
        out[ds.user_ids[u]] = [ds.item_ids[i - 1] for i in seq]
    return out


def _chain(user_rows: list[tuple[np.ndarray, int]], max_len: int) -> list[int] | None:
    """Order a user's (history, target) rows into the sequence they are windows of, or None when they are not."""
    pending = {(tuple(h.tolist()), t) for h, t in user_rows}
    seq = list(user_rows[0][0].tolist())
    while pending:
        window = tuple(seq[-max_len:])
        nxt = [r for r in pending if r[0] == window]
        if len(nxt) != 1:
            return None
        pending.discard(nxt[0])
        seq.append(nxt[0][1])
    return seq


def merge_sequence(old: np.ndarray, new: np.ndarray) -> np.ndarray:
    """old then new without the longest overlap (a suffix of old equal to a prefix of new)."""
    for n in range(min(len(old), len(new)), 0, -1):
        if np.array_equal(old[-n:], new[:n]):
            return np.concatenate([old, new[n:]])
    return np.concatenate([old, new])


@dataclass(frozen=True)
class Snapshot:
    out: Path
    manifest: dict[str, Any]
    dataset: SeqDataset


def take_snapshot(
    redis_url: str,
    bundle: Path,
    data: Path,
    out: Path,
    *,
    prefix: str = "missrec",
    cluster: bool = False,
    merge: Path | None = None,
    name: str = "Snapshot",
    overwrite: bool = False,
    progress: bool = False,
    max_user_events: int = MAX_USER_EVENTS,
) -> Snapshot:
    """Write the dataset of the deployment at ``redis_url`` (served by ``bundle``, built from ``data``) to ``out``."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise SnapshotError(f"{out} already exists (pass overwrite to replace it)")
    started = time.time()
    loaded = read_bundle(bundle)
    manifest = loaded.manifest
    base = load_dataset(data)
    bundle_ids = list(loaded.table.ids[1:])
    if list(base.item_ids) != bundle_ids:
        raise SnapshotError(
            f"{data} is not the dataset bundle {manifest.version} was built from: its item ids differ "
            f"({len(base.item_ids)} items there, {len(bundle_ids)} in the bundle)"
        )
    old = old_sequences(load_dataset(merge)) if merge is not None else {}

    client = connect(redis_url, cluster)
    store = ItemStore(client, prefix)  # type: ignore[arg-type]  # only its key names are used
    counts = Counts()
    bad = BadRecords()
    try:
        records = read_items(client, store, bad=bad)
        # ----- the live catalogue: bundle items (not deleted), then ingested ones in version order ----------
        changed = {r.item_id: r for r in records}
        modalities = base.modalities
        item_ids: list[str] = []
        texts: list[str | None] = []
        rows: dict[str, list[np.ndarray]] = {m: [] for m in modalities}
        base_texts = base.texts or ("",) * len(base.item_ids)
        for row, item_id in enumerate(base.item_ids, start=1):
            record = changed.get(item_id)
            if record is not None and record.deleted:
                counts.deleted_items_left_out += 1
                continue
            if record is not None:  # re-ingested over a bundle id: the stored raw features rule, as in the service
                continue
            item_ids.append(item_id)
            texts.append(base_texts[row - 1])
            for m in modalities:
                rows[m].append(base.features[m][row])
            counts.bundle_items += 1
        in_bundle = set(base.item_ids)
        for record in records:
            if record.deleted:
                if record.item_id not in in_bundle:
                    counts.deleted_items_left_out += 1
                continue
            vectors: dict[str, np.ndarray] = {}
            for m in modalities:
                width = base.features[m].shape[1]
                raw = record.arrays.get(f"feature_{m}")
                if raw is None:
                    continue
                vec = np.frombuffer(raw[: len(raw) - len(raw) % 4], dtype=np.float32)
                if len(raw) % 4 or vec.shape != (width,):
                    bad.add(f"item {record.item_id!r}: {len(raw)} bytes of {m} features, the dataset's are {width}-d")
                    break
                vectors[m] = vec
            else:
                item_ids.append(record.item_id)
                texts.append(record.text)
                for m in modalities:
                    rows[m].append(vectors.get(m, np.zeros(base.features[m].shape[1], np.float32)))
                counts.items_missing_a_modality += len(vectors) < len(modalities)
                counts.ingested_items += record.item_id not in in_bundle
        index = {item: k for k, item in enumerate(item_ids)}
        deleted = {r.item_id for r in records if r.deleted}

        # ----- histories, held as item indices (DELETED / UNKNOWN for events the catalogue cannot use) ----------
        def encode(items: list[str]) -> np.ndarray:
            return np.fromiter(
                (index.get(i, DELETED if i in deleted else UNKNOWN) for i in items), dtype=np.int32, count=len(items)
            )

        sequences: dict[str, np.ndarray] = {}
        histories = scan_histories(client, prefix, progress=progress, max_events=max_user_events, bad=bad)
        for user, events, beyond in histories:
            counts.users_seen += 1
            counts.events_read += len(events)
            counts.events_beyond_cap += beyond
            order = sorted(range(len(events)), key=lambda j: (events[j][0] or 0.0, j))  # stable: list order
            sequences[user] = encode([events[j][1] for j in order])
    finally:
        client.close()

    for user, seq in old.items():
        old_seq = encode(seq)
        counts.events_from_merge += len(seq)
        if user in sequences:
            counts.users_merged += 1
            sequences[user] = merge_sequence(old_seq, sequences[user])
        else:
            sequences[user] = old_seq

    user_ids: list[str] = []
    kept: list[list[int]] = []
    for user in sorted(sequences):
        seq = sequences[user]
        counts.events_on_deleted_items += int((seq == DELETED).sum())
        counts.events_on_unknown_items += int((seq == UNKNOWN).sum())
        usable = seq[seq >= 0].tolist()
        if len(usable) < MIN_EVENTS:
            counts.users_too_short += 1
            continue
        user_ids.append(user)
        kept.append(usable)
        counts.events_written += len(usable)
    counts.users_written = len(user_ids)
    counts.bad_records = bad.count
    if not kept:
        raise SnapshotError(f"no user in {redacted(redis_url)} (prefix {prefix!r}) has {MIN_EVENTS}+ usable events")
    splits = split_leave_one_out(kept, base.max_len)
    counts.rows = {split: len(r) for split, r in splits.items()}
    feats = {m: np.stack(rows[m]).astype(np.float32) for m in modalities}

    info = {
        "format": FORMAT,
        "format_version": 1,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "redis": redacted(redis_url),
        "cluster": cluster,
        "prefix": prefix,
        "bundle": {"path": str(bundle), "version": manifest.version, "model_kind": manifest.model_kind},
        "data": {"path": str(data), "fingerprint": base.fingerprint},
        "merged": {"path": str(merge), "users": len(old)} if merge is not None else None,
        "counts": asdict(counts),
        "max_user_events": max_user_events,
        "bad_records": bad.examples,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        write_dataset(tmp / name, splits, user_ids, item_ids, texts, feats)
        try:
            ds = load_dataset(tmp)
        except DatasetError as exc:  # our own output must load; anything else is a bug worth a clear message
            raise SnapshotError(f"the snapshot does not load back: {exc}") from exc
        info["dataset"] = {"name": name, "fingerprint": ds.fingerprint}
        info["seconds"] = round(time.time() - started, 2)
        write_atomic(tmp / SNAPSHOT_FILE, json.dumps(info, indent=2, sort_keys=True) + "\n")
        tmp.chmod(0o755)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Snapshot(out, info, load_dataset(out))
