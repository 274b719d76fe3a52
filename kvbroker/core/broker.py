"""The broker core's use cases: every decision about who gets which bytes, as state changes.

``Broker`` is the facade the daemon calls: it validates, sequences and answers; the state
and its exact accounting live in ``Ledger``, the pressure ladder in ``pressure``, the
compaction protocol in ``compacting``. It speaks integers and ids; bytes live behind
backends that the daemon drives, outside its lock, from what is returned here:

- ``allocate`` places a PENDING cache (or returns a compaction plan to run first). The
  daemon creates ``new_segment`` (then ``segment_created``), zeroes the extent when
  ``needs_zeroing`` and the pool scrubs, then ``cache_ready``; or ``abort_allocation``.
- ``plan_compaction`` / ``begin_compaction`` / copy / ``commit`` (of all moves or a
  prefix) or ``abort_compaction``.
- ``offload`` (``kvbroker.core.offload``): in a pool with ``offload``, the ladder's and
  reclamation's evictions become copy-outs (``drain_jobs``, then ``finish`` or ``fail``);
  an OFFLOADED cache is placed again by ``place_restore``, then ``cache_ready``.
- Evictions and moves bump the cache's epoch and queue an ``Event`` for its holders
  (``drain_events``); every eviction is also queued for the daemon's log, held or not
  (``drain_evictions``). Retired segments are returned by the call that retired them.

Nothing a client or a session triggers costs time proportional to every cache: look-ups
are by id, a session's end walks its own caches and segments, a ListCaches page costs
O(log n + page), stats O(arenas + free extents).

Not thread-safe by design: one owner (the daemon's event loop) calls it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence

from kvbroker.core import compacting
from kvbroker.core.admin import PoolAdmin
from kvbroker.core.caches import Gone
from kvbroker.core.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, echo
from kvbroker.core.freespace import segment_of
from kvbroker.core.ledger import Ledger
from kvbroker.core.placement import candidate_arenas, check_metadata, find_pool, find_room, request_size
from kvbroker.core.reclaim import reclaim
from kvbroker.core.records import CacheRecord
from kvbroker.core.stats import snapshot
from kvbroker.core.types import (
    ANONYMOUS_HOLDER,
    AllocateResult,
    AllocationRequest,
    BrokerStats,
    CacheInfo,
    CacheState,
    CompactionPlan,
    DeviceSpec,
    Event,
    EventKind,
    Eviction,
    HolderSummary,
    PoolSpec,
    SegmentInfo,
    validate_id,
)


class Broker:
    """Devices, pools, segments and caches of one node, and the rules between them.

    Args:
        devices: the devices the broker owns.
        pools: pool definitions; each pool's devices must be among ``devices``.
        clock: seconds, for access times and segment idleness (injectable for tests).
        id_prefix: prefix of generated cache ids (the daemon passes its instance id so
            ids stay unique across restarts).
        targeted_compaction: False: the pressure ladder packs arenas (see ``targeted``).
        offload_budgets: bytes each offload tier may hold (``offload``; ``Broker.offload``).
    """

    def __init__(
        self, devices: Sequence[DeviceSpec], pools: Sequence[PoolSpec], *,
        clock: Callable[[], float] = time.time, id_prefix: str = "c", targeted_compaction: bool = True,
        offload_budgets: Mapping[str, int] | None = None,
    ) -> None:
        self._ledger = Ledger(devices, pools, clock, id_prefix, offload_budgets)
        self._ledger.targeted_compaction = targeted_compaction
        self.admin = PoolAdmin(self._ledger)  # operators' evictions and limits (``admin``)
        self.offload = self._ledger.tiers  # the offload tier's protocol (``offload``)
        self._pools = self._ledger.pools  # read by benchmarks/fragmentation.py --check

    # -- queries ----------------------------------------------------------------------

    @property
    def pools(self) -> tuple[PoolSpec, ...]:
        return tuple(p.spec for p in self._ledger.pools.values())

    @property
    def devices(self) -> tuple[DeviceSpec, ...]:
        return tuple(d.spec for d in self._ledger.devices.values())

    def get(self, cache_id: str) -> CacheInfo:
        """The cache's current view. Raises ``NotFound``, ``FailedPrecondition``."""
        return self._ledger.caches.lookup(cache_id).info()

    def is_moving(self, cache_id: str) -> bool:
        """Whether a compaction in flight is copying the cache (False for unknown ids)."""
        rec = self._ledger.caches.get(cache_id)
        return rec is not None and rec.moving

    def caches(
        self, *, pool: str | None = None, model_name: str | None = None, state: CacheState | None = None,
    ) -> list[CacheInfo]:
        """Matching caches by id. O(caches): for tests and tools (the daemon pages)."""
        match = self._matcher(pool, model_name, state)
        return [rec.info() for rec in self._ledger.caches.in_order() if match(rec)]

    def list_caches(
        self, *, pool: str | None = None, model_name: str | None = None,
        state: CacheState | None = None, after: str = "", limit: int,
    ) -> tuple[list[CacheInfo], str]:
        """One page: at most ``limit`` matching caches with ids after ``after``, ordered
        by id, and the token of the next page ("" at the end; a page may come back short
        before the end when its filter matched little, see ``CacheTable.page``).
        Cost: O(log n + limit + PAGE_SCAN_SLACK)."""
        if type(limit) is not int or limit <= 0:
            raise InvalidArgument("page_size", f"must be a positive integer, got {echo(limit)}")
        records, token = self._ledger.caches.page(self._matcher(pool, model_name, state), after, limit)
        return [rec.info() for rec in records], token

    def _matcher(
        self, pool: str | None, model_name: str | None, state: CacheState | None
    ) -> Callable[[CacheRecord], bool]:
        if pool is not None:
            find_pool(self._ledger.pools, pool)
        return lambda rec: (
            (pool is None or rec.pool.spec.name == pool)
            and (model_name is None or rec.model_name == model_name)
            and (state is None or rec.state is state)
        )

    def segment(self, segment_id: int) -> SegmentInfo:
        """A segment (creating, placeable or draining). Raises ``NotFound``."""
        return self._ledger.segments.lookup(segment_id).info

    def segments(self) -> list[SegmentInfo]:
        return [seg.info for seg in self._ledger.segments]

    def stats(self) -> BrokerStats:
        """One consistent snapshot of every figure. Cost: O(arenas + free extents)."""
        ledger = self._ledger
        return snapshot(ledger.devices.values(), ledger.pools.values(),
                        ledger.allocation_count, ledger.eviction_count)

    def drain_events(self) -> list[Event]:
        """Return and clear the events queued since the last call."""
        events = list(self._ledger.events)
        self._ledger.events.clear()
        return events

    def drain_evictions(self) -> tuple[list[Eviction], int]:
        """Return and clear the evictions since the last call (``Ledger.drain_evictions``)."""
        return self._ledger.drain_evictions()

    # -- allocation -------------------------------------------------------------------

    def allocate(
        self, request: AllocationRequest, *, allow_eviction: bool = True, allow_compaction: bool = True,
    ) -> AllocateResult:
        """Place a new PENDING cache, running the pressure ladder when it does not fit.

        Per candidate arena: a free extent, else a new segment within the pool's quota
        and the device budget; when no arena has room, the ladder of ``pressure`` per
        arena (not on arenas a compaction freezes): idle retained caches, compaction
        (returned as a plan), policy eviction, other pools' segments. Else
        ``ResourceExhausted``. Raises InvalidArgument, NotFound, AlreadyExists too.
        """
        ledger = self._ledger
        pool = find_pool(ledger.pools, request.pool)
        nbytes, reserved = request_size(pool, request.nbytes)
        priority = pool.spec.priority if request.priority is None else request.priority
        check_metadata(request, priority)
        cache_id = request.cache_id
        if cache_id:
            validate_id("cache_id", cache_id)
            if cache_id in ledger.caches.records:
                raise AlreadyExists(f"cache {cache_id!r} already exists")
        arenas = candidate_arenas(pool, ledger.devices, request.device_hint, reserved)
        spot, arena, plan, evicted, retired = find_room(ledger, pool, arenas, reserved, priority,
                                                        allow_eviction, allow_compaction)  # fmt: skip
        if spot is None:
            return AllocateResult(None, plan, None, retired, evicted)
        addr, seg = spot
        now = ledger.clock()
        # Positional: this runs on every allocation and keyword passing costs microseconds.
        rec = CacheRecord(
            cache_id or ledger.caches.new_id(), pool, arena, arena.device.spec.device_id,
            request.model_name, nbytes, reserved, addr, priority, request.retain, now,
            request.dtype, tuple(request.shape), CacheState.PENDING, 0, set(), {}, 0, now, 1,
        )
        new_segment = seg.info if seg.creating else None
        needs_zeroing = ledger.admit(rec, seg, request.holder, request.pinned)
        return AllocateResult(rec.info(), None, new_segment, retired, evicted, needs_zeroing)

    def segment_created(self, segment_id: int) -> None:
        """The backend created a new segment: its withheld bytes become placeable."""
        self._ledger.segments.created(self._ledger.segments.lookup(segment_id))

    def cache_ready(self, cache_id: str) -> bool:
        """A PENDING cache's bytes are ready (its segment created, its extent zeroed):
        it becomes RESIDENT and True is returned. False when its holders left meanwhile:
        it is freed instead (a later Release of it is harmless)."""
        rec = self._pending(cache_id)
        if self._ledger.segments[segment_of(rec.address)].creating:
            raise RuntimeError(f"cache {cache_id!r} is ready before its segment was created")
        if rec.doomed:
            self._ledger.free(rec, Gone.RELEASED)
            return False
        self._ledger.ready(rec)
        return True

    def abort_allocation(self, result: AllocateResult) -> tuple[SegmentInfo, ...]:
        """Undo a PENDING allocation whose backend work failed or was cancelled: the cache
        goes without events or tombstone (nobody saw it). A new segment still being
        created goes with it and is not returned (the backend cleans up its own failed
        create); one already ``segment_created`` stays, as an empty segment of the pool
        (the daemon must not free it). Returns segments to free: always () today."""
        if result.cache is None:
            raise RuntimeError("only an allocation that placed a cache can be aborted")
        ledger = self._ledger
        rec = self._pending(result.cache.cache_id)
        if rec.extent != result.cache.extents[0]:
            raise RuntimeError(f"cache {rec.cache_id!r} is not the allocation to abort")
        if rec.restoring:  # a restore: back to OFFLOADED, its tier copy intact
            self.offload.abort_restore(rec)
            return ()
        for holder in list(rec.pins):
            ledger.unpin(rec, holder, rec.pins[holder])
        seg = ledger.segments[segment_of(rec.address)]
        ledger.free(rec, None)
        if seg.creating and not seg.caches:
            ledger.segments.discard(seg)
        return ()

    def _pending(self, cache_id: str) -> CacheRecord:
        rec = self._ledger.caches.get(cache_id)
        if rec is None or rec.state is not CacheState.PENDING:
            raise RuntimeError(f"cache {cache_id!r} is not pending")
        return rec

    # -- holders and pins -------------------------------------------------------------

    def attach(self, cache_id: str, holder: str = ANONYMOUS_HOLDER) -> CacheInfo:
        """Hold an existing resident cache. Raises ``NotFound``, ``FailedPrecondition``
        (evicted, not ready yet, being moved)."""
        rec = self._usable(cache_id)
        self._ledger.caches.hold(rec, holder)
        self._ledger.touch(rec)
        return rec.info()

    def pin(self, cache_id: str, holder: str = ANONYMOUS_HOLDER) -> CacheInfo:
        """Count one pin by ``holder`` (who becomes a holder). A pinned cache is never
        evicted or moved. Raises as ``attach``."""
        rec = self._usable(cache_id)
        self._ledger.caches.hold(rec, holder)
        self._ledger.pin(rec, holder)
        self._ledger.touch(rec)
        return rec.info()

    def unpin(self, cache_id: str, holder: str = ANONYMOUS_HOLDER) -> CacheInfo:
        """Drop one pin of ``holder``. Raises ``FailedPrecondition`` when it has none."""
        rec = self._ledger.caches.lookup(cache_id)
        if not rec.pins.get(holder):
            raise FailedPrecondition(f"cache {cache_id!r} is not pinned by this caller")
        self._ledger.unpin(rec, holder, 1)
        return rec.info()

    def release(self, cache_id: str, holder: str = ANONYMOUS_HOLDER, *, force: bool = False) -> bool:
        """Drop ``holder``'s hold and pins; free the cache when nobody holds it and it is
        not retained. Idempotent. Returns True when this call freed a resident cache.

        With ``force``, the cache is freed whoever holds or retains it, unless another
        holder pins it; its other holders get an EVICTED event, and FailedPrecondition
        ("was evicted (released by force)") on their next use. A PENDING cache is only
        marked: ``cache_ready`` frees it. Raises ``NotFound`` for an id that never existed.
        """
        ledger = self._ledger
        rec = ledger.caches.get(cache_id)
        if rec is None:
            if ledger.caches.gone(cache_id) is not None:
                return False
            ledger.caches.lookup(cache_id)  # raises InvalidArgument or NotFound
        assert rec is not None
        if force and any(h != holder for h in rec.pins):
            others = sum(h != holder for h in rec.pins)
            raise FailedPrecondition(
                f"cache {cache_id!r} is pinned by {others} other holder(s); it cannot be force-released"
            )
        ledger.let_go(rec, holder)
        gone = Gone.RELEASED
        if force and rec.holders:
            if rec.state is CacheState.RESIDENT or rec.state is CacheState.OFFLOADED:
                rec.epoch += 1  # the other holders lose the cache: tell them with a new epoch
                ledger.queue_event(EventKind.EVICTED, rec, "released by force")
                gone = Gone.FORCED
            ledger.caches.unhold_all(rec)
        if rec.holders or (rec.retain and not force and rec.state is not CacheState.EVICTED):
            return False
        if rec.state is CacheState.PENDING or rec.offloading:  # freed when its copy ends
            rec.doomed = True
            return False
        if rec.state is CacheState.EVICTED:
            ledger.free(rec, Gone.EVICTED)
            return False
        rec.arena.release_count += 1
        ledger.free(rec, gone)
        return True

    def drop_holder(self, holder: str) -> list[str]:
        """Drop every hold and pin of ``holder``; returns the ids of the caches freed.
        Cost: O(caches ``holder`` holds)."""
        return [cache_id for cache_id in self._ledger.caches.held_by(holder) if self.release(cache_id, holder)]

    def end_session(self, holder: str) -> tuple[list[str], list[SegmentInfo]]:
        """A session ended (its stream broke or its lease ran out): drop its holds and
        pins, free its non-retained caches, forget its mappings (a dead process maps
        nothing). Returns the freed ids and the segments retired as a result (drained
        ones it was the last mapper of). Cost: O(its caches + its segments)."""
        return self.drop_holder(holder), self._ledger.segments.end_mappings(holder)

    def holder_summary(self, holder: str) -> HolderSummary:
        """What ``holder`` holds, pins and maps. Cost: O(the caches it holds)."""
        caches = self._ledger.caches
        records = [rec for cache_id in caches.held_by(holder) if (rec := caches.get(cache_id)) is not None]
        mapped = self._ledger.segments.mapped_by().get(holder, ())
        return HolderSummary(len(records), sum(rec.pins.get(holder, 0) for rec in records), len(mapped))

    def note_mapped(self, segment_id: int, holder: str) -> None:
        """``holder`` was handed ``segment_id``'s handle (and may map it)."""
        self._ledger.segments.note_mapped(segment_id, holder)

    def note_unmapped(self, segment_id: int, holder: str) -> SegmentInfo | None:
        """``holder`` unmapped the segment; returns it when this retired it (the last
        mapper of a draining segment), for the backend to free."""
        return self._ledger.segments.note_unmapped(segment_id, holder)

    def _usable(self, cache_id: str) -> CacheRecord:
        rec = self._ledger.caches.lookup(cache_id)
        if rec.state is CacheState.PENDING:
            raise FailedPrecondition(f"cache {cache_id!r} is not ready yet")
        if rec.state is CacheState.EVICTED:
            raise FailedPrecondition(f"cache {cache_id!r} was evicted")
        if rec.moving:
            raise FailedPrecondition(f"cache {cache_id!r} is being moved")
        if rec.offloading or rec.state is CacheState.OFFLOADED:
            raise FailedPrecondition(f"cache {cache_id!r} is offloaded (the engine restores it first)")
        return rec

    # -- background work --------------------------------------------------------------

    def retire_idle_segments(self, idle_seconds: float) -> list[SegmentInfo]:
        """Give back every segment empty for ``idle_seconds``: retired now when unmapped
        (returned), else drained. This is how one pool's memory becomes another's after
        a burst. Cost: O(segments)."""
        return self._ledger.segments.idle(idle_seconds)

    def reclaim(self, *, max_victims: int = 64) -> list[str]:
        """Background reclamation above ``gc_threshold`` (``reclaim.reclaim``); returns
        the evicted ids, at most ``max_victims`` per call."""
        ledger = self._ledger
        return reclaim(ledger, ledger.pools.values(), ledger.devices.values(), max_victims=max_victims)

    # -- compaction -------------------------------------------------------------------

    def plan_compaction(self, device: str | None = None, pool: str | None = None,
                        target_bytes: int | None = None) -> CompactionPlan:
        """Moves that pack the arenas of ``device``/``pool`` (all when None) not already
        compacting, or open a ``target_bytes`` free extent in each (``targeted``). Pure
        until ``begin_compaction``. Pinned and PENDING caches never move."""
        ledger = self._ledger
        if device and device not in ledger.devices:
            raise NotFound(f"device {echo(device)} does not exist")
        pools = [find_pool(ledger.pools, pool)] if pool else ledger.pools.values()
        return ledger.plan_arenas((
            arena for p in pools for dev, arena in p.arenas.items()
            if (not device or dev == device) and arena.compaction is None
        ), target_bytes)

    def begin_compaction(self, plan: CompactionPlan) -> None:
        """Freeze the plan's arenas while its bytes are copied (see ``compacting``).
        Raises ``FailedPrecondition`` for a stale plan or an arena already compacting."""
        compacting.begin(self._ledger, plan)

    def commit(self, plan: CompactionPlan, completed: int | None = None) -> tuple[SegmentInfo, ...]:
        """The first ``completed`` moves (all when None) were copied: apply them, drop
        the rest, end the compaction. Returns emptied segments for the backend to free."""
        return compacting.commit(self._ledger, plan, completed)

    def abort_compaction(self, plan: CompactionPlan) -> tuple[SegmentInfo, ...]:
        return compacting.commit(self._ledger, plan, 0)  # the copy failed before its first move
