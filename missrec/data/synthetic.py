"""Deterministic SYNTHETIC multi-modal sequential-recommendation data in the atomic format of missrec.data.dataset.

Nothing here is real: every item, user, text and feature vector is drawn from a seeded random model. It exists
for the quick-start default (train without real data) and for scale tests.

The generative model: ``num_topics`` latent topics each get a random text centre and an independent random
image centre. Every item has a primary topic (and, with probability ``SECONDARY_TOPIC_P``, a secondary one);
its features are ``shared direction + topic centre(s) + item noise``, scaled so that row norms resemble real
CLIP ViT-B/32 features (about 8 for text, 10 for image; not L2-normalised) and same-topic items are clearly
more similar than cross-topic ones. Within a topic, item popularity is Zipf-like. Each user likes a few topics
(sparse Dirichlet weights); a sequence stays in its current topic with probability ``STAY_P``, otherwise jumps
to one of the user's topics, and rarely explores a random topic; the item is drawn by popularity within the
topic (repeats within a sequence avoided where possible). So the next item's topic is predictable from the
history and a content-based sequential model beats popularity.

Files written to ``out_dir`` for dataset ``<name>`` (see :mod:`missrec.data.dataset` for the formats):

- ``<name>.train.inter`` / ``.valid.inter`` / ``.test.inter``: chronological leave-one-out per user;
- ``<name>.item2index`` (``syn-item-000042<TAB>42``) and ``<name>.user2index`` (``syn-user-000007<TAB>7``);
- ``<name>.text``: one synthetic description per item;
- ``<name>.feat1CLS`` (text) and/or ``<name>.feat3CLS`` (image): raw little-endian float32 [num_items, dim],
  only for the requested modalities (a stale file of a modality not requested is removed);
- ``<name>.topics``: TSV ``item_index<TAB>topic<TAB>secondary_topic`` (-1 = none), the ground truth for tests;
  read it with :func:`read_topics`. :func:`missrec.data.dataset.load_dataset` ignores it;
- ``<name>.synthetic.json``: a manifest saying the data is synthetic, with the generator parameters.

Determinism: the same arguments give byte-identical files. Independent random streams (spawned from ``seed``)
drive the item/topic structure, the user sequences, the text features and the image features, so e.g. the text
features and the sequences do not change when ``modalities`` does.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from tqdm import tqdm

from missrec.data.dataset import INTER_HEADER, MODALITY_SUFFIXES
from missrec.data.synthetic_model import (
    FEATURE_NORMS,
    ITEM_SCALE_SIGMA,
    SECONDARY_WEIGHT,
    item_structure,
    unit_rows,
    user_sequences,
)

log = logging.getLogger(__name__)

ITEM_PREFIX = "syn-item-"
USER_PREFIX = "syn-user-"
TOPICS_HEADER = ("item_index", "topic", "secondary_topic")

FEATURE_CHUNK_ROWS = 32_768  # rows of features generated and written at a time
PROGRESS_MIN_ITEMS = 200_000  # auto progress bar from this many items on


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _validate(
    *,
    name: str,
    num_users: int,
    num_items: int,
    num_topics: int,
    text_dim: int,
    image_dim: int,
    modalities: Iterable[str],
    min_seq_len: int,
    max_seq_len: int,
    max_len: int,
    seed: int,
) -> tuple[str, ...]:
    """Raise ValueError on bad arguments; return the modalities in canonical order (text before image)."""
    if not isinstance(name, str) or not name or name.startswith(".") or any(c in name for c in "/\\\t\n "):
        raise ValueError(f"name must be a plain file-name stem (no path separators or spaces), got {name!r}")
    _check_int("num_users", num_users, 1)
    _check_int("num_items", num_items, 2)
    _check_int("num_topics", num_topics, 1)
    _check_int("text_dim", text_dim, 1)
    _check_int("image_dim", image_dim, 1)
    _check_int("min_seq_len", min_seq_len, 3)  # leave-one-out needs >= 1 history item before valid and test
    _check_int("max_seq_len", max_seq_len, 3)
    _check_int("max_len", max_len, 1)
    _check_int("seed", seed, 0)
    if num_topics > num_items:
        raise ValueError(f"num_topics ({num_topics}) must not exceed num_items ({num_items})")
    if max_seq_len < min_seq_len:
        raise ValueError(f"max_seq_len ({max_seq_len}) must be >= min_seq_len ({min_seq_len})")
    if isinstance(modalities, str):
        raise ValueError(f"modalities must be a tuple such as ('text',), not the string {modalities!r}")
    mods = tuple(modalities)
    unknown = [m for m in mods if m not in MODALITY_SUFFIXES]
    if unknown:
        raise ValueError(f"unknown modality {unknown[0]!r}; expected some of {tuple(MODALITY_SUFFIXES)}")
    if not mods:
        raise ValueError(f"modalities must name at least one of {tuple(MODALITY_SUFFIXES)}")
    if len(set(mods)) != len(mods):
        raise ValueError(f"modalities has repeated names: {mods}")
    return tuple(m for m in MODALITY_SUFFIXES if m in mods)


def write_features(
    path: Path,
    rng: np.random.Generator,
    *,
    modality: str,
    dim: int,
    topic: np.ndarray,
    secondary: np.ndarray,
    num_topics: int,
    progress: bool,
) -> None:
    """Write raw float32 [N, dim] features, FEATURE_CHUNK_ROWS rows at a time (never the whole matrix twice).

    Item noise is uniform per coordinate (same variance as the Gaussian it stands in for, about 4x cheaper to
    draw; over hundreds of dimensions the row norms and cosines behave the same).
    """
    shared_norm, topic_norm, noise_norm = FEATURE_NORMS[modality]
    num_items = topic.shape[0]
    shared = (unit_rows(rng.standard_normal(dim)) * shared_norm).astype(np.float32)  # (D,)
    centres = unit_rows(rng.standard_normal((num_topics, dim), dtype=np.float32))  # (T, D)
    centres *= np.float32(topic_norm)
    scale = rng.lognormal(0.0, ITEM_SCALE_SIGMA, size=num_items).astype(np.float32)  # (N,)
    noise_amp = np.float32(noise_norm / np.sqrt(dim) * np.sqrt(12.0))  # U[-a/2, a/2) has std a / sqrt(12)
    mix = np.float32(1.0 / np.sqrt(1.0 + SECONDARY_WEIGHT**2))
    chunk = min(FEATURE_CHUNK_ROWS, num_items)
    rows_buf = np.empty((chunk, dim), dtype=np.float32)  # (C, D), reused for every chunk
    noise_buf = np.empty((chunk, dim), dtype=np.float32)
    with path.open("wb") as fh:
        starts = range(0, num_items, chunk)
        for start in tqdm(starts, desc=f"synthetic {modality} features", unit="chunk", disable=not progress):
            stop = min(start + chunk, num_items)
            rows, noise = rows_buf[: stop - start], noise_buf[: stop - start]
            np.take(centres, topic[start:stop], axis=0, out=rows)
            sec = secondary[start:stop]
            has = np.flatnonzero(sec >= 0)
            if has.size:
                rows[has] = (rows[has] + np.float32(SECONDARY_WEIGHT) * centres[sec[has]]) * mix
            rows += shared
            rng.random(out=noise, dtype=np.float32)
            noise -= np.float32(0.5)
            noise *= noise_amp
            rows += noise
            rows *= scale[start:stop, None]
            rows.astype("<f4", copy=False).tofile(fh)


def _write_inter(path: Path, rows: Iterable[str]) -> None:
    with path.open("w", encoding="utf-8", newline="\n") as fh:
        fh.write("\t".join(INTER_HEADER) + "\n")
        fh.writelines(rows)


def _split_rows(seq: np.ndarray, lengths: np.ndarray, max_len: int) -> tuple[list[str], list[str], list[str]]:
    """Leave-one-out TSV rows per user, oldest first.

    train = every prefix -> next item over seq[:-2]; valid = seq[:-2] -> seq[-2]; test = seq[:-1] -> seq[-1].
    """
    train: list[str] = []
    valid: list[str] = []
    test: list[str] = []
    for user, (row, n) in enumerate(zip(seq.tolist(), lengths.tolist(), strict=True)):
        toks = [str(i) for i in row[:n]]
        for t in range(1, n):
            line = f"{user}\t{' '.join(toks[max(0, t - max_len) : t])}\t{toks[t]}\n"
            if t < n - 2:
                train.append(line)
            elif t == n - 2:
                valid.append(line)
            else:
                test.append(line)
    return train, valid, test


def _id_width(n: int) -> int:
    return max(6, len(str(n - 1)))


def generate_synthetic(
    out_dir: str | Path,
    *,
    name: str = "Synthetic",
    num_users: int = 2000,
    num_items: int = 1000,
    num_topics: int = 24,
    text_dim: int = 512,
    image_dim: int = 512,
    modalities: tuple[str, ...] = ("text", "image"),
    min_seq_len: int = 5,
    max_seq_len: int = 30,
    max_len: int = 50,
    seed: int = 0,
    progress: bool | None = None,
) -> Path:
    """Write a SYNTHETIC dataset ``out_dir/<name>.*`` (see the module docstring) and return ``out_dir``.

    Sequence lengths are uniform in [min_seq_len, max_seq_len]; histories in the files keep the last
    ``max_len`` items. ``progress=None`` shows a progress bar for the features from PROGRESS_MIN_ITEMS items
    on.
    Raises ValueError on bad arguments.
    """
    mods = _validate(
        name=name,
        num_users=num_users,
        num_items=num_items,
        num_topics=num_topics,
        text_dim=text_dim,
        image_dim=image_dim,
        modalities=modalities,
        min_seq_len=min_seq_len,
        max_seq_len=max_seq_len,
        max_len=max_len,
        seed=seed,
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    base = out / name
    show = num_items >= PROGRESS_MIN_ITEMS if progress is None else progress
    began = time.perf_counter()
    streams = np.random.SeedSequence(seed).spawn(4)
    rng_items, rng_users, rng_text, rng_image = (np.random.default_rng(s) for s in streams)

    topic, secondary, topic_weight, order, cdf = item_structure(rng_items, num_items, num_topics)
    seq, lengths = user_sequences(
        rng_users,
        num_users=num_users,
        num_topics=num_topics,
        topic_weight=topic_weight,
        order=order,
        cdf=cdf,
        min_seq_len=min_seq_len,
        max_seq_len=max_seq_len,
    )
    train, valid, test = _split_rows(seq, lengths, max_len)
    for split, rows in (("train", train), ("valid", valid), ("test", test)):
        _write_inter(Path(f"{base}.{split}.inter"), rows)

    iw, uw = _id_width(num_items), _id_width(num_users)
    with Path(f"{base}.item2index").open("w", encoding="utf-8", newline="\n") as fh:
        fh.writelines(f"{ITEM_PREFIX}{i:0{iw}d}\t{i}\n" for i in range(num_items))
    with Path(f"{base}.user2index").open("w", encoding="utf-8", newline="\n") as fh:
        fh.writelines(f"{USER_PREFIX}{u:0{uw}d}\t{u}\n" for u in range(num_users))
    with Path(f"{base}.text").open("w", encoding="utf-8", newline="\n") as fh:
        fh.write("item_id:token\ttext:token_seq\n")
        for i, (t, s) in enumerate(zip(topic.tolist(), secondary.tolist(), strict=True)):
            also = f", also synthetic topic {s}" if s >= 0 else ""
            fh.write(
                f"{ITEM_PREFIX}{i:0{iw}d}\tSynthetic item {i} of synthetic topic {t}{also}. "
                "Synthetic data, not a real product.\n"
            )
    with Path(f"{base}.topics").open("w", encoding="utf-8", newline="\n") as fh:
        fh.write("\t".join(TOPICS_HEADER) + "\n")
        fh.writelines(
            f"{i}\t{t}\t{s}\n" for i, (t, s) in enumerate(zip(topic.tolist(), secondary.tolist(), strict=True))
        )

    dims = {"text": text_dim, "image": image_dim}
    rngs = {"text": rng_text, "image": rng_image}
    for modality, suffix in MODALITY_SUFFIXES.items():
        fpath = Path(f"{base}{suffix}")
        if modality in mods:
            write_features(
                fpath,
                rngs[modality],
                modality=modality,
                dim=dims[modality],
                topic=topic,
                secondary=secondary,
                num_topics=num_topics,
                progress=show,
            )
        elif fpath.exists():
            log.info("removing stale %s (modality %r not requested)", fpath, modality)
            fpath.unlink()

    manifest = {
        "synthetic": True,
        "description": "SYNTHETIC data from missrec.data.synthetic: random topics, items, users and features; "
        "nothing here is real.",
        "generator": "missrec.data.synthetic.generate_synthetic",
        "params": {
            "name": name,
            "num_users": num_users,
            "num_items": num_items,
            "num_topics": num_topics,
            "text_dim": text_dim,
            "image_dim": image_dim,
            "modalities": list(mods),
            "min_seq_len": min_seq_len,
            "max_seq_len": max_seq_len,
            "max_len": max_len,
            "seed": seed,
        },
        "rows": {"train": len(train), "valid": len(valid), "test": len(test)},
        "feature_dims": {m: dims[m] for m in mods},
    }
    Path(f"{base}.synthetic.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    log.info(
        "wrote SYNTHETIC dataset %s: %d users, %d items, %d topics, %d train rows, modalities %s in %.1fs",
        base,
        num_users,
        num_items,
        num_topics,
        len(train),
        ",".join(mods),
        time.perf_counter() - began,
    )
    return out


def read_topics(path: str | Path, name: str = "Synthetic") -> tuple[np.ndarray, np.ndarray]:
    """Ground truth of a generated dataset: ``(topic, secondary)``, both (num_items,) int64.

    Indexed by item index (0-based, as in the files); ``secondary`` is -1 for items without a secondary topic.
    """
    fpath = Path(path) / f"{name}.topics"
    with fpath.open(encoding="utf-8") as fh:
        header = tuple(fh.readline().rstrip("\n").split("\t"))
        if header != TOPICS_HEADER:
            raise ValueError(f"{fpath}: header {header} != expected {TOPICS_HEADER}")
        table = np.loadtxt(fh, dtype=np.int64, delimiter="\t", ndmin=2)
    if not np.array_equal(table[:, 0], np.arange(table.shape[0])):
        raise ValueError(f"{fpath}: item indexes must be 0..n-1 in order")
    return table[:, 1].copy(), table[:, 2].copy()
