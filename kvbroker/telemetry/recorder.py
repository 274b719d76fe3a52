"""The counters and histograms that hooks feed (as opposed to the gauges and core counters
read from ``BrokerStats`` at scrape time).

Fed by the engine's observer hooks and the RPC interceptor, on the event loop only: not
thread-safe by design, and a reader takes a ``RecorderSnapshot`` on the loop. Series are
keyed by catalogue name and label values, so the exporters need no table of their own.

Every hook is O(1): a dict lookup, a ``bisect`` and integer additions (about a
microsecond), and every label value is bounded here (unknown pools and reasons collapse
to fixed values), so no client input can grow the number of series.
"""

from __future__ import annotations

import asyncio
import time
from typing import NamedTuple

from kvbroker.core.errors import (
    AlreadyExists,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
)
from kvbroker.engine import MethodStats, RpcStats
from kvbroker.wire import SessionEndReason
from kvbroker.telemetry.catalogue import BY_NAME
from kvbroker.telemetry.histogram import Histogram, HistogramValue, Window

#: The service whose methods ``kvbroker stats`` names without their service.
BROKER_SERVICE = "kvbroker.v1.CacheBroker"

_OUTCOMES: tuple[tuple[type[BaseException], str], ...] = (
    (ResourceExhausted, "exhausted"),
    (DeadlineExceeded, "timeout"),
    (InvalidArgument, "invalid"),
    (NotFound, "not_found"),
    (AlreadyExists, "already_exists"),
    (FailedPrecondition, "failed_precondition"),
    (asyncio.CancelledError, "cancelled"),
)

#: The ``reason`` label of a session end that is not a ``wire.SessionEndReason``.
OTHER_REASON = "other"
#: Every ``outcome`` label value, exported at 0 per pool from the start.
OUTCOMES = ("ok", *(outcome for _, outcome in _OUTCOMES), "error")
#: The status codes the broker's servicer answers errors with (the error table of
#: kvbroker/server/convert.py, plus INTERNAL for bugs): ``kvbroker_rpc_errors_total`` is
#: exported at 0 for each of them and each CacheBroker method from the start.
ERROR_CODES = (
    "INVALID_ARGUMENT", "NOT_FOUND", "ALREADY_EXISTS", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION",
    "DEADLINE_EXCEEDED", "UNAUTHENTICATED", "PERMISSION_DENIED", "INTERNAL", "ABORTED",
)  # fmt: skip

_ALLOCATIONS = BY_NAME["kvbroker_allocations_total"].name
_WAIT = BY_NAME["kvbroker_allocation_wait_seconds"]
_COMPACTION = BY_NAME["kvbroker_compaction_duration_seconds"]
_RPC = BY_NAME["kvbroker_rpc_duration_seconds"]
_OPENED = BY_NAME["kvbroker_sessions_opened_total"].name
_RECLAIMED = BY_NAME["kvbroker_sessions_reclaimed_total"].name
_CHECKPOINTS = BY_NAME["kvbroker_checkpoints_total"].name
_CHECKPOINT_BYTES = BY_NAME["kvbroker_checkpoint_written_bytes_total"].name
_CHECKPOINT_TIME = BY_NAME["kvbroker_checkpoint_duration_seconds"]
_REJECTED = BY_NAME["kvbroker_checkpoint_generations_rejected_total"].name
_RESTORED = BY_NAME["kvbroker_restored_caches_total"].name
CHECKPOINT_OUTCOMES = ("ok", "budget_exceeded", "disk_full", "error")
_OFFLOADS = BY_NAME["kvbroker_offloads_total"].name
_RESTORES = BY_NAME["kvbroker_restores_total"].name
_RESTORE_TIME = BY_NAME["kvbroker_restore_duration_seconds"]
OFFLOAD_OUTCOMES = ("ok", "freed", "failed")
RESTORE_OUTCOMES = ("ok", "failed", "corrupt")
TIERS = ("host", "disk")


def outcome_of(error: BaseException | None) -> str:
    """The ``outcome`` label of an Allocate that ended with ``error`` (None: ok)."""
    if error is None:
        return "ok"
    for cls, outcome in _OUTCOMES:
        if isinstance(error, cls):
            return outcome
    return "error"


class RecorderSnapshot(NamedTuple):
    """Copies of every series: catalogue name -> label values -> value."""

    counters: dict[str, dict[tuple[str, ...], int]]
    histograms: dict[str, dict[tuple[str, ...], HistogramValue]]
    started_at: float  # unix seconds: the start of every cumulative series
    methods: tuple[str, ...] = ()  # the CacheBroker methods, for the zero error series


class _RpcSeries:
    __slots__ = ("histogram", "window")

    def __init__(self) -> None:
        self.histogram = Histogram(_RPC.buckets)
        self.window = Window(len(_RPC.buckets) + 1)


class Recorder:
    """Series fed by hooks.

    Args:
        pools: the configured pool names (other names become ``""``).
        clock: monotonic seconds, for the recent window of ``rpc_stats``.
        methods: the CacheBroker service's method names (their error series start at 0).
    """

    def __init__(self, pools: tuple[str, ...], *, clock=time.monotonic, methods: tuple[str, ...] = ()) -> None:
        self._pools = frozenset(pools)
        self._clock = clock
        self.methods = tuple(methods)
        self.started_at = time.time()
        self._started_mono = clock()
        # Known label values start at 0: a dashboard shows 0 rather than no data.
        self._counters: dict[str, dict[tuple[str, ...], int]] = {
            _ALLOCATIONS: {(pool, outcome): 0 for pool in pools for outcome in OUTCOMES},
            _OPENED: {(): 0},
            _RECLAIMED: {(reason,): 0 for reason in (*(r.value for r in SessionEndReason), OTHER_REASON)},
            _CHECKPOINTS: {(outcome,): 0 for outcome in CHECKPOINT_OUTCOMES},
            _CHECKPOINT_BYTES: {(): 0}, _REJECTED: {(): 0}, _RESTORED: {(): 0},
            _OFFLOADS: {(pool, tier, o): 0 for pool in pools for tier in TIERS for o in OFFLOAD_OUTCOMES},
            _RESTORES: {(pool, tier, o): 0 for pool in pools for tier in TIERS for o in RESTORE_OUTCOMES},
        }
        self._histograms: dict[str, dict[tuple[str, ...], Histogram]] = {
            _WAIT.name: {}, _COMPACTION.name: {}, _CHECKPOINT_TIME.name: {}, _RESTORE_TIME.name: {},
        }
        self._rpcs: dict[tuple[str, str, str], _RpcSeries] = {}
        self._window_shape = Window(0)  # every RPC window has this shape: it gives the span

    # -- hooks (the engine's Observer methods, and the interceptor's) --------------------

    def allocation_finished(self, pool: str, error: BaseException | None) -> None:
        key = (pool if pool in self._pools else "", outcome_of(error))
        series = self._counters[_ALLOCATIONS]
        series[key] = series.get(key, 0) + 1

    def allocation_waited(self, pool: str, seconds: float) -> None:
        self._observe(_WAIT.name, (pool if pool in self._pools else "",), _WAIT.buckets, seconds)

    def compaction_copied(self, device: str, nbytes: int, seconds: float) -> None:
        self._observe(_COMPACTION.name, (device,), _COMPACTION.buckets, seconds)

    def session_opened(self) -> None:
        series = self._counters[_OPENED]
        series[()] = series.get((), 0) + 1

    def session_reclaimed(self, reason: SessionEndReason) -> None:
        key = (reason.value if isinstance(reason, SessionEndReason) else OTHER_REASON,)
        series = self._counters[_RECLAIMED]
        series[key] = series.get(key, 0) + 1

    def checkpoint_finished(self, outcome: str, nbytes: int, seconds: float) -> None:
        """One checkpoint ended (``kvbroker.engine.persistence``)."""
        self._add(_CHECKPOINTS, (outcome if outcome in CHECKPOINT_OUTCOMES else "error",), 1)
        self._add(_CHECKPOINT_BYTES, (), nbytes)
        self._observe(_CHECKPOINT_TIME.name, (), _CHECKPOINT_TIME.buckets, seconds)

    def generation_rejected(self) -> None:
        self._add(_REJECTED, (), 1)

    def caches_restored(self, count: int) -> None:
        self._add(_RESTORED, (), count)

    def offload_finished(self, pool: str, tier: str, outcome: str, nbytes: int, seconds: float) -> None:
        """One copy-out to an offload tier ended (``kvbroker.engine.offload``)."""
        self._add(_OFFLOADS, self._tiered(pool, tier, outcome, OFFLOAD_OUTCOMES), 1)

    def restore_finished(self, pool: str, tier: str, outcome: str, seconds: float) -> None:
        """One restore of an offloaded cache ended."""
        key = self._tiered(pool, tier, outcome, RESTORE_OUTCOMES)
        self._add(_RESTORES, key, 1)
        self._observe(_RESTORE_TIME.name, key[:2], _RESTORE_TIME.buckets, seconds)

    def _tiered(self, pool: str, tier: str, outcome: str, outcomes: tuple[str, ...]) -> tuple[str, str, str]:
        return (pool if pool in self._pools else "", tier if tier in TIERS else "", outcome if outcome in outcomes else "failed")

    def _add(self, name: str, key: tuple[str, ...], n: int) -> None:
        series = self._counters[name]
        series[key] = series.get(key, 0) + n

    def rpc_finished(self, service: str, method: str, code: str, seconds: float) -> None:
        """One RPC ended with status ``code`` (a ``grpc.StatusCode`` name) after
        ``seconds``. Service and method come from the server's registered handlers."""
        key = (service, method, code)
        series = self._rpcs.get(key)
        if series is None:
            series = self._rpcs[key] = _RpcSeries()
        series.window.add(series.histogram.observe(seconds), self._clock())

    # -- readers (on the loop) -------------------------------------------------------------

    def snapshot(self) -> RecorderSnapshot:
        histograms = {
            name: {key: h.value() for key, h in series.items()} for name, series in self._histograms.items()
        }
        histograms[_RPC.name] = {key: s.histogram.value() for key, s in self._rpcs.items()}
        counters = {name: dict(series) for name, series in self._counters.items()}
        return RecorderSnapshot(counters, histograms, self.started_at, self.methods)

    def rpc_stats(self) -> RpcStats:
        """Calls, errors by code and P50/P95/P99 per method over the recent window, and
        every method's calls since the start (methods called before the window too)."""
        now = self._clock()
        by_method: dict[tuple[str, str], tuple[list[int], dict[str, int], list[int]]] = {}
        for (service, method, code), series in self._rpcs.items():
            counts = series.window.counts(now)
            calls = sum(counts)
            merged, errors, total = by_method.setdefault((service, method), ([0] * len(counts), {}, [0]))
            total[0] += series.histogram.count
            for i, n in enumerate(counts):
                merged[i] += n
            if code != "OK" and calls:
                errors[code] = errors.get(code, 0) + calls
        methods = []
        for (service, method), (counts, errors, total) in sorted(by_method.items()):
            name = method if service == BROKER_SERVICE else f"{service}/{method}"
            p50, p95, p99 = (HistogramValue(_RPC.buckets, tuple(counts), 0.0, 0, 0.0, 0.0).quantile(q)
                             for q in (0.5, 0.95, 0.99))  # fmt: skip
            methods.append(MethodStats(name, sum(counts), tuple(sorted(errors.items())), p50, p95, p99, total[0]))
        window = min(self._window_shape.span(now), now - self._started_mono)
        return RpcStats(window, tuple(methods))

    def _observe(self, name: str, key: tuple[str, ...], buckets: tuple[float, ...], value: float) -> None:
        series = self._histograms[name]
        histogram = series.get(key)
        if histogram is None:
            histogram = series[key] = Histogram(buckets)
        histogram.observe(value)
