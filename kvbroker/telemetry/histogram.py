"""Fixed-bucket histograms: cumulative for the exporters, windowed for ``kvbroker stats``.

Why not prometheus_client's ``Histogram``: one observation there costs a label lookup
and a lock (microseconds), and its values could then feed neither OTLP nor the Stats RPC
without reading them back out. Here an observation is a ``bisect`` and a few integer
additions, made on the event loop only (not thread-safe by design; readers take copies
on the loop), and ``HistogramValue`` is what every consumer reads.

Buckets follow Prometheus: bucket ``i`` counts values ``<= bounds[i]``, the last one
(``+Inf``) the rest. ``quantile`` estimates like PromQL's ``histogram_quantile``.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from typing import NamedTuple


class HistogramValue(NamedTuple):
    """An immutable copy: per-bucket (not cumulative) ``counts``, one more than ``bounds``."""

    bounds: tuple[float, ...]
    counts: tuple[int, ...]
    sum: float
    count: int
    min: float
    max: float

    def cumulative(self) -> list[int]:
        total, out = 0, []
        for n in self.counts:
            total += n
            out.append(total)
        return out

    def quantile(self, q: float) -> float:
        """The ``q``-quantile (0..1), interpolated linearly inside its bucket as
        ``histogram_quantile`` does; the largest bound when it falls in ``+Inf``; NaN
        when empty."""
        return quantile(self.bounds, self.counts, q)


def quantile(bounds: tuple[float, ...], counts: tuple[int, ...] | list[int], q: float) -> float:
    total = sum(counts)
    if not total:
        return math.nan
    rank = q * total
    seen = 0
    for i, n in enumerate(counts):
        if n and seen + n >= rank:
            if i == len(bounds):
                return bounds[-1]
            lower = bounds[i - 1] if i else 0.0
            return lower + (bounds[i] - lower) * (rank - seen) / n
        seen += n
    return bounds[-1]


class Histogram:
    """Counts per bucket, sum, count, min and max since creation."""

    __slots__ = ("bounds", "counts", "sum", "count", "min", "max")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0
        self.count = 0
        self.min = math.inf
        self.max = -math.inf

    def observe(self, value: float) -> int:
        """Count ``value``; returns its bucket index (for a ``Window`` beside it)."""
        i = bisect_left(self.bounds, value)
        self.counts[i] += 1
        self.sum += value
        self.count += 1
        if value < self.min:
            self.min = value
        if value > self.max:
            self.max = value
        return i

    def value(self) -> HistogramValue:
        return HistogramValue(self.bounds, tuple(self.counts), self.sum, self.count, self.min, self.max)


class Window:
    """Bucket counts of the recent past: ``slots`` rotating sub-windows of
    ``slot_seconds`` each. ``counts(now)`` covers the current slot and the
    ``slots - 1`` before it, so between ``(slots - 1) * slot_seconds`` and
    ``slots * slot_seconds`` of history (``span(now)`` says exactly how much).

    Cost: ``add`` is an integer division and two list operations; ``counts`` is
    O(slots x buckets).
    """

    __slots__ = ("slot_seconds", "_slots", "_epochs")

    def __init__(self, nbuckets: int, *, slots: int = 5, slot_seconds: float = 60.0) -> None:
        self.slot_seconds = slot_seconds
        self._slots = [[0] * nbuckets for _ in range(slots)]
        self._epochs = [-1] * slots

    def add(self, bucket: int, now: float) -> None:
        epoch = int(now // self.slot_seconds)
        i = epoch % len(self._slots)
        if self._epochs[i] != epoch:
            self._epochs[i] = epoch
            self._slots[i] = [0] * len(self._slots[i])
        self._slots[i][bucket] += 1

    def counts(self, now: float) -> list[int]:
        epoch = int(now // self.slot_seconds)
        oldest = epoch - len(self._slots) + 1
        total = [0] * len(self._slots[0])
        for e, slot in zip(self._epochs, self._slots, strict=True):
            if oldest <= e <= epoch:
                for b, n in enumerate(slot):
                    total[b] += n
        return total

    def span(self, now: float) -> float:
        """Seconds of history ``counts(now)`` covers (at most)."""
        oldest = (int(now // self.slot_seconds) - len(self._slots) + 1) * self.slot_seconds
        return now - oldest
