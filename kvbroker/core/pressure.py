"""The pressure ladder: what the broker gives up, in which order, to place a request.

DESIGN.md §4, on one candidate arena (the requesting pool's share of one device):

1. Evict idle retained caches (no holder, no pin, ``retain``) of equal or lower
   priority, in the pool's policy order: nobody is using them.
2. If the arena's free bytes suffice but are fragmented, return a compaction plan (the
   daemon copies, commits and asks again): moving bytes loses nothing, evicting does.
3. Evict unpinned caches of equal or lower priority in the pool's policy order, checking
   after each eviction whether the request fits (or fits after compaction).
4. Take whole segments from other pools on the same device (empty ones first, then
   ones whose every cache may be evicted), only from pools that stay at or above their
   ``min_bytes``, lowest pool priority first; the freed budget becomes a new segment.

A pinned cache is never evicted or moved at any step. Waiting (``wait_timeout_ms``) is
the daemon's: it uses ``ResourceExhausted.satisfiable`` to decide whether to queue.

Cost: only requests that do not fit pay for this; each step is O(caches of the pool)
for the victim walk, and compaction plans are capped at ``MAX_PLANS`` per request so a
layout that pins block every plan cannot turn eviction quadratic.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kvbroker.core.types import CacheState, CompactionPlan, SegmentInfo

if TYPE_CHECKING:
    from kvbroker.core.broker import Broker
    from kvbroker.core.records import ArenaRecord, CacheRecord

MAX_PLANS = 4


def make_room(
    broker: Broker,
    arena: ArenaRecord,
    reserved: int,
    priority: int,
    retired: list[SegmentInfo],
    evicted: list[str],
    *,
    allow_eviction: bool,
    allow_compaction: bool,
) -> bool | CompactionPlan:
    """Run the ladder on ``arena`` until ``reserved`` bytes fit.

    Returns True when the request now fits (in a free extent or as a new segment), a
    ``CompactionPlan`` when compaction would make it fit, False when this arena cannot
    make room. Evictions and retirements done on the way are appended to ``evicted`` and
    ``retired``. Policy eviction runs only when evicting everything it may evict could
    make room, so a request that cannot succeed destroys no cache for nothing (idle
    retained caches, which nobody uses, may still go).
    """
    plans = 0

    def fits() -> bool:
        if arena.free.largest_extent() >= reserved or _can_grow(broker, arena, reserved):
            return True
        return _retire_own_empty(broker, arena, reserved, retired)

    def compaction() -> CompactionPlan | None:
        nonlocal plans
        if not allow_compaction or plans >= MAX_PLANS or arena.free.free_bytes < reserved:
            return None
        plans += 1
        device, pool = arena.device.spec.device_id, arena.pool.spec.name
        plan = broker.plan_compaction(device=device, pool=pool)
        return plan if plan.moves and plan.largest_free_extent_after >= reserved else None

    if fits():
        return True
    if allow_eviction:
        for rec in _victims(arena, reserved, priority, idle_only=True):
            broker._evict(rec, "idle retained cache reclaimed", cause="idle")
            evicted.append(rec.cache_id)
            if fits():
                return True
    plan = compaction()
    if plan is not None:
        return plan
    if not allow_eviction:
        return False
    pool = arena.pool
    kept = pool.reserved_bytes - sum(a.draining_bytes for a in pool.arenas.values())
    if kept < pool.spec.min_bytes:
        # Below its guaranteed minimum, a pool takes from pools above theirs before it
        # evicts its own caches.
        taken = _take_segments(broker, arena, reserved, priority, retired, evicted)
        if taken is not False:
            return bool(taken)
    if _policy_eviction_can_help(broker, arena, reserved, priority):
        for rec in _victims(arena, reserved, priority, idle_only=False):
            broker._evict(rec, f"evicted by pool {arena.pool.spec.name!r} policy", cause="policy")
            evicted.append(rec.cache_id)
            if fits():
                return True
            plan = compaction()
            if plan is not None:
                return plan
    return bool(_take_segments(broker, arena, reserved, priority, retired, evicted))


def _policy_eviction_can_help(broker: Broker, arena: ArenaRecord, reserved: int, priority: int) -> bool:
    """Whether evicting every cache the request may evict in this arena could make room:
    the freed bytes plus the free ones reach the request (compaction then joins them),
    or whole segments freed that way let a big enough segment be made. When neither
    holds, eviction would destroy caches and still fail, so the ladder skips it.
    Cost: O(caches of the arena)."""
    free = arena.free.free_bytes
    growable = broker._headroom(arena)
    for seg in arena.segments.values():
        evictable = sum(
            r.reserved_bytes for r in seg.caches.values() if not r.pin_count and r.priority <= priority
        )
        free += evictable
        if evictable == sum(r.reserved_bytes for r in seg.caches.values()):
            growable += seg.info.nbytes
    return free >= reserved or growable >= _segment_need(arena, reserved)


def _victims(arena: ArenaRecord, reserved: int, priority: int, *, idle_only: bool):
    """Evictable caches of ``arena`` in the pool's policy order."""
    pool = arena.pool
    device_id = arena.device.spec.device_id
    caches = pool_caches(arena)
    for cache_id in pool.policy.victims(reserved):
        rec = caches.get(cache_id)
        if rec is None or rec.device_id != device_id or rec.pin_count or rec.priority > priority:
            continue
        if idle_only and (rec.holders or not rec.retain):
            continue
        yield rec


def pool_caches(arena: ArenaRecord) -> dict[str, CacheRecord]:
    """Resident caches of one arena by id. Cost: O(caches of the arena)."""
    return {cid: rec for seg in arena.segments.values() for cid, rec in seg.caches.items()}


def _segment_need(arena: ArenaRecord, reserved: int) -> int:
    """The smallest segment ``Broker._grow`` would create for ``reserved`` bytes: the
    size rounded up to the granule, and never below the device's minimum segment."""
    granule = max(arena.device.spec.segment_alignment_bytes, arena.pool.spec.block_bytes)
    floor = -(-arena.device.spec.min_segment_bytes // granule) * granule
    return max(-(-reserved // granule) * granule, floor)


def _can_grow(broker: Broker, arena: ArenaRecord, reserved: int) -> bool:
    return _segment_need(arena, reserved) <= broker._headroom(arena)


def _retire_own_empty(
    broker: Broker, arena: ArenaRecord, reserved: int, retired: list[SegmentInfo]
) -> bool:
    """Retire the arena's empty segments if that lets a big enough segment be created
    (a request larger than any of them). Retires nothing when it would not help."""
    empty = sorted(
        (seg.info.nbytes, sid) for sid, seg in arena.segments.items()
        if not seg.caches and not seg.mappers
    )
    need = _segment_need(arena, reserved)
    if not empty or broker._headroom(arena) + sum(n for n, _ in empty) < need:
        return False
    for _, segment_id in empty:
        retired.append(broker.retire_segment(segment_id))
        if _can_grow(broker, arena, reserved):
            return True
    return False


def _take_segments(
    broker: Broker,
    arena: ArenaRecord,
    reserved: int,
    priority: int,
    retired: list[SegmentInfo],
    evicted: list[str],
) -> bool | None:
    """Take whole segments from other pools (and our own empty ones) on this device.

    Returns True when the request can now be placed, None when the room will come from
    draining segments (the chosen mapped ones, whose mappers were just told to unmap, or
    ones already draining; a waiting request is served once they unmapped), False when
    no choice of segments would make room."""
    pool = arena.pool
    granule = max(arena.device.spec.segment_alignment_bytes, pool.spec.block_bytes)
    need = _segment_need(arena, reserved)
    # Retiring our own empty segments counts as room only if the pool's quota then
    # allows a segment of the needed size.
    candidates = []
    # What each pool keeps, for its min_bytes: its draining segments are already leaving.
    keeps = {p.spec.name: p.reserved_bytes - sum(a.draining_bytes for a in p.arenas.values())
             for p in broker._pools.values()}
    for other in broker._pools.values():
        other_arena = other.arenas.get(arena.device.spec.device_id)
        if other_arena is None:
            continue
        for seg in other_arena.segments.values():
            if other is not pool and keeps[other.spec.name] - seg.info.nbytes < other.spec.min_bytes:
                continue
            recs = list(seg.caches.values())
            if any(r.pin_count or r.priority > priority for r in recs):
                continue
            if other is pool and recs:
                continue  # our own caches were already offered to the policy
            live = sum(r.reserved_bytes for r in recs)
            mapped = bool(seg.mappers)
            candidates.append((mapped, live > 0, other.spec.priority, live, seg.info.segment_id, other, recs))
    # Unmapped segments first: they come back at once; a mapped one only drains (its
    # mappers are told to unmap) and the request is served once they did.
    candidates.sort(key=lambda c: c[:5])
    # Choose first, act after: a segment is taken only if enough of them can be taken to
    # place the request (else nothing is evicted or retired), and each other pool's
    # min_bytes is checked against what it keeps after every segment chosen from it so
    # far.
    def choose(usable: list, unreserved: int, own_reserved: int) -> list | None:
        kept: dict[str, int] = {}
        chosen: list = []
        for _, _, _, _, segment_id, other, recs in usable:
            if min(unreserved, pool.max_bytes - own_reserved) // granule * granule >= need:
                return chosen
            nbytes = broker._segments[segment_id].info.nbytes
            if other is pool:
                own_reserved -= nbytes
            else:
                left = kept.get(other.spec.name, keeps[other.spec.name]) - nbytes
                if left < other.spec.min_bytes:
                    continue
                kept[other.spec.name] = left
            unreserved += nbytes
            chosen.append((segment_id, recs))
        if min(unreserved, pool.max_bytes - own_reserved) // granule * granule >= need:
            return chosen
        return None

    reason = f"memory reclaimed for pool {pool.spec.name!r}"
    # Room now, from unmapped segments alone: take them (retired, returned with the cache).
    chosen = choose([c for c in candidates if not c[0]], arena.device.unreserved_bytes, pool.reserved_bytes)
    if chosen is not None:
        for segment_id, recs in chosen:
            for rec in recs:
                if rec.state is CacheState.RESIDENT:
                    broker._evict(rec, reason, cause="reclaim")
                    evicted.append(rec.cache_id)
            retired.append(broker.retire_segment(segment_id))
        assert _can_grow(broker, arena, reserved), "taking the chosen segments made no room"
        return True
    # Room later, once mappers unmap: segments already draining count as on their way
    # (so a request retried meanwhile takes nothing more); drain the mapped segments
    # chosen and leave the unmapped ones for the retry, because a request that fails
    # returns no retired segment for the backend to free.
    device_id = arena.device.spec.device_id
    pending = sum(p.arenas[device_id].draining_bytes for p in broker._pools.values() if device_id in p.arenas)
    own_pending = sum(a.draining_bytes for a in pool.arenas.values())
    chosen = choose(candidates, arena.device.unreserved_bytes + pending, pool.reserved_bytes - own_pending)
    if chosen is None:
        return False
    for segment_id, recs in chosen:
        if broker._segments[segment_id].mappers:
            for rec in recs:
                if rec.state is CacheState.RESIDENT:
                    broker._evict(rec, reason, cause="reclaim")
                    evicted.append(rec.cache_id)
            broker.release_segment(segment_id, reason)  # drains: nothing retired now
    return None  # the room arrives with the unmapping


#: Background reclamation stops this far below a pool's ``gc_threshold`` (hysteresis:
#: without it, every allocation at the threshold would trigger one more eviction).
RECLAIM_HYSTERESIS = 0.05


def reclaim(broker: Broker, *, max_victims: int) -> list[str]:
    """Evict until every pool, and every device, is back below its ``gc_threshold``
    minus ``RECLAIM_HYSTERESIS``: idle retained caches first, then unpinned caches in
    the pool's policy order. A device's threshold is the lowest of its pools'; its
    victims come from its pools in ascending pool priority.

    At most ``max_victims`` evictions per call, so a caller on an event loop is never
    blocked for long; call again while it returns ``max_victims`` ids. Pinned caches are
    never taken. Returns the evicted ids.
    """
    evicted: list[str] = []
    budget = max_victims

    def shed(arena: ArenaRecord, excess: int) -> int:
        nonlocal budget
        freed = 0
        for idle_only in (True, False):
            for rec in _victims(arena, excess, 2**31, idle_only=idle_only):
                if freed >= excess or budget <= 0:
                    return freed
                freed += rec.reserved_bytes
                broker._evict(rec, "background reclamation above gc_threshold", cause="threshold")
                evicted.append(rec.cache_id)
                budget -= 1
        return freed

    for pool in broker._pools.values():
        target = int((pool.spec.gc_threshold - RECLAIM_HYSTERESIS) * pool.max_bytes)
        allocated = sum(a.allocated_bytes for a in pool.arenas.values())
        if allocated <= pool.spec.gc_threshold * pool.max_bytes:
            continue
        for arena in pool.arenas.values():
            if allocated <= target or budget <= 0:
                break
            allocated -= shed(arena, allocated - target)
    for device_id, device in broker._devices.items():
        arenas = sorted(
            (p.arenas[device_id] for p in broker._pools.values() if device_id in p.arenas),
            key=lambda a: a.pool.spec.priority,
        )
        if not arenas:
            continue
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
