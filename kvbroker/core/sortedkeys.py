"""A sorted set of keys with O(log n) insert, delete and "first key after k".

Why not a plain sorted list: at 100k caches an ``insort`` moves half the list per
insert, and rebuilding a sorted copy per query costs O(n log n), which is what made one
ListCaches page take a second. Why not a tree: the standard library has none, and a
tree of Python objects is slower than this in CPython. The keys live in chunks of at
most ``2 * LOAD`` sorted keys (the layout of ``sortedcontainers.SortedList``): an insert
is a bisect over the chunks' maxima, a bisect in one chunk and a memmove of at most
``2 * LOAD`` pointers. A chunk that shrinks below ``LOAD // 4`` merges with a neighbour,
so the number of chunks stays O(n / LOAD).

Not thread-safe: one owner calls it. Keys must be mutually comparable (all ``str`` or
all ``int``).
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right, insort
from collections.abc import Iterator
from typing import Any

LOAD = 512


class SortedKeys:
    """Distinct keys in ascending order."""

    __slots__ = ("_chunks", "_maxes", "_len")

    def __init__(self) -> None:
        self._chunks: list[list[Any]] = []
        self._maxes: list[Any] = []
        self._len = 0

    def __len__(self) -> int:
        return self._len

    def __iter__(self) -> Iterator[Any]:
        for chunk in self._chunks:
            yield from chunk

    def add(self, key: Any) -> None:
        """Insert ``key``, which must not be present. Cost: O(log n + LOAD) at C speed."""
        maxes = self._maxes
        if not maxes:
            self._chunks.append([key])
            maxes.append(key)
            self._len = 1
            return
        i = bisect_left(maxes, key)
        if i == len(maxes):
            i -= 1
            chunk = self._chunks[i]
            chunk.append(key)
            maxes[i] = key
        else:
            chunk = self._chunks[i]
            insort(chunk, key)
        self._len += 1
        if len(chunk) > 2 * LOAD:
            self._chunks[i:i + 1] = [chunk[:LOAD], chunk[LOAD:]]
            maxes[i:i + 1] = [chunk[LOAD - 1], chunk[-1]]

    def remove(self, key: Any) -> None:
        """Delete ``key``; ``KeyError`` when absent. Cost: O(log n + LOAD) at C speed."""
        maxes = self._maxes
        i = bisect_left(maxes, key)
        if i == len(maxes):
            raise KeyError(key)
        chunk = self._chunks[i]
        j = bisect_left(chunk, key)
        if j == len(chunk) or chunk[j] != key:
            raise KeyError(key)
        del chunk[j]
        self._len -= 1
        if not chunk:
            del self._chunks[i], maxes[i]
            return
        maxes[i] = chunk[-1]
        if len(chunk) < LOAD // 4 and len(self._chunks) > 1:
            # Merge with a neighbour (the next one, or the previous for the last chunk).
            k = i if i + 1 < len(self._chunks) else i - 1
            merged = self._chunks[k] + self._chunks[k + 1]
            if len(merged) > 2 * LOAD:
                half = len(merged) // 2
                self._chunks[k:k + 2] = [merged[:half], merged[half:]]
                maxes[k:k + 2] = [merged[half - 1], merged[-1]]
            else:
                self._chunks[k:k + 2] = [merged]
                maxes[k:k + 2] = [merged[-1]]

    def after(self, key: Any) -> Iterator[Any]:
        """The keys greater than ``key``, ascending. Cost: O(log n) to start, O(1) per
        key. The set must not change while the iterator is in use."""
        i = bisect_right(self._maxes, key)
        if i == len(self._maxes):
            return
        chunks = self._chunks
        yield from chunks[i][bisect_right(chunks[i], key):]
        for j in range(i + 1, len(chunks)):
            yield from chunks[j]

    def first_after(self, key: Any) -> Any | None:
        """The least key greater than ``key``, or None. Cost: O(log n); the set may
        change between calls (an iteration that mutates uses this)."""
        i = bisect_right(self._maxes, key)
        if i == len(self._maxes):
            return None
        chunk = self._chunks[i]
        return chunk[bisect_right(chunk, key)]
