"""The core's state, and the mutations that keep its accounting exact.

``Ledger`` owns the records (devices, pools and their arenas), the cache table, the
segment table and the event queue, and is the one place where a cache's bytes enter or
leave an arena: placement, readiness, pins, eviction and freeing. The use cases
(``Broker``), the pressure ladder and background reclamation (through ``pressure.Room``,
which this class satisfies) and the compaction protocol (``compacting``) all mutate
through it, so the rules below hold whoever calls:

- A PENDING cache holds its bytes but is unknown to its pool's eviction policy until it
  is ready; a freed one is forgotten at once, its bytes given back when it is ready.
- In an arena a compaction freezes, a freed cache's bytes stay allocated (a copy may be
  reading or writing them) until the compaction ends (``Compaction.deferred``).
- Every change of a layout (placement, free, pin 0 <-> 1, readiness, segments) moves
  ``version``, which names the layout a compaction plan was made from.

Not thread-safe: one owner calls it. Every method is O(1) unless it says otherwise.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence

from kvbroker.core.arena import build, layout_of, new_segment_bytes, occupy, round_up, vacate
from kvbroker.core.caches import CacheTable, Gone
from kvbroker.core.compaction import plan_arenas
from kvbroker.core.targeted import opening
from kvbroker.core.freespace import address, segment_of
from kvbroker.core.offload import OFFLOAD_CAUSES, Tiers
from kvbroker.core.records import ArenaRecord, CacheRecord, Compaction, SegmentRecord
from kvbroker.core.segments import SegmentTable
from kvbroker.core.types import (
    CacheState,
    CompactionPlan,
    DeviceSpec,
    Event,
    EventKind,
    Eviction,
    PoolSpec,
    SegmentInfo,
)


#: Evictions kept for the daemon's log between two ``Broker.drain_evictions`` (the
#: engine drains after every mutation; the bound only matters to a core nobody drains).
EVICTION_LOG_LIMIT = 65536


class Ledger:
    """Devices, pools, caches, segments and events of one node, and their mutations."""

    def __init__(
        self, devices: Sequence[DeviceSpec], pools: Sequence[PoolSpec],
        clock: Callable[[], float], id_prefix: str, offload_budgets: Mapping[str, int] | None = None,
    ) -> None:
        self.devices, self.pools = build(devices, pools)
        self.clock = clock
        self.events: list[Event] = []
        #: Every eviction since the last drain (oldest dropped beyond the limit, counted).
        self.evictions: deque[Eviction] = deque(maxlen=EVICTION_LOG_LIMIT)
        self.evictions_dropped = 0
        self.caches = CacheTable(id_prefix)
        self.segments = SegmentTable(self.events, clock)
        #: Compactions in flight, by plan token.
        self.compactions: dict[int, Compaction] = {}
        self.allocation_count = 0
        self.eviction_count = 0
        #: The pressure ladder opens one extent (``targeted``) rather than packing the
        #: arena; off only to compare the two (benchmarks/compaction.py).
        self.targeted_compaction = True
        self._changes = 0
        #: The offload tiers (``kvbroker.core.offload``): ``evict`` offloads through them.
        self.tiers = Tiers(self, offload_budgets)

    @property
    def version(self) -> int:
        """Moves on every change of any layout (never repeats a value)."""
        return self._changes + self.segments.version

    def changed(self) -> None:
        self._changes += 1

    # -- placement --------------------------------------------------------------------

    def place(self, arena: ArenaRecord, reserved: int) -> tuple[int, SegmentRecord] | None:
        """Find ``reserved`` bytes for a new cache in ``arena``: a free extent (unless a
        compaction freezes the arena), else offset 0 of a new CREATING segment if the
        headroom allows one. Returns (address, segment), or None. The caller must
        ``admit`` a record at that address at once."""
        if arena.compaction is None:
            addr = arena.free.take(reserved)
            if addr is not None:
                return addr, self.segments[segment_of(addr)]
        nbytes = new_segment_bytes(arena, reserved)
        if not nbytes:
            return None
        seg = self.segments.create(arena, nbytes)
        return address(seg.info.segment_id, 0), seg

    def admit(self, rec: CacheRecord, seg: SegmentRecord, holder: str, pinned: bool) -> bool:
        """Enter a PENDING cache placed by ``place``. Returns whether its extent may hold
        an earlier cache's bytes (``needs_zeroing``)."""
        self.caches.add(rec, holder)
        if seg.creating:
            seg.arena.withheld_bytes -= rec.reserved_bytes
        reused = occupy(seg, rec)
        rec.arena.pending_caches += 1
        rec.pool.allocation_count += 1
        rec.arena.device.allocation_count += 1
        self.allocation_count += 1
        if pinned:
            self.pin(rec, holder)
        self.changed()
        return reused

    def ready(self, rec: CacheRecord) -> None:
        """PENDING -> RESIDENT: the cache becomes its policy's to order (and evict)."""
        rec.state = CacheState.RESIDENT
        rec.arena.pending_caches -= 1
        if rec.retain and not rec.holders:
            rec.arena.idle_retained += 1
        policy = rec.pool.policy
        policy.on_insert(rec.cache_id, rec.reserved_bytes)
        if rec.pin_count:
            policy.on_pin(rec.cache_id)
        if rec.restoring:
            self.tiers.restored(rec)
        self.changed()

    # -- uses and pins ----------------------------------------------------------------

    def touch(self, rec: CacheRecord) -> None:
        """A use the broker sees (attach, pin): for access times and the policy."""
        rec.last_access_at = self.clock()
        rec.access_count += 1
        if rec.state is CacheState.RESIDENT:
            rec.pool.policy.on_access(rec.cache_id)

    def pin(self, rec: CacheRecord, holder: str) -> None:
        rec.pins[holder] = rec.pins.get(holder, 0) + 1
        rec.pin_count += 1
        if rec.pin_count == 1:
            rec.arena.pinned_bytes += rec.reserved_bytes
            rec.arena.pinned_caches += 1
            if rec.state is CacheState.RESIDENT:
                rec.pool.policy.on_pin(rec.cache_id)
            self.changed()

    def unpin(self, rec: CacheRecord, holder: str, count: int) -> None:
        """Drop ``count`` of ``holder``'s pins (it has at least that many)."""
        left = rec.pins[holder] - count
        if left:
            rec.pins[holder] = left
        else:
            del rec.pins[holder]
        rec.pin_count -= count
        if rec.pin_count == 0 and rec.state is not CacheState.EVICTED:
            rec.arena.pinned_bytes -= rec.reserved_bytes
            rec.arena.pinned_caches -= 1
            if rec.state is CacheState.RESIDENT:
                rec.pool.policy.on_unpin(rec.cache_id)
            self.changed()

    def let_go(self, rec: CacheRecord, holder: str) -> None:
        """``holder`` lets go of ``rec``: its pins, then its hold."""
        if holder in rec.pins:
            self.unpin(rec, holder, rec.pins[holder])
        self.caches.unhold(rec, holder)

    # -- freeing ----------------------------------------------------------------------

    def evict(self, rec: CacheRecord, reason: str, *, cause: str, may_offload: bool = True) -> None:
        """Evict a resident, unpinned cache: bytes freed, epoch bumped, holders told (the
        record stays while they hold it). ``cause`` is counted per arena (one of
        ``EVICTION_CAUSES``); ``reason`` is told to the holders. In a pool that offloads,
        for a cause of ``OFFLOAD_CAUSES``, the cache is offloaded instead when a tier has
        room (``Tiers.begin``: its bytes are freed once the copy-out ends)."""
        if may_offload and cause in OFFLOAD_CAUSES and rec.pool.spec.offload and self.tiers.begin(rec):
            return
        assert rec.state is CacheState.RESIDENT and not rec.pin_count and not rec.moving, rec.cache_id
        arena = rec.arena
        assert arena.compaction is None, "nothing in a frozen arena is evicted"
        arena.evictions[cause] = arena.evictions.get(cause, 0) + 1
        arena.evicted_bytes[cause] = arena.evicted_bytes.get(cause, 0) + rec.reserved_bytes
        rec.pool.policy.on_remove(rec.cache_id, evicted=True)
        self._give_back(rec)
        if rec.retain and not rec.holders:
            arena.idle_retained -= 1
        rec.state = CacheState.EVICTED
        rec.epoch += 1
        rec.pool.eviction_count += 1
        arena.device.eviction_count += 1
        self.eviction_count += 1
        self.queue_event(EventKind.EVICTED, rec, reason)
        if len(self.evictions) == EVICTION_LOG_LIMIT:
            self.evictions_dropped += 1
        self.evictions.append(Eviction(
            rec.cache_id, rec.pool.spec.name, rec.device_id, rec.reserved_bytes, cause, reason, bool(rec.holders),
        ))  # fmt: skip
        if not rec.holders:
            self.caches.forget(rec, Gone.EVICTED)
        self.changed()

    def free(self, rec: CacheRecord, gone: Gone | None) -> None:
        """Forget an unpinned cache (tombstone ``gone``). Its bytes go back to free space
        now, or when the compaction that freezes its arena ends."""
        assert not rec.pin_count and not rec.offloading, rec.cache_id
        if rec.tier:
            self.tiers.freed(rec)
        if rec.state is not CacheState.EVICTED and rec.state is not CacheState.OFFLOADED:
            if rec.state is CacheState.RESIDENT:
                rec.pool.policy.on_remove(rec.cache_id)
            else:
                rec.arena.pending_caches -= 1
            compaction = rec.arena.compaction
            if compaction is not None and not self.segments[segment_of(rec.address)].creating:
                compaction.deferred.append(rec)
            else:
                self._give_back(rec)
        self.caches.forget(rec, gone)
        self.changed()

    def give_back_deferred(self, rec: CacheRecord) -> None:
        """A compaction ended: a cache freed while it ran gives its bytes back."""
        self._give_back(rec)
        self.changed()

    def give_back(self, rec: CacheRecord) -> None:
        """``rec``'s extent goes back to free space (the caller updates its state)."""
        self._give_back(rec)

    def _give_back(self, rec: CacheRecord) -> None:
        seg = self.segments[segment_of(rec.address)]
        vacate(seg, rec, self.clock())
        if seg.creating:
            seg.arena.withheld_bytes += rec.reserved_bytes
        else:
            seg.arena.free.give(rec.address, rec.reserved_bytes)
        rec.address = -1

    def drain_evictions(self) -> tuple[list[Eviction], int]:
        """The evictions since the last drain, and how many older ones were dropped
        (only when more than ``EVICTION_LOG_LIMIT`` piled up undrained)."""
        evictions, dropped = list(self.evictions), self.evictions_dropped
        self.evictions.clear()
        self.evictions_dropped = 0
        return evictions, dropped

    def queue_event(self, kind: EventKind, rec: CacheRecord, reason: str) -> None:
        if rec.holders:
            self.events.append(
                Event(kind, frozenset(rec.holders), cache_id=rec.cache_id, epoch=rec.epoch, reason=reason)
            )

    # -- pressure.Room ----------------------------------------------------------------

    def find(self, cache_id: str) -> CacheRecord | None:
        return self.caches.get(cache_id)

    def retire(self, segment: SegmentRecord) -> SegmentInfo:
        return self.segments.retire(segment)

    def drain(self, segment: SegmentRecord, reason: str) -> None:
        self.segments.drain(segment, reason)

    def plan(self, arena: ArenaRecord, need: int) -> CompactionPlan:
        """The pressure ladder's plan: open ``need`` bytes in ``arena`` (targeted unless
        ``targeted_compaction`` is off, then the full pack)."""
        return self.plan_arenas([arena], need if self.targeted_compaction else None)

    def plan_arenas(self, arenas: Iterable[ArenaRecord], target: int | None = None) -> CompactionPlan:
        """A compaction plan for ``arenas`` (pure): the full pack, or with ``target``
        the fewest moves that open ``target`` bytes per arena (``targeted``). Cost:
        O(n log n) in their caches (plus the targeted planner's window tries)."""
        if target is None:
            return plan_arenas((layout_of(arena) for arena in arenas), self.version)
        opening(target)  # validates it once, for every arena
        # Caches sit at multiples of their pool's block_bytes: an extent of any other size
        # would have the planner slide caches to unaligned offsets.
        pairs = [(layout_of(arena), round_up(target, arena.pool.spec.block_bytes)) for arena in arenas]
        need_of = {id(layout): need for layout, need in pairs}
        return plan_arenas((layout for layout, _ in pairs), self.version,
                           lambda layout: opening(need_of[id(layout)])(layout))  # fmt: skip
