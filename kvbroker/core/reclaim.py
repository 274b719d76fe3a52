"""Background reclamation: above a pool's or device's ``gc_threshold``, free the memory
nobody is using.

Not on any request's path: the daemon calls it from its periodic tick, so that room is
made before a request needs it. It takes **only idle retained caches**: resident, kept
by ``retain`` alone, with no holder and so no pin. A cache that a live session (or the
sessionless holder of an operator's tool) holds is never taken here, however full its
pool: a worker that just allocated 1.4 GiB in a pool whose threshold that passes is
using it (issue 10.3). Evicting held caches belongs to the pressure ladder
(``kvbroker/core/pressure.py``), and only when another allocation needs the room.

It stops ``RECLAIM_HYSTERESIS`` below the threshold, or every allocation at the
threshold would trigger one more eviction; never touches an arena a compaction freezes.
Victims are taken in the pool's policy order among the idle ones.

Cost: O(pools + devices) when nothing is above its threshold; for an arena above it,
O(its unheld caches) to count the candidates (``ArenaRecord.unheld``), plus the policy
walk, which stops once every idle candidate was taken: an arena full of held caches and
without idle ones costs O(1), not a walk of every cache, on every tick.
"""

from __future__ import annotations

from collections.abc import Iterable

from kvbroker.core.pressure import Room, victims
from kvbroker.core.records import ArenaRecord, DeviceRecord, PoolRecord
from kvbroker.core.types import CacheState

RECLAIM_HYSTERESIS = 0.05
#: What the holders of an evicted cache would be told (it has none) and the log says.
REASON = "idle retained cache reclaimed above gc_threshold"


def idle_candidates(arena: ArenaRecord) -> int:
    """How many caches of ``arena`` background reclamation may take now: resident,
    retained, nobody holds them (a cache nobody holds has no pin either)."""
    return sum(
        1 for rec in arena.unheld.values()
        if rec.state is CacheState.RESIDENT and rec.retain and not rec.moving and not rec.offloading
    )  # fmt: skip


def reclaim(
    room: Room, pools: Iterable[PoolRecord], devices: Iterable[DeviceRecord], *, max_victims: int
) -> list[str]:
    """Evict idle retained caches until every pool, and every device, is back below its
    ``gc_threshold`` minus ``RECLAIM_HYSTERESIS``, or none is left. A device's
    threshold is the lowest of its pools'; its victims come from its pools in ascending
    pool priority.

    At most ``max_victims`` evictions per call, so a caller on an event loop is never
    blocked for long; call again while it returns ``max_victims`` ids. Returns the
    evicted ids (each also in ``Broker.drain_evictions``, cause ``threshold``).
    """
    evicted: list[str] = []
    budget = max_victims

    def shed(arena: ArenaRecord, excess: int) -> int:
        nonlocal budget
        if arena.compaction is not None or not arena.unheld:
            return 0
        left = idle_candidates(arena)
        freed = 0
        if not left:
            return 0
        for rec in victims(room, arena, excess, 2**31, idle_only=True):
            freed += rec.reserved_bytes
            room.evict(rec, REASON, cause="threshold")
            evicted.append(rec.cache_id)
            budget -= 1
            left -= 1
            if freed >= excess or budget <= 0 or left <= 0:
                break
        return freed

    for pool in pools:
        target = int((pool.spec.gc_threshold - RECLAIM_HYSTERESIS) * pool.max_bytes)
        allocated = sum(a.allocated_bytes - a.offloading_bytes for a in pool.arenas.values())
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
        allocated = sum(a.allocated_bytes - a.offloading_bytes for a in arenas)
        if allocated <= threshold * capacity:
            continue
        target = int((threshold - RECLAIM_HYSTERESIS) * capacity)
        for arena in arenas:
            if allocated <= target or budget <= 0:
                break
            allocated -= shed(arena, allocated - target)
    return evicted
