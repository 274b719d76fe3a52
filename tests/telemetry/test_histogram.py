"""Histograms: Prometheus bucket semantics, histogram_quantile estimates, the window."""

from __future__ import annotations

import math

import pytest

from kvbroker.telemetry.histogram import Histogram, Window, quantile


def test_buckets_count_values_up_to_and_including_their_bound() -> None:
    h = Histogram((1.0, 2.0))
    for v in (0.5, 1.0, 1.5, 2.0, 3.0):
        h.observe(v)
    value = h.value()
    assert value.counts == (2, 2, 1)
    assert value.cumulative() == [2, 4, 5]
    assert (value.count, value.sum, value.min, value.max) == (5, 8.0, 0.5, 3.0)


def test_quantiles_interpolate_like_histogram_quantile() -> None:
    bounds = (0.001, 0.002, 0.004)
    assert quantile(bounds, [0, 10, 0, 0], 0.5) == pytest.approx(0.0015)
    assert quantile(bounds, [10, 0, 0, 0], 0.5) == pytest.approx(0.0005)  # from 0 up
    assert quantile(bounds, [0, 0, 0, 4], 0.99) == 0.004  # +Inf: the largest bound
    assert quantile(bounds, [50, 0, 50, 0], 0.99) == pytest.approx(0.002 + 0.002 * 0.98)
    assert math.isnan(quantile(bounds, [0, 0, 0, 0], 0.5))


def test_the_window_forgets_slots_older_than_it() -> None:
    w = Window(2, slots=3, slot_seconds=10)
    w.add(0, now=5)  # slot 0
    w.add(1, now=15)  # slot 1
    w.add(1, now=25)  # slot 2
    assert w.counts(now=29) == [1, 2]
    assert w.counts(now=31) == [0, 2]  # slot 0 is out of the window
    w.add(0, now=32)  # reuses slot 0's storage
    assert w.counts(now=32) == [1, 2]
    assert w.counts(now=100) == [0, 0]
    assert w.span(now=32) == pytest.approx(22)  # 10..32
