"""The broker's figures: byte accounting per scope, stats snapshots, cumulative counters
and the evictions told to the operator. Frozen value objects, like those of
``kvbroker.core.types`` (which re-exports them); standard library only.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Usage:
    """Byte accounting of one scope (a segment set, a pool, a device or the whole broker).

    ``capacity_bytes`` is the scope's budget (device capacity; for a pool, the bytes of
    its segments). ``fragmentation_ratio`` is ``1 - largest free extent / free`` over
    free space inside segments (0 when nothing is free), the sum of
    ``fragmentation_within_segments_ratio`` (compaction fixes it) and
    ``fragmentation_across_segments_ratio`` (only giving segments back does): see
    ``Fragmentation``. ``active_caches`` counts RESIDENT and PENDING caches; of them,
    ``pending_caches`` are being backed, ``pinned_caches`` are pinned and
    ``idle_retained_caches`` are retained, resident and held by nobody (the first to go
    under pressure).
    """

    capacity_bytes: int
    reserved_bytes: int
    allocated_bytes: int
    pinned_bytes: int
    free_bytes: int
    largest_free_extent_bytes: int
    fragmentation_ratio: float
    utilization_ratio: float
    active_caches: int
    segments: int
    pending_caches: int = 0
    pinned_caches: int = 0
    idle_retained_caches: int = 0
    fragmentation_within_segments_ratio: float = 0.0
    fragmentation_across_segments_ratio: float = 0.0


@dataclass(frozen=True, slots=True)
class DeviceStats:
    device_id: str
    usage: Usage
    allocation_count: int
    eviction_count: int


@dataclass(frozen=True, slots=True)
class PoolStats:
    pool: str
    usage: Usage
    min_bytes: int
    max_bytes: int
    priority: int
    eviction_policy: str
    allocation_count: int
    eviction_count: int


#: Why a cache was evicted, as a bounded label value: ``idle`` (an idle retained cache
#: reclaimed under pressure), ``policy`` (the pool's policy made room), ``reclaim`` (its
#: segment was taken for another pool), ``threshold`` (an idle retained cache taken by
#: background reclamation above ``gc_threshold``), ``operator`` (an operator's Evict, or
#: a lowered ``max_bytes``).
EVICTION_CAUSES = ("idle", "policy", "reclaim", "threshold", "operator")


@dataclass(frozen=True, slots=True)
class Eviction:
    """One cache the broker evicted, for the daemon's log (``Broker.drain_evictions``):
    an eviction destroys a tenant's data, so each one is told to the operator, whether
    or not a holder was there to be told (``held``). ``nbytes`` are the bytes freed (the
    cache's reserved bytes); ``cause`` is one of ``EVICTION_CAUSES``; ``reason`` is what
    the holders were told."""

    cache_id: str
    pool: str
    device_id: str
    nbytes: int
    cause: str
    reason: str
    held: bool


@dataclass(frozen=True, slots=True)
class ArenaCounters:
    """Cumulative counts of one pool's share of one device since the broker started
    (they only grow). ``evictions`` and ``evicted_bytes`` are ``(cause, n)`` pairs, one
    per cause of ``EVICTION_CAUSES`` that happened."""

    pool: str
    device_id: str
    evictions: tuple[tuple[str, int], ...] = ()
    evicted_bytes: tuple[tuple[str, int], ...] = ()
    releases: int = 0
    compactions: int = 0
    moved_bytes: int = 0


@dataclass(frozen=True, slots=True)
class BrokerStats:
    """One consistent snapshot: every figure of the seeds' ``get_pool_statistics``, and
    the cumulative counters per arena (pool x device) that telemetry exports."""

    total: Usage
    allocation_count: int
    eviction_count: int
    devices: tuple[DeviceStats, ...] = field(default_factory=tuple)
    pools: tuple[PoolStats, ...] = field(default_factory=tuple)
    arenas: tuple[ArenaCounters, ...] = field(default_factory=tuple)
