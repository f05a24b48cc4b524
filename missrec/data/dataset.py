"""Load a dataset directory in the MISSRec/UniSRec atomic format, with clear errors for broken files.

Layout of a directory for dataset ``<Name>``::

    <Name>.{train,valid,test}.inter   TSV: user_id:token, item_id_list:token_seq, item_id:token
    <Name>.item2index                 TSV: original_id <TAB> index (0-based); same for <Name>.user2index
    <Name>.text                       optional TSV: item_id:token, text:token_seq (or text:json: each text a JSON
                                      string, written when a text has a line break or edge spaces)
    <Name>.feat1CLS / .feat3CLS       text / image features: raw little-endian float32 [n_items, width]
    <Name>.feat1CLS.worddrop          optional: text features of word-dropped texts (pre-training)

At least one feature file should exist for MISSRec (SASRec and popularity need none). The feature width is derived
from the file size and the item count, so any width works.

Internally item ids are shifted by one: row 0 of every item table is padding, item index ``i`` in the files is
internal id ``i + 1``. Histories are left-aligned (real items first, 0-padding after), truncated to the last
``max_len`` items.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

MODALITY_SUFFIXES: dict[str, str] = {"text": ".feat1CLS", "image": ".feat3CLS"}
SPLITS = ("train", "valid", "test")
INTER_HEADER = ("user_id:token", "item_id_list:token_seq", "item_id:token")
MAX_LEN = 50


class DatasetError(ValueError):
    """A dataset directory is missing files or holds files that do not parse or do not agree."""


@dataclass(frozen=True)
class Interactions:
    """One split: row r says user ``users[r]`` with history ``histories[r, :lengths[r]]`` next chose ``targets[r]``.

    Shapes: users, lengths, targets (R,); histories (R, L) int64 internal item ids, 0 = padding.
    """

    users: np.ndarray
    histories: np.ndarray
    lengths: np.ndarray
    targets: np.ndarray

    def __len__(self) -> int:
        return int(self.targets.shape[0])

    def subset(self, rows: np.ndarray) -> Interactions:
        """Rows selected by a boolean mask or an index array."""
        return Interactions(self.users[rows], self.histories[rows], self.lengths[rows], self.targets[rows])

    def sample(self, n: int, seed: int) -> Interactions:
        """``n`` rows drawn without replacement by ``seed``, in their order; all rows for n = 0 or n >= their number
        (the bounded validation and test of a large catalogue: the same rows for the same n and seed)."""
        if not 0 < n < len(self):
            return self
        return self.subset(np.sort(np.random.default_rng(seed).choice(len(self), n, replace=False)))

    @staticmethod
    def from_lists(users: list[int], histories: list[list[int]], targets: list[int], max_len: int) -> Interactions:
        """Build from Python lists of internal ids, keeping the last ``max_len`` items of each history."""
        n = len(targets)
        hist = np.zeros((n, max_len), dtype=np.int64)
        lengths = np.zeros(n, dtype=np.int64)
        for r, full in enumerate(histories):
            h = full[-max_len:]
            hist[r, : len(h)] = h
            lengths[r] = len(h)
        return Interactions(
            np.asarray(users, dtype=np.int64).reshape(n),
            hist,
            lengths,
            np.asarray(targets, dtype=np.int64).reshape(n),
        )


@dataclass(frozen=True)
class SeqDataset:
    """A loaded dataset. ``features[m]`` is (n_items + 1, width_m) float32 with row 0 all zeros."""

    name: str
    path: Path
    item_ids: tuple[str, ...]
    user_ids: tuple[str, ...]
    features: dict[str, np.ndarray]
    train: Interactions
    valid: Interactions
    test: Interactions
    fingerprint: str
    texts: tuple[str, ...] | None = None
    max_len: int = MAX_LEN
    extra: dict[str, object] = field(default_factory=dict)

    @property
    def num_items(self) -> int:
        """Rows of every item table, padding row 0 included."""
        return len(self.item_ids) + 1

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(m for m in MODALITY_SUFFIXES if m in self.features)

    def split(self, name: str) -> Interactions:
        if name not in SPLITS:
            raise KeyError(f"unknown split {name!r}; expected one of {SPLITS}")
        return getattr(self, name)

    def item_index(self) -> dict[str, int]:
        """External item id -> internal id (1-based)."""
        return {item: i + 1 for i, item in enumerate(self.item_ids)}


def find_dataset_name(path: Path) -> str:
    """The ``<Name>`` of the single ``<Name>.train.inter`` file in ``path``."""
    if not path.is_dir():
        raise DatasetError(f"dataset directory {path} does not exist")
    names = sorted(p.name[: -len(".train.inter")] for p in path.glob("*.train.inter"))
    if not names:
        raise DatasetError(f"no <Name>.train.inter file in {path}")
    if len(names) > 1:
        raise DatasetError(f"several datasets in {path} ({', '.join(names)}); pass the name explicitly")
    return names[0]


def _require(path: Path) -> Path:
    if not path.is_file():
        raise DatasetError(f"missing file {path}")
    return path


def _read_index(path: Path, what: str) -> tuple[str, ...]:
    """Read ``original_id<TAB>index`` lines; the indexes must be exactly 0..n-1."""
    pairs: list[tuple[str, int]] = []
    with _require(path).open(encoding="utf-8") as fh:
        for lineno, raw in enumerate(fh, 1):
            line = raw.rstrip("\n")
            if not line:
                continue
            parts = line.split("\t")
            if len(parts) != 2:
                raise DatasetError(f"{path}:{lineno}: expected 'id<TAB>index', got {line[:80]!r}")
            try:
                pairs.append((parts[0], int(parts[1])))
            except ValueError:
                raise DatasetError(f"{path}:{lineno}: index {parts[1][:40]!r} is not an integer") from None
    if not pairs:
        raise DatasetError(f"{path} holds no {what}")
    ids = [""] * len(pairs)
    for original, idx in pairs:
        if not 0 <= idx < len(pairs) or ids[idx]:
            raise DatasetError(
                f"{path}: {what} indexes must be a permutation of 0..{len(pairs) - 1}; bad or repeated index {idx}"
            )
        ids[idx] = original
    return tuple(ids)


def _read_inter(path: Path, n_items: int, n_users: int, max_len: int) -> Interactions:
    users: list[int] = []
    histories: list[list[int]] = []
    targets: list[int] = []
    with _require(path).open(encoding="utf-8") as fh:
        header = tuple(fh.readline().rstrip("\n").split("\t"))
        if header != INTER_HEADER:
            raise DatasetError(f"{path}: header {header} != expected {INTER_HEADER}")
        for lineno, raw in enumerate(fh, 2):
            line = raw.rstrip("\n")
            if not line:
                continue
            parts = line.split("\t")
            if len(parts) != 3:
                raise DatasetError(f"{path}:{lineno}: expected 3 tab-separated fields, got {len(parts)}")
            try:
                user = int(parts[0])
                hist = [int(x) for x in parts[1].split()]
                target = int(parts[2])
            except ValueError:
                raise DatasetError(f"{path}:{lineno}: ids must be integers") from None
            if not 0 <= user < n_users:
                raise DatasetError(f"{path}:{lineno}: user id {user} out of range [0, {n_users})")
            for item in (*hist, target):
                if not 0 <= item < n_items:
                    raise DatasetError(f"{path}:{lineno}: item id {item} out of range [0, {n_items})")
            if not hist:
                raise DatasetError(f"{path}:{lineno}: empty history")
            users.append(user)
            histories.append([i + 1 for i in hist])
            targets.append(target + 1)
    if not targets:
        raise DatasetError(f"{path} holds no interactions")
    return Interactions.from_lists(users, histories, targets, max_len)


def read_features(path: Path, n_items: int) -> np.ndarray:
    """Raw float32 [n_items, width] -> (n_items + 1, width) with a zero padding row 0."""
    size = path.stat().st_size
    if size == 0 or size % (4 * n_items) != 0:
        raise DatasetError(
            f"{path}: size {size} bytes is not a positive multiple of 4 * {n_items} items "
            "(raw float32 [n_items, width] expected)"
        )
    width = size // (4 * n_items)
    raw = np.fromfile(path, dtype="<f4").reshape(n_items, width)
    if not np.isfinite(raw).all():
        bad = int((~np.isfinite(raw)).any(axis=1).sum())
        raise DatasetError(f"{path}: {bad} rows contain NaN or inf")
    out = np.zeros((n_items + 1, width), dtype=np.float32)
    out[1:] = raw
    return out


TEXT_HEADER = "item_id:token\ttext:token_seq\n"
# Texts with line breaks or edge spaces: each one a JSON string on its line, read back exactly.
TEXT_HEADER_JSON = "item_id:token\ttext:json\n"


def _plain_text(text: str) -> bool:
    """True when ``text`` survives the line-oriented plain .text format (no line break, no edge whitespace)."""
    return "\n" not in text and "\r" not in text and text == text.strip()


def _read_texts(path: Path, item_ids: tuple[str, ...]) -> tuple[str, ...]:
    by_id: dict[str, str] = {}
    with path.open(encoding="utf-8", newline="\n") as fh:
        as_json = fh.readline().rstrip("\r\n") == TEXT_HEADER_JSON.rstrip("\n")  # else: text:token_seq
        for number, line in enumerate(fh, start=2):
            item, _, text = line.rstrip("\n").partition("\t")
            if not item:
                continue
            if as_json:
                try:
                    by_id[item] = str(json.loads(text))
                except ValueError:
                    raise DatasetError(f"{path}:{number}: the text is not a JSON string") from None
            else:
                by_id[item] = text.strip()
    return tuple(by_id.get(item, "") for item in item_ids)


def fingerprint_files(paths: list[Path]) -> str:
    """sha256 over the names and bytes of the given files (stable order)."""
    digest = hashlib.sha256()
    for p in sorted(paths, key=lambda q: q.name):
        digest.update(p.name.encode())
        digest.update(b"\0")
        with p.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def load_dataset(path: str | Path, name: str | None = None, max_len: int = MAX_LEN) -> SeqDataset:
    """Load and validate ``path/<name>.*``; raises :class:`DatasetError` with the file and reason on any problem."""
    path = Path(path)
    name = name or find_dataset_name(path)
    base = path / name
    item_ids = _read_index(Path(f"{base}.item2index"), "item")
    user_ids = _read_index(Path(f"{base}.user2index"), "user")
    splits = {s: _read_inter(Path(f"{base}.{s}.inter"), len(item_ids), len(user_ids), max_len) for s in SPLITS}
    features: dict[str, np.ndarray] = {}
    files = [Path(f"{base}.{s}.inter") for s in SPLITS]
    files += [Path(f"{base}.item2index"), Path(f"{base}.user2index")]
    for modality, suffix in MODALITY_SUFFIXES.items():
        fpath = Path(f"{base}{suffix}")
        if fpath.is_file():
            features[modality] = read_features(fpath, len(item_ids))
            files.append(fpath)
    if not features:
        log.warning(
            "dataset %s has no feature files (%s): only ID models can train on it",
            name,
            ", ".join(MODALITY_SUFFIXES.values()),
        )
    extra: dict[str, object] = {}
    worddrop = Path(f"{base}{MODALITY_SUFFIXES['text']}.worddrop")
    if worddrop.is_file():  # optional: text features of word-dropped texts, for pre-training augmentation
        extra["text_worddrop"] = read_features(worddrop, len(item_ids))
    text_path = Path(f"{base}.text")
    texts = _read_texts(text_path, item_ids) if text_path.is_file() else None
    return SeqDataset(
        name=name,
        path=path,
        item_ids=item_ids,
        user_ids=user_ids,
        features=features,
        train=splits["train"],
        valid=splits["valid"],
        test=splits["test"],
        fingerprint=fingerprint_files(files),
        texts=texts,
        max_len=max_len,
        extra=extra,
    )


# ----- writing ------------------------------------------------------------------------------------------------
def split_leave_one_out(sequences: list[list[int]], max_len: int) -> dict[str, list[tuple[int, list[int], int]]]:
    """Rows ``(user, history, target)`` per split; every sequence has >= 3 items."""
    splits: dict[str, list[tuple[int, list[int], int]]] = {"train": [], "valid": [], "test": []}
    for user, seq in enumerate(sequences):
        n = len(seq)
        for k in range(n - 3, 0, -1):  # targets seq[1..n-3]: every prefix of seq[:-2], longest first
            splits["train"].append((user, seq[max(0, k - max_len) : k], seq[k]))
        splits["valid"].append((user, seq[: n - 2][-max_len:], seq[n - 2]))
        splits["test"].append((user, seq[: n - 1][-max_len:], seq[n - 1]))
    return splits


def write_atomic(path: Path, data: str | bytes) -> None:
    """Write via a temporary file and an atomic rename."""
    tmp = path.with_name(path.name + ".tmp")
    if isinstance(data, str):
        tmp.write_text(data, encoding="utf-8")
    else:
        tmp.write_bytes(data)
    os.replace(tmp, path)


def write_dataset(
    base: Path,
    splits: dict[str, list[tuple[int, list[int], int]]],
    user_ids: list[str],
    item_ids: list[str],
    texts: list[str | None],
    feats: dict[str, np.ndarray],
) -> None:
    """Write ``<base>.*`` in the atomic format: rows (user index, history, target) of 0-based item indices per
    split; ``item_ids``, ``texts`` and the rows of ``feats`` (one array per modality) in item-index order."""
    header = "\t".join(INTER_HEADER) + "\n"
    for split, rows in splits.items():
        lines = [f"{u}\t{' '.join(map(str, h))}\t{t}\n" for u, h, t in rows]
        write_atomic(Path(f"{base}.{split}.inter"), header + "".join(lines))
    write_atomic(Path(f"{base}.item2index"), "".join(f"{item}\t{k}\n" for k, item in enumerate(item_ids)))
    write_atomic(Path(f"{base}.user2index"), "".join(f"{u}\t{k}\n" for k, u in enumerate(user_ids)))
    plain = [text or "" for text in texts]
    if all(_plain_text(text) for text in plain):
        lines = "".join(f"{item}\t{text}\n" for item, text in zip(item_ids, plain, strict=True))
        write_atomic(Path(f"{base}.text"), TEXT_HEADER + lines)
    else:  # a line break would shift texts onto other items: every text as a JSON string instead
        lines = "".join(f"{item}\t{json.dumps(text)}\n" for item, text in zip(item_ids, plain, strict=True))
        write_atomic(Path(f"{base}.text"), TEXT_HEADER_JSON + lines)
    for modality, suffix in MODALITY_SUFFIXES.items():
        if modality not in feats:
            continue
        write_atomic(Path(f"{base}{suffix}"), np.ascontiguousarray(feats[modality], dtype="<f4").tobytes())
