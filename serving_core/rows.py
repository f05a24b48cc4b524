"""Item arrays in two parts: the bundle's rows as they were loaded (a read-only memory map, never copied) followed
by the rows appended since (cold-start items), seen as one array of rows [0, n).

:class:`RowStack` is what a catalogue snapshot holds once items were appended to a bundle's array: ``base`` (the
bundle rows) and ``added`` (a view of the rows appended since). Row r < len(base) is base[r], row r >= len(base) is
added[r - len(base)]. It answers what the readers of item arrays ask (serving_core.towers, serving_core.fusion,
serving_core.scoring): ``shape``/``dtype``/``ndim``, row gathers ``a[rows]`` (any integer index array; the
result is a new ndarray), row slices ``a[start:stop]`` (an ndarray view when they lie in one part, else a
RowStack) and single rows. Products with every row go through :func:`dot_rows`. NumPy ufuncs refuse a RowStack
(``__array_ufunc__ = None``) instead of silently copying the whole table; ``np.asarray`` does copy it (rows
[0, n) as one ndarray), for the rare reader that needs one.
"""

from __future__ import annotations

from typing import Any

import numpy as np


class RowStack:
    """Rows [0, len(base) + len(added)) of an item array: ``base`` rows, then ``added`` rows (same dtype, width)."""

    __array_ufunc__ = None  # ufuncs and operators raise TypeError: no hidden copy of a memory-mapped table

    __slots__ = ("added", "base", "base_rows", "dtype", "shape")

    def __init__(self, base: np.ndarray, added: np.ndarray) -> None:
        if base.dtype != added.dtype or base.shape[1:] != added.shape[1:]:
            raise ValueError(f"base {base.dtype} {base.shape} and added {added.dtype} {added.shape} rows differ")
        self.base, self.added = base, added
        self.base_rows = int(base.shape[0])
        self.shape: tuple[int, ...] = (self.base_rows + int(added.shape[0]), *base.shape[1:])
        self.dtype = base.dtype

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"RowStack({self.base_rows} base + {self.shape[0] - self.base_rows} added rows, {self.dtype})"

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        if copy is False:
            raise ValueError("a RowStack is two arrays: one ndarray of all its rows is a copy")
        out = np.concatenate([self.base, self.added])
        return out if dtype is None else out.astype(dtype, copy=False)

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, tuple):  # a[rows, cols]: the rows, then basic indexes of the other axes
            if not key or not all(isinstance(k, (slice, int, np.integer)) for k in key[1:]):
                raise IndexError("a RowStack takes rows first, then only slices or integers")
            head = self[key[0]]
            head = np.asarray(head) if isinstance(head, RowStack) else head
            return head[(Ellipsis, *key[1:])]
        if isinstance(key, slice):
            start, stop, step = key.indices(self.shape[0])
            if step != 1:
                return self.take(np.arange(start, stop, step))
            return self.rows(start, stop)
        if isinstance(key, (int, np.integer)):
            r = int(key)
            if r < 0:
                r += self.shape[0]
            if not 0 <= r < self.shape[0]:
                raise IndexError(f"row {int(key)} out of range for {self.shape[0]} rows")
            return self.base[r] if r < self.base_rows else self.added[r - self.base_rows]
        idx = np.asarray(key)
        if idx.dtype == bool:
            if idx.shape != (self.shape[0],):
                raise IndexError(f"boolean index of shape {idx.shape} for {self.shape[0]} rows")
            return self.take(np.flatnonzero(idx))
        return self.take(idx)

    def rows(self, start: int, stop: int) -> np.ndarray | RowStack:
        """Rows [start, stop) (0 <= start <= stop <= n): a view when they lie in one part."""
        start, stop = max(0, start), min(self.shape[0], stop)
        stop = max(start, stop)
        b = self.base_rows
        if stop <= b:
            return self.base[start:stop]
        if start >= b:
            return self.added[start - b : stop - b]
        return RowStack(self.base[start:], self.added[: stop - b])

    def take(self, rows: Any) -> np.ndarray:
        """The rows ``rows`` (any shape of integers; negative ones count from the end) -> rows.shape + row shape."""
        idx = np.asarray(rows)
        if idx.dtype.kind not in "iu":
            if idx.size:
                raise IndexError(f"row indices must be integers, got {idx.dtype}")
            idx = idx.astype(np.int64)
        n = self.shape[0]
        if idx.size:
            lowest, highest = int(idx.min()), int(idx.max())
            if lowest < -n or highest >= n:
                raise IndexError(f"row index out of range for {n} rows")
            if lowest < 0:
                idx = np.where(idx < 0, idx + n, idx)
        flat = idx.reshape(-1)
        high = np.flatnonzero(flat >= self.base_rows)
        if not high.size:
            return self.base[idx]
        if high.size == flat.size:
            return self.added[idx - self.base_rows]
        low = flat.copy()
        low[high] = 0
        out = self.base[low]  # one gather of every row (the appended ones are the few), then those overwritten
        out[high] = self.added[flat[high] - self.base_rows]
        return out.reshape(idx.shape + self.shape[1:])


def dot_rows(users: np.ndarray, table: np.ndarray | RowStack) -> np.ndarray:
    """users (B, D) . every row of table (N, D) -> (B, N), part by part for a :class:`RowStack`."""
    if isinstance(table, RowStack):
        return np.concatenate([dot_rows(users, table.base), dot_rows(users, table.added)], axis=1)
    return users @ table.T


class Segment:
    """An append-only array along axis 0: the initial array (a bundle's, possibly memory-mapped) is never copied or
    written; appended rows go to a separate growable buffer (amortised O(1); a grown buffer is a new one, the bundle
    rows are never part of it). ``view(n)`` of rows [0, n) never changes later: the initial array itself (or its
    first n rows) while nothing is appended, else a :class:`~serving_core.rows.RowStack` of the initial array and a
    view of the appended rows."""

    def __init__(self, initial: np.ndarray) -> None:
        self.base = initial
        self.base_rows = initial.shape[0]
        self._added = np.empty((0, *initial.shape[1:]), dtype=initial.dtype)
        self.n = self.base_rows

    def append(self, rows: np.ndarray) -> None:
        used = self.n - self.base_rows
        need = used + rows.shape[0]
        if need > self._added.shape[0]:
            grown = np.empty((max(need, 2 * used, 16), *self._added.shape[1:]), dtype=self._added.dtype)
            grown[:used] = self._added[:used]
            self._added = grown
        self._added[used:need] = rows
        self.n = self.base_rows + need

    def view(self, n: int | None = None) -> np.ndarray | RowStack:
        n = self.n if n is None else n
        if n <= self.base_rows:
            return self.base if n == self.base_rows else self.base[:n]
        return RowStack(self.base, self._added[: n - self.base_rows])

    def rows(self, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) as one ndarray (a view when they are all appended rows, or all bundle rows)."""
        if start >= self.base_rows:
            return self._added[start - self.base_rows : stop - self.base_rows]
        return np.asarray(self.view(stop)[start:stop])
