"""Background reclamation: evict down to each pool's and device's ``gc_threshold``.

Not on any request's path: the daemon calls it from its periodic tick, so that room is
made before a request needs it. It stops ``RECLAIM_HYSTERESIS`` below the threshold, or
every allocation at the threshold would trigger one more eviction. It takes idle
retained caches first (nobody uses them), then unpinned caches in the pool's policy
order; never a pinned or PENDING cache, never one in an arena a compaction freezes.
"""

from __future__ import annotations

from collections.abc import Iterable

from kvbroker.core.pressure import Room, victims
from kvbroker.core.records import ArenaRecord, DeviceRecord, PoolRecord

RECLAIM_HYSTERESIS = 0.05


def reclaim(
    room: Room, pools: Iterable[PoolRecord], devices: Iterable[DeviceRecord], *, max_victims: int
) -> list[str]:
    """Evict until every pool, and every device, is back below its ``gc_threshold``
    minus ``RECLAIM_HYSTERESIS``. A device's threshold is the lowest of its pools'; its
    victims come from its pools in ascending pool priority.

    At most ``max_victims`` evictions per call, so a caller on an event loop is never
    blocked for long; call again while it returns ``max_victims`` ids. Returns the
    evicted ids. Cost: O(pools + devices) when nothing is above its threshold, plus
    O(1) per candidate the policies offer.
    """
    evicted: list[str] = []
    budget = max_victims

    def shed(arena: ArenaRecord, excess: int) -> int:
        nonlocal budget
        freed = 0
        if arena.compaction is not None:
            return 0
        for idle_only in (True, False):
            for rec in victims(room, arena, excess, 2**31, idle_only=idle_only):
                if freed >= excess or budget <= 0:
                    return freed
                freed += rec.reserved_bytes
                room.evict(rec, "background reclamation above gc_threshold", cause="threshold")
                evicted.append(rec.cache_id)
                budget -= 1
        return freed

    for pool in pools:
        target = int((pool.spec.gc_threshold - RECLAIM_HYSTERESIS) * pool.max_bytes)
        allocated = sum(a.allocated_bytes for a in pool.arenas.values())
        if allocated <= pool.spec.gc_threshold * pool.max_bytes:
            continue
        for arena in pool.arenas.values():
            if allocated <= target or budget <= 0:
                break
            allocated -= shed(arena, allocated - target)
    for device in devices:
        if not device.arenas:
            continue
        arenas = sorted(device.arenas, key=lambda a: a.pool.spec.priority)
        threshold = min(a.pool.spec.gc_threshold for a in arenas)
        capacity = device.spec.capacity_bytes
        allocated = sum(a.allocated_bytes for a in arenas)
        if allocated <= threshold * capacity:
            continue
        target = int((threshold - RECLAIM_HYSTERESIS) * capacity)
        for arena in arenas:
            if allocated <= target or budget <= 0:
                break
            allocated -= shed(arena, allocated - target)
    return evicted
