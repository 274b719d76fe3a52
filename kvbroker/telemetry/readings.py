"""Every catalogue metric's current points, from one consistent snapshot.

A ``Snapshot`` is taken on the event loop (the core and the recorder are only touched
there): the engine's ``BrokerStats`` and the recorder's series, at one instant. Exporters
run in their own threads (prometheus_client's HTTP server, the OTLP push loop), so
``SnapshotSource.take_threadsafe`` hops onto the loop for it, which costs one
``call_soon_threadsafe`` round trip, and the loop's share is O(segments + free extents +
series).

``read`` turns a snapshot into ``(spec, points)`` for every ``CATALOGUE`` entry, in
catalogue order, so the Prometheus and the OTLP exporters cannot disagree on a value:
gauges from the per-device and per-pool ``Usage``, the core's cumulative counters from
``BrokerStats.arenas``, the rest from the recorder (``kvbroker_rpc_errors_total`` is read
off the non-OK series of the RPC histogram, not counted twice).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import platform
import threading
from collections.abc import Callable
from typing import NamedTuple

from kvbroker import __version__
from kvbroker.core import EVICTION_CAUSES, BrokerStats
from kvbroker.core.types import Usage
from kvbroker.engine import LiveFigures
from kvbroker.telemetry.catalogue import CATALOGUE, PREFIX, Kind, MetricSpec
from kvbroker.telemetry.histogram import HistogramValue
from kvbroker.telemetry.recorder import BROKER_SERVICE, ERROR_CODES, Recorder, RecorderSnapshot

_NO_LIVE = LiveFigures(0, {}, {})


class Snapshot(NamedTuple):
    stats: BrokerStats
    recorded: RecorderSnapshot
    live: LiveFigures = _NO_LIVE


class Point(NamedTuple):
    """One series: label values in the spec's label order, and a number or a histogram."""

    labels: tuple[str, ...]
    value: float | HistogramValue


class SnapshotSource:
    """Takes snapshots of one engine and recorder, on their event loop.

    Args:
        stats: the engine's ``stats`` method.
        recorder: the hooks' series.
        loop: the loop that owns both (construct the source on its thread).
        live: the engine's ``live`` method (sessions, waiting allocations).
    """

    def __init__(
        self, stats: Callable[[], BrokerStats], recorder: Recorder, loop: asyncio.AbstractEventLoop,
        live: Callable[[], LiveFigures] = lambda: _NO_LIVE,
    ) -> None:  # fmt: skip
        self._stats = stats
        self._recorder = recorder
        self._loop = loop
        self._live = live
        self._loop_thread = threading.get_ident()

    def take(self) -> Snapshot:
        """On the loop's thread only."""
        return Snapshot(self._stats(), self._recorder.snapshot(), self._live())

    def take_threadsafe(self, timeout: float = 10.0) -> Snapshot:
        """From any thread: runs ``take`` on the loop and waits for it (directly when
        called on the loop's own thread)."""
        if threading.get_ident() == self._loop_thread:
            return self.take()
        future: concurrent.futures.Future[Snapshot] = concurrent.futures.Future()

        def run() -> None:
            try:
                future.set_result(self.take())
            except BaseException as err:  # noqa: BLE001 - handed to the waiting thread
                future.set_exception(err)

        self._loop.call_soon_threadsafe(run)
        return future.result(timeout)


def _usage_points(spec: MetricSpec, scopes: list[tuple[str, Usage]]) -> list[Point]:
    field = spec.name.removeprefix(PREFIX).split("_", 1)[1]
    field = "active_caches" if field == "caches" else field
    return [Point((scope,), getattr(usage, field)) for scope, usage in scopes]


def _arena_points(snapshot: Snapshot, name: str) -> list[Point]:
    policies = {p.pool: p.eviction_policy for p in snapshot.stats.pools}
    points = []
    for a in snapshot.stats.arenas:
        if name in ("kvbroker_evictions_total", "kvbroker_evicted_bytes_total"):
            counted = dict(a.evictions if name == "kvbroker_evictions_total" else a.evicted_bytes)
            causes = (*EVICTION_CAUSES, *sorted(set(counted) - set(EVICTION_CAUSES)))  # every cause from 0
            points += [Point((a.pool, a.device_id, policies.get(a.pool, ""), c), counted.get(c, 0)) for c in causes]
        else:
            value = {
                "kvbroker_releases_total": a.releases,
                "kvbroker_compactions_total": a.compactions,
                "kvbroker_compaction_moved_bytes_total": a.moved_bytes,
            }[name]
            points.append(Point((a.pool, a.device_id), value))
    return points


def _state_points(pool: str, usage: Usage) -> list[Point]:
    resident = usage.active_caches - usage.pending_caches
    return [
        Point((pool, "resident"), resident), Point((pool, "pending"), usage.pending_caches),
        Point((pool, "pinned"), usage.pinned_caches), Point((pool, "idle_retained"), usage.idle_retained_caches),
    ]  # fmt: skip


_ARENA_COUNTERS = frozenset(
    {"kvbroker_evictions_total", "kvbroker_evicted_bytes_total", "kvbroker_releases_total",
     "kvbroker_compactions_total", "kvbroker_compaction_moved_bytes_total"}
)  # fmt: skip
_BUILD = (__version__, platform.python_version())


def _paged_points(name: str, paged: dict) -> list[Point]:
    """A paged pool metric's points from ``LiveFigures.paged`` (``PagedStats`` per pool)."""
    points = []
    for pool, s in paged.items():
        if name == "kvbroker_paged_pool_blocks":
            points += [Point((pool, "used"), s.blocks_used), Point((pool, "free"), s.blocks_free)]
        elif name == "kvbroker_paged_pool_tokens":
            points += [Point((pool, "used"), s.tokens_used), Point((pool, "reserved"), s.tokens_reserved),
                       Point((pool, "free"), s.blocks_free * s.block_tokens)]  # fmt: skip
        elif name == "kvbroker_paged_pool_sequences":
            points.append(Point((pool,), s.sequences))
        else:
            points.append(Point((pool,), s.fragmentation))
    return points


def read(snapshot: Snapshot) -> list[tuple[MetricSpec, list[Point]]]:
    """The points of every catalogue metric, in catalogue order."""
    devices = [(d.device_id, d.usage) for d in snapshot.stats.devices]
    pools = [(p.pool, p.usage) for p in snapshot.stats.pools]
    recorded = snapshot.recorded
    rpc = recorded.histograms.get("kvbroker_rpc_duration_seconds", {})
    out = []
    for spec in CATALOGUE:
        name = spec.name
        if name.startswith("kvbroker_device_"):
            points = _usage_points(spec, devices)
        elif name == "kvbroker_pool_min_bytes":
            points = [Point((p.pool,), p.min_bytes) for p in snapshot.stats.pools]
        elif name == "kvbroker_pool_priority":
            points = [Point((p.pool,), p.priority) for p in snapshot.stats.pools]
        elif name == "kvbroker_pool_caches_by_state":
            points = [point for p in snapshot.stats.pools for point in _state_points(p.pool, p.usage)]
        elif name == "kvbroker_pool_waiting_allocations":
            points = [Point((p.pool,), snapshot.live.waiting.get(p.pool, 0)) for p in snapshot.stats.pools]
        elif name.startswith("kvbroker_paged_pool_"):
            points = _paged_points(name, snapshot.live.paged)
        elif name == "kvbroker_offloaded_bytes":
            offloaded = snapshot.live.offloaded  # every pool and tier from 0
            points = [Point((p.pool, t), offloaded.get((p.pool, t), 0)) for p in snapshot.stats.pools for t in ("host", "disk")]
        elif name == "kvbroker_sessions_active":
            points = [Point((), snapshot.live.sessions)]
        elif name.startswith("kvbroker_pool_"):
            points = _usage_points(spec, pools)
        elif name in _ARENA_COUNTERS:
            points = _arena_points(snapshot, name)
        elif name == "kvbroker_rpc_errors_total":
            errors = {(BROKER_SERVICE, m, code): 0 for m in recorded.methods for code in ERROR_CODES}
            errors.update((key, h.count) for key, h in rpc.items() if key[2] != "OK")
            points = [Point(key, n) for key, n in errors.items()]
        elif name == "kvbroker_build_info":
            points = [Point(_BUILD, 1)]
        elif spec.kind is Kind.HISTOGRAM:
            points = [Point(key, h) for key, h in recorded.histograms.get(name, {}).items()]
        else:
            points = [Point(key, n) for key, n in recorded.counters.get(name, {}).items()]
        out.append((spec, sorted(points, key=lambda p: p.labels)))
    return out

