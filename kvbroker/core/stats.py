"""Statistics snapshots: every figure of the seeds' ``get_pool_statistics`` in base units.

Definitions (the same for every scope: a device, a pool, the whole broker):

- ``capacity_bytes``: a device's capacity; a pool's quota (``max_bytes``); the sum of
  the devices' capacities in total.
- ``reserved_bytes``: bytes held by segments (creating and draining ones included).
  ``allocated_bytes``: bytes of placed caches (block-rounded; pending ones included,
  and, while a compaction runs, caches freed in its arenas until it ends). ``free_bytes = capacity - allocated``: what the scope could
  still place, inside segments or as new ones.
- ``largest_free_extent_bytes``: the largest contiguous free range, inside a segment or
  as a new segment from the unreserved budget.
- ``fragmentation_ratio``: ``1 - largest free extent / free bytes`` over the free space
  inside segments (unreserved budget is never fragmented); the sum of
  ``fragmentation_within_segments_ratio``, the share of free bytes outside their own
  segment's largest free range (holes between caches: a compaction merges them), and
  ``fragmentation_across_segments_ratio``, the share in other segments' largest ranges
  (free space split across segments and pools: no compaction merges it, only segments
  going back to the device do). See ``kvbroker/core/compaction.py``, ``fragmentation_of``.
- ``utilization_ratio``: ``allocated / capacity``.

Cost: O(arenas + free extents), never O(caches): every per-cache figure is a counter the
arenas keep; called per Stats RPC and per Prometheus scrape, never on the allocation
path.
"""

from __future__ import annotations

from collections.abc import Iterable

from kvbroker.core.compaction import fragmentation_of
from kvbroker.core.freespace import segment_of
from kvbroker.core.records import ArenaRecord, DeviceRecord, PoolRecord
from kvbroker.core.types import ArenaCounters, BrokerStats, DeviceStats, PoolStats, Usage


def _usage(arenas: list[ArenaRecord], capacity: int, unreserved: int) -> Usage:
    allocated = sum(a.allocated_bytes for a in arenas)
    by_segment: dict[int, list[int]] = {}
    for a in arenas:
        for addr, n in a.free.extents():
            by_segment.setdefault(segment_of(addr), []).append(n)
    figures = fragmentation_of(by_segment.values())
    largest_inside = figures.largest_free_extent
    return Usage(
        capacity_bytes=capacity,
        reserved_bytes=sum(a.reserved_bytes for a in arenas),
        allocated_bytes=allocated,
        pinned_bytes=sum(a.pinned_bytes for a in arenas),
        free_bytes=capacity - allocated,
        largest_free_extent_bytes=max(largest_inside, max(unreserved, 0)),
        fragmentation_ratio=figures.ratio,
        utilization_ratio=allocated / capacity if capacity else 0.0,
        active_caches=sum(a.live_caches for a in arenas),
        segments=sum(len(a.segments) + len(a.creating) for a in arenas),
        pending_caches=sum(a.pending_caches for a in arenas),
        pinned_caches=sum(a.pinned_caches for a in arenas),
        idle_retained_caches=sum(a.idle_retained for a in arenas),
        fragmentation_within_segments_ratio=figures.within_segments,
        fragmentation_across_segments_ratio=figures.across_segments,
    )


def snapshot(
    devices: Iterable[DeviceRecord], pools: Iterable[PoolRecord], allocation_count: int, eviction_count: int
) -> BrokerStats:
    """Build a ``BrokerStats`` from the records and the broker's total counts."""
    pools = list(pools)
    devices = list(devices)
    device_stats = tuple(
        DeviceStats(
            device_id=d.spec.device_id,
            usage=_usage(d.arenas, d.spec.capacity_bytes, d.unreserved_bytes),
            allocation_count=d.allocation_count,
            eviction_count=d.eviction_count,
        )
        for d in devices
    )
    pool_stats = tuple(
        PoolStats(
            pool=p.spec.name,
            usage=_usage(
                list(p.arenas.values()),
                p.max_bytes,
                min(
                    p.max_bytes - p.reserved_bytes,
                    max(a.device.unreserved_bytes for a in p.arenas.values()),
                ),
            ),
            min_bytes=p.spec.min_bytes,
            max_bytes=p.max_bytes,
            priority=p.spec.priority,
            eviction_policy=p.spec.eviction_policy,
            allocation_count=p.allocation_count,
            eviction_count=p.eviction_count,
        )
        for p in pools
    )
    all_arenas = [a for d in devices for a in d.arenas]
    total = _usage(
        all_arenas,
        sum(d.spec.capacity_bytes for d in devices),
        max((d.unreserved_bytes for d in devices), default=0),
    )
    return BrokerStats(
        total=total,
        allocation_count=allocation_count,
        eviction_count=eviction_count,
        devices=device_stats,
        pools=pool_stats,
        arenas=tuple(
            ArenaCounters(
                pool=p.spec.name,
                device_id=device_id,
                evictions=tuple(a.evictions.items()),
                evicted_bytes=tuple(a.evicted_bytes.items()),
                releases=a.release_count,
                compactions=a.compaction_count,
                moved_bytes=a.moved_bytes,
            )
            for p in pools
            for device_id, a in p.arenas.items()
        ),
    )
