"""Compact lookup tables for curation's dedupe state, which grows with every record of a run.

Python sets and dicts cost 100-200 bytes an entry; a run over a full dataset (hundreds of thousands of images)
keeps several entries per image. These tables keep 64-bit keys and their int values in numpy arrays: a sorted
part, searched by bisection, and a preallocated unsorted tail of recent inserts, scanned (vectorised) and
merged into the sorted part when full. Memory is 16 bytes an entry plus the fixed tail, whatever the run's
size; a lookup costs a few microseconds.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np


class _Table:
    """Sorted keys/values plus an unsorted tail; equal keys keep their insertion order."""

    def __init__(self, tail: int = 8192):
        self._k = np.empty(0, np.uint64)
        self._v = np.empty(0, np.int64)
        self._tk = np.empty(tail, np.uint64)
        self._tv = np.empty(tail, np.int64)
        self._n = 0

    def __len__(self) -> int:
        return len(self._k) + self._n

    def _append(self, key: int, value: int) -> None:
        self._tk[self._n], self._tv[self._n] = key, value
        self._n += 1
        if self._n == len(self._tk):
            self._merge()

    def _merge(self) -> None:
        if not self._n:
            return
        order = np.argsort(self._tk[:self._n], kind="stable")
        tk, tv = self._tk[:self._n][order], self._tv[:self._n][order]
        at = self._k.searchsorted(tk, side="right")  # after equal keys already there: insertion order kept
        self._k, self._v = np.insert(self._k, at, tk), np.insert(self._v, at, tv)
        self._n = 0

    def _sorted_range(self, q: np.uint64) -> tuple[int, int]:
        k = self._k
        return int(k.searchsorted(q, "left")), int(k.searchsorted(q, "right"))

    def _tail_hits(self, q: np.uint64) -> np.ndarray:
        return np.flatnonzero(self._tk[:self._n] == q)


class U64Map(_Table):
    """64-bit unsigned keys to int values, each key once (the first value set wins). Also a set: ``add``."""

    def get(self, key: int, default: int | None = None) -> int | None:
        q = np.uint64(key)
        lo, hi = self._sorted_range(q)
        if hi > lo:
            return int(self._v[lo])
        hits = self._tail_hits(q)
        return int(self._tv[hits[0]]) if len(hits) else default

    def __contains__(self, key: int) -> bool:
        return self.get(key) is not None

    def setdefault(self, key: int, value: int) -> int:
        old = self.get(key)
        if old is not None:
            return old
        self._append(key, value)
        return value

    def add(self, key: int) -> None:
        self.setdefault(key, 0)

    def update(self, keys) -> None:
        for key in keys:
            self.add(key)

    def __iter__(self) -> Iterator[int]:
        """The keys, in ascending order."""
        self._merge()
        return (int(x) for x in self._k)


class U64MultiMap(_Table):
    """64-bit unsigned keys to several int values each, in insertion order per key."""

    def add(self, key: int, value: int) -> None:
        self._append(key, value)

    def get(self, key: int) -> list[int]:
        q = np.uint64(key)
        lo, hi = self._sorted_range(q)
        out = self._v[lo:hi].tolist() if hi > lo else []
        hits = self._tail_hits(q)
        return out + self._tv[hits].tolist() if len(hits) else out
