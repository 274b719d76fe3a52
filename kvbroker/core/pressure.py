"""The pressure ladder: what the broker gives up, in which order, to place a request.

On one candidate arena (the requesting pool's share of one device) that a compaction
does not freeze:

1. Evict idle retained caches (no holder, no pin, ``retain``) of equal or lower
   priority, in the pool's policy order: nobody is using them.
2. If the arena's free bytes suffice but are fragmented, return a compaction plan (the
   daemon copies, commits and asks again): moving bytes loses nothing, evicting does.
   The plan opens one extent of the request's size with the fewest bytes moved
   (``kvbroker.core.targeted``), not a pack of the whole arena.
3. Evict unpinned caches of equal or lower priority in the pool's policy order, checking
   after each eviction whether the request fits (or fits after compaction).
4. Take whole segments from other pools on the same device (empty ones first, then
   ones whose every cache may be evicted), only from pools that stay at or above their
   ``min_bytes``, lowest pool priority first; the freed budget becomes a new segment.
   A pool below its own ``min_bytes`` does this before step 3.

A pinned or PENDING cache is never evicted or moved at any step, and a frozen arena
(a compaction in flight) is never touched: neither its caches nor its segments. Waiting
(``wait_timeout_ms``) is the daemon's: it uses ``ResourceExhausted.satisfiable``.

The ladder acts through a narrow ``Room`` (find, evict, retire, drain, plan) and reads
records; it owns no state. Cost: only requests that do not fit pay for this; the victim
walk is O(candidates the policy offers), the feasibility checks O(caches of the arena),
and compaction plans are capped at ``MAX_PLANS`` per request so a layout that pins block
every plan cannot turn eviction quadratic.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple, Protocol

from kvbroker.core.arena import can_grow, granule, headroom, segment_need
from kvbroker.core.records import ArenaRecord, CacheRecord, SegmentRecord
from kvbroker.core.types import CacheState, CompactionPlan, SegmentInfo

MAX_PLANS = 4


class Room(Protocol):
    """What the ladder may do to the broker's state: all it needs, and no more."""

    def find(self, cache_id: str) -> CacheRecord | None: ...
    def evict(self, rec: CacheRecord, reason: str, *, cause: str, may_offload: bool = True) -> None: ...
    def retire(self, segment: SegmentRecord) -> SegmentInfo: ...
    def drain(self, segment: SegmentRecord, reason: str) -> None: ...
    def plan(self, arena: ArenaRecord, need: int) -> CompactionPlan: ...


class RoomResult(NamedTuple):
    """What ``make_room`` did on one arena.

    ``fits``: the request now fits (in a free extent, or as a new segment). ``plan``: a
    compaction that would make it fit (``fits`` is then False). ``evicted`` and
    ``retired`` happened on the way, whatever the outcome: the caller reports them (and
    the backend frees the retired segments).
    """

    fits: bool
    plan: CompactionPlan | None = None
    evicted: tuple[str, ...] = ()
    retired: tuple[SegmentInfo, ...] = ()


def make_room(
    room: Room, arena: ArenaRecord, reserved: int, priority: int,
    *, allow_eviction: bool, allow_compaction: bool,
) -> RoomResult:
    """Run the ladder on ``arena`` until ``reserved`` bytes fit.

    Policy eviction runs only when evicting everything it may evict could make room, so
    a request that cannot succeed destroys no cache for nothing (idle retained caches,
    which nobody uses, may still go).
    """
    assert arena.compaction is None, "the ladder never runs on a frozen arena"
    evicted: list[str] = []
    retired: list[SegmentInfo] = []
    plans = 0

    def done(fits: bool, plan: CompactionPlan | None = None) -> RoomResult:
        return RoomResult(fits, plan, tuple(evicted), tuple(retired))

    def fits() -> bool:
        if arena.free.largest_extent() >= reserved or can_grow(arena, reserved):
            return True
        return _retire_own_empty(room, arena, reserved, retired)

    def on_its_way() -> bool:
        """Offloads in flight will free enough (the engine retries once they end)."""
        return arena.offloading_bytes > 0 and arena.free.free_bytes + arena.offloading_bytes >= reserved

    def compaction() -> CompactionPlan | None:
        nonlocal plans
        if not allow_compaction or plans >= MAX_PLANS or arena.free.free_bytes < reserved:
            return None
        plans += 1
        plan = room.plan(arena, reserved)
        return plan if plan.moves and plan.largest_free_extent_after >= reserved else None

    if fits():
        return done(True)
    if allow_eviction:
        for rec in victims(room, arena, reserved, priority, idle_only=True):
            room.evict(rec, "idle retained cache reclaimed", cause="idle")
            evicted.append(rec.cache_id)
            if fits():
                return done(True)
            if on_its_way():
                return done(False)
    plan = compaction()
    if plan is not None:
        return done(False, plan)
    if not allow_eviction:
        return done(False)
    if arena.pool.kept_bytes < arena.pool.spec.min_bytes:
        # Below its guaranteed minimum, a pool takes from pools above theirs before it
        # evicts its own caches.
        taken = _take_segments(room, arena, reserved, priority, retired, evicted)
        if taken is not False:
            return done(bool(taken))
    if _policy_eviction_can_help(arena, reserved, priority):
        for rec in victims(room, arena, reserved, priority, idle_only=False):
            room.evict(rec, f"evicted by pool {arena.pool.spec.name!r} policy", cause="policy")
            evicted.append(rec.cache_id)
            if fits():
                return done(True)
            if on_its_way():
                return done(False)
            plan = compaction()
            if plan is not None:
                return done(False, plan)
    return done(bool(_take_segments(room, arena, reserved, priority, retired, evicted)))


def victims(
    room: Room, arena: ArenaRecord, reserved: int, priority: int, *, idle_only: bool
) -> Iterator[CacheRecord]:
    """Evictable caches of ``arena`` in the pool's policy order: resident, unpinned, of
    at most ``priority``; with ``idle_only``, only retained caches nobody holds. The
    policy knows only resident caches. Cost: O(1) per candidate the policy offers."""
    for cache_id in arena.pool.policy.victims(reserved):
        rec = room.find(cache_id)
        if rec is None or rec.arena is not arena or rec.pin_count or rec.priority > priority:
            continue
        if idle_only and (rec.holders or not rec.retain):
            continue
        yield rec


def _evictable(rec: CacheRecord, priority: int) -> bool:
    return rec.state is CacheState.RESIDENT and not rec.pin_count and rec.priority <= priority and not rec.offloading


def _policy_eviction_can_help(arena: ArenaRecord, reserved: int, priority: int) -> bool:
    """Whether evicting every cache the request may evict in this arena could make room:
    the freed bytes plus the free ones reach the request (compaction then joins them),
    or whole segments freed that way let a big enough segment be made. When neither
    holds, eviction would destroy caches and still fail, so the ladder skips it.
    Cost: O(caches of the arena)."""
    free = arena.free.free_bytes
    growable = headroom(arena)
    for seg in arena.segments.values():
        evictable = sum(r.reserved_bytes for r in seg.caches.values() if _evictable(r, priority) or r.offloading)
        free += evictable
        if evictable == sum(r.reserved_bytes for r in seg.caches.values()):
            growable += seg.info.nbytes
    return free >= reserved or growable >= segment_need(arena, reserved)


def _retire_own_empty(room: Room, arena: ArenaRecord, reserved: int, retired: list[SegmentInfo]) -> bool:
    """Retire the arena's empty unmapped segments if that lets a big enough segment be
    created (a request larger than any of them). Retires nothing when it would not help."""
    empty = sorted(
        (seg.info.nbytes, sid, seg) for sid, seg in arena.segments.items()
        if not seg.caches and not seg.mappers
    )
    if not empty or headroom(arena) + sum(n for n, _, _ in empty) < segment_need(arena, reserved):
        return False
    for _, _, seg in empty:
        retired.append(room.retire(seg))
        if can_grow(arena, reserved):
            return True
    return False


def _take_segments(
    room: Room, arena: ArenaRecord, reserved: int, priority: int,
    retired: list[SegmentInfo], evicted: list[str],
) -> bool | None:
    """Take whole segments from other pools (and our own empty ones) on this device.

    Returns True when the request can now be placed, None when the room will come from
    draining segments (the chosen mapped ones, whose mappers were just told to unmap, or
    ones already draining; a waiting request is served once they unmapped), False when
    no choice of segments would make room. Frozen arenas are never taken from."""
    pool = arena.pool
    unit = granule(arena)
    need = segment_need(arena, reserved)
    neighbours = arena.device.arenas
    keeps = {other.pool.spec.name: other.pool.kept_bytes for other in neighbours}
    candidates = []
    for other_arena in neighbours:
        other = other_arena.pool
        if other_arena.compaction is not None:
            continue
        for seg in other_arena.segments.values():
            if other is not pool and keeps[other.spec.name] - seg.info.nbytes < other.spec.min_bytes:
                continue
            recs = list(seg.caches.values())
            if not all(_evictable(r, priority) for r in recs):
                continue
            if other is pool and recs:
                continue  # our own caches were already offered to the policy
            live = sum(r.reserved_bytes for r in recs)
            candidates.append((bool(seg.mappers), live > 0, other.spec.priority, live, seg.info.segment_id, seg))
    # Unmapped segments first: they come back at once; a mapped one only drains (its
    # mappers are told to unmap) and the request is served once they did.
    candidates.sort(key=lambda c: c[:5])

    def choose(usable: list, unreserved: int, own_reserved: int) -> list[SegmentRecord] | None:
        """Choose first, act after: segments are taken only if enough of them can be
        taken to place the request, and each other pool's ``min_bytes`` is checked
        against what it keeps after every segment chosen from it so far."""
        kept: dict[str, int] = {}
        chosen: list[SegmentRecord] = []
        for *_, seg in usable:
            if min(unreserved, pool.max_bytes - own_reserved) // unit * unit >= need:
                return chosen
            other, nbytes = seg.arena.pool, seg.info.nbytes
            if other is pool:
                own_reserved -= nbytes
            else:
                left = kept.get(other.spec.name, keeps[other.spec.name]) - nbytes
                if left < other.spec.min_bytes:
                    continue
                kept[other.spec.name] = left
            unreserved += nbytes
            chosen.append(seg)
        if min(unreserved, pool.max_bytes - own_reserved) // unit * unit >= need:
            return chosen
        return None

    def evict_all(seg: SegmentRecord) -> None:
        for rec in list(seg.caches.values()):
            room.evict(rec, reason, cause="reclaim")
            evicted.append(rec.cache_id)

    reason = f"memory reclaimed for pool {pool.spec.name!r}"
    # Room now, from unmapped segments alone: take them (retired, returned with the cache).
    chosen = choose([c for c in candidates if not c[0]], arena.device.unreserved_bytes, pool.reserved_bytes)
    if chosen is not None:
        for seg in chosen:
            evict_all(seg)
            retired.append(room.retire(seg))
        assert can_grow(arena, reserved), "taking the chosen segments made no room"
        return True
    # Room later, once mappers unmap: segments already draining count as on their way
    # (so a request retried meanwhile takes nothing more); drain the mapped segments
    # chosen and leave the unmapped ones for the retry, because a request that fails
    # returns no retired segment for the backend to free.
    pending = sum(a.draining_bytes for a in neighbours)
    own_pending = sum(a.draining_bytes for a in pool.arenas.values())
    chosen = choose(candidates, arena.device.unreserved_bytes + pending, pool.reserved_bytes - own_pending)
    if chosen is None:
        return False
    for seg in chosen:
        if seg.mappers:
            evict_all(seg)
            room.drain(seg, reason)  # nothing retired now
    return None  # the room arrives with the unmapping
