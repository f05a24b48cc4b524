"""Explanations that say something, torch-free: which history items a recommendation comes from, by leave-one-out.

"Because of": for a user with history h (oldest first) and recommended item rows R, leave each history item the
user tower reads out in turn and score R again with the same tower and scorer. The drop of item r's score when
position p is left out, ``score(h, r) - score(h without p, r)``, is the contribution of h[p] to r: positive when
the item pushed r up. It is faithful by construction (the model's own score, nothing approximated), and costs one
user-tower call over L variants of each explained history (L <= max_len), batched for all explained users.

The tower reads the last ``max_len`` items of a history; leaving one of them out lets the next older item in, as
it would if the user had not seen it. Positions older than the window do not reach the score and are not scored.
A one-item history has no variant to score (the empty history is the popularity fallback): no contributions.
The modality split of a score is :meth:`serving_core.scoring.ItemScorer.split`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from serving_core.scoring import ItemScorer
from serving_core.towers import ItemArrays, UserTower

CHUNK_ROWS = 256  # histories per tower run (bounds the (rows, max_len, T) feed of a large explained batch)


@dataclass(frozen=True)
class LeaveOneOut:
    """One user's contributions: ``positions`` (L,) indexes into the history that were left out (oldest first),
    ``drops`` (L, C) the score drop of each of the C recommended rows when that position is left out."""

    positions: np.ndarray
    drops: np.ndarray

    def top(self, c: int, n: int, history: np.ndarray) -> list[tuple[int, int, float]]:
        """The ``n`` history items with the largest drops of recommended row c, as (item row, position, drop),
        largest drop first; an item the history holds more than once is listed once, at its largest drop."""
        order = np.argsort(-self.drops[:, c], kind="stable")
        seen: set[int] = set()
        out: list[tuple[int, int, float]] = []
        for i in order:
            p = int(self.positions[i])
            item = int(history[p])
            if item in seen:
                continue
            seen.add(item)
            out.append((item, p, float(self.drops[i, c])))
            if len(out) == n:
                break
        return out


def variants(history: np.ndarray, max_len: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """(positions, histories) of the leave-one-out variants of ``history``: one per position the tower reads."""
    h = np.asarray(history, dtype=np.int64).reshape(-1)
    if h.size < 2:
        return np.zeros(0, dtype=np.int64), []
    keep = h[-(max_len + 1) :]  # the window plus the item that enters it when one of the window is left out
    offset = h.size - keep.size
    window = range(keep.size - min(h.size, max_len), keep.size)
    return np.array([offset + p for p in window], dtype=np.int64), [np.delete(keep, p) for p in window]


def leave_one_out(
    tower: UserTower,
    scorer: ItemScorer,
    histories: Sequence[np.ndarray],
    rows: Sequence[np.ndarray],
    scores: Sequence[np.ndarray],
    arrays: ItemArrays | None = None,
) -> list[LeaveOneOut | None]:
    """Contributions of each history's items to its recommended ``rows`` (C_b,) whose exact ``scores`` (C_b,)
    were computed from the full history: one tower pass over every variant of every history (in chunks of
    :data:`CHUNK_ROWS`), then the scorer on each variant's own rows. None for a history with fewer than 2 items
    or no rows."""
    plans = [variants(h, tower.max_len) for h in histories]
    flat = [v for _, vs in plans for v in vs]
    if not flat:
        return [None] * len(histories)
    users = np.concatenate([tower.encode(flat[i : i + CHUNK_ROWS], arrays) for i in range(0, len(flat), CHUNK_ROWS)])
    out: list[LeaveOneOut | None] = []
    start = 0
    for (positions, vs), got, s in zip(plans, rows, scores, strict=True):
        n, r = len(vs), np.asarray(got, dtype=np.int64)
        if n == 0 or r.size == 0:
            out.append(None)
            start += n
            continue
        loo = scorer.exact(users[start : start + n], np.broadcast_to(r, (n, r.size)))  # (L, C)
        out.append(LeaveOneOut(positions, np.asarray(s, np.float32)[None, :] - loo))
        start += n
    return out
