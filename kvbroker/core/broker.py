"""The broker core: every decision about who gets which bytes, as pure state changes.

``Broker`` composes the mechanisms (``FreeSpace`` per arena, the compaction planner) with
the policies (eviction per pool) and checks the rules in between (Plasma's
``ObjectLifecycleManager``). It speaks integers and ids; bytes live behind backends that
the daemon drives from the results returned here:

- ``allocate`` returns an ``AllocateResult``. When it holds a ``new_segment``, the daemon
  must back that segment before handing the cache out (and call ``abort_allocation`` if
  the backend fails). When it holds a ``compaction`` plan instead of a cache, the daemon
  copies the plan's bytes, calls ``commit`` and asks again.
- Evictions and moves bump the cache's epoch and queue an ``Event`` for its holders;
  ``drain_events`` hands them over.
- Retired segments are returned by the call that retired them; the daemon frees them.

Not thread-safe by design: one owner (the daemon's event loop) calls it.
"""

from __future__ import annotations

import itertools
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import NamedTuple

from kvbroker.core import pressure
from kvbroker.core.compaction import Occupant, SegmentLayout, fragmentation, plan_layout
from kvbroker.core.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
)
from kvbroker.core.eviction import make_policy
from kvbroker.core.freespace import FreeSpace, address, split_address
from kvbroker.core.records import (
    ArenaRecord,
    CacheRecord,
    DeviceRecord,
    PoolRecord,
    SegmentRecord,
)
from kvbroker.core.stats import snapshot
from kvbroker.core.types import (
    ANONYMOUS_HOLDER,
    AllocationRequest,
    BrokerStats,
    CacheInfo,
    CacheState,
    CompactionPlan,
    DeviceSpec,
    Event,
    EventKind,
    Placement,
    PoolSpec,
    SegmentInfo,
    validate_id,
)

#: How many released or evicted ids are remembered, so that a second Release of a freed
#: cache is harmless while an id that never existed still gets NOT_FOUND.
TOMBSTONES = 65536
MODEL_NAME_MAX_CHARS = 256
PRIORITY_RANGE = (-(2**31), 2**31 - 1)


class AllocateResult(NamedTuple):
    """The outcome of ``Broker.allocate``.

    Exactly one of ``cache`` and ``compaction`` is set. ``new_segment`` is the segment
    created for this cache (back it before use). ``retired_segments`` were taken from
    pools to make room and must be freed by the backend first.
    """

    cache: CacheInfo | None
    compaction: CompactionPlan | None = None
    new_segment: SegmentInfo | None = None
    retired_segments: tuple[SegmentInfo, ...] = ()
    evicted: tuple[str, ...] = ()


class Broker:
    """Devices, pools, segments and caches of one node, and the rules between them.

    Args:
        devices: the devices the broker owns.
        pools: pool definitions; each pool's devices must be among ``devices``.
        clock: seconds, for access times and segment idleness (injectable for tests).
        id_prefix: prefix of generated cache ids (the daemon passes its instance id so
            ids stay unique across restarts).
    """

    def __init__(
        self,
        devices: Sequence[DeviceSpec],
        pools: Sequence[PoolSpec],
        *,
        clock: Callable[[], float] = time.time,
        id_prefix: str = "c",
    ) -> None:
        if not devices:
            raise InvalidArgument("devices", "the broker needs at least one device")
        self._clock = clock
        self._devices: dict[str, DeviceRecord] = {}
        for spec in devices:
            if spec.device_id in self._devices:
                raise InvalidArgument("devices", f"device {spec.device_id!r} is listed twice")
            if spec.segment_alignment_bytes & (spec.segment_alignment_bytes - 1):
                raise InvalidArgument("segment_alignment_bytes", "must be a power of two")
            self._devices[spec.device_id] = DeviceRecord(spec)
        self._pools: dict[str, PoolRecord] = {}
        for spec in pools:
            self._add_pool(spec)
        if not self._pools:
            raise InvalidArgument("pools", "the broker needs at least one pool")
        self._caches: dict[str, CacheRecord] = {}
        self._segments: dict[int, SegmentRecord] = {}
        self._tombstones: OrderedDict[str, CacheState] = OrderedDict()
        self._events: list[Event] = []
        self._segment_ids = itertools.count(1)
        self._generations = itertools.count(1)
        self._cache_ids = itertools.count(1)
        self._id_prefix = id_prefix
        self._version = 0
        self.allocation_count = 0
        self.eviction_count = 0

    def _add_pool(self, spec: PoolSpec) -> None:
        if spec.name in self._pools:
            raise InvalidArgument("pools", f"pool {spec.name!r} is defined twice")
        for device_id in spec.devices:
            if device_id not in self._devices:
                raise InvalidArgument(
                    f"pools.{spec.name}.devices", f"unknown device {device_id!r}"
                )
        capacity = sum(self._devices[d].spec.capacity_bytes for d in spec.devices)
        max_bytes = capacity if spec.max_bytes is None else min(spec.max_bytes, capacity)
        if spec.min_bytes > capacity:
            raise InvalidArgument(
                f"pools.{spec.name}.min_bytes",
                f"{spec.min_bytes} exceeds the capacity of the pool's devices ({capacity})",
            )
        pool = PoolRecord(spec=spec, max_bytes=max_bytes, policy=make_policy(spec.eviction_policy))
        for device_id in spec.devices:
            pool.arenas[device_id] = ArenaRecord(
                pool=pool, device=self._devices[device_id], free=FreeSpace(spec.block_bytes)
            )
        if len(pool.arenas) == 1:
            pool.single_arena = list(pool.arenas.values())
        pool.largest_device_bytes = max(self._devices[d].spec.capacity_bytes for d in spec.devices)
        self._pools[spec.name] = pool

    # -- queries ----------------------------------------------------------------------

    @property
    def pools(self) -> tuple[PoolSpec, ...]:
        return tuple(p.spec for p in self._pools.values())

    @property
    def devices(self) -> tuple[DeviceSpec, ...]:
        return tuple(d.spec for d in self._devices.values())

    def get(self, cache_id: str) -> CacheInfo:
        """The cache's current view. Raises ``NotFound``."""
        return self._cache(cache_id).info()

    def caches(
        self,
        *,
        pool: str | None = None,
        model_name: str | None = None,
        state: CacheState | None = None,
    ) -> list[CacheInfo]:
        """Caches matching every given filter, ordered by id. Cost: O(caches)."""
        if pool is not None:
            self._pool(pool)
        return [
            rec.info()
            for cache_id, rec in sorted(self._caches.items())
            if (pool is None or rec.pool.spec.name == pool)
            and (model_name is None or rec.model_name == model_name)
            and (state is None or rec.state is state)
        ]

    def segment(self, segment_id: int) -> SegmentInfo:
        seg = self._segments.get(segment_id)
        if seg is None:
            raise NotFound(f"segment {segment_id} does not exist")
        return seg.info

    def segments(self) -> list[SegmentInfo]:
        return [s.info for s in self._segments.values()]

    def stats(self) -> BrokerStats:
        """One consistent snapshot of every figure. Cost: O(segments + free extents)."""
        return snapshot(self._devices.values(), self._pools.values(), self)

    def drain_events(self) -> list[Event]:
        """Return and clear the events queued since the last call."""
        events, self._events = self._events, []
        return events

    # -- allocate ---------------------------------------------------------------------

    def allocate(
        self,
        request: AllocationRequest,
        *,
        allow_eviction: bool = True,
        allow_compaction: bool = True,
    ) -> AllocateResult:
        """Place a new cache, running the pressure ladder when it does not fit.

        Ladder (DESIGN.md §4), per candidate device: place in a free extent; claim a new
        segment within the pool's quota and the device budget; evict idle retained
        caches; compact when the free bytes exist but are fragmented (returned as a plan);
        evict unpinned caches of equal or lower priority by the pool's policy; take whole
        segments from other pools that are above their ``min_bytes``. Else
        ``ResourceExhausted``.

        Raises:
            InvalidArgument, NotFound, AlreadyExists, ResourceExhausted.
        """
        pool = self._pool(request.pool)
        spec = pool.spec
        nbytes = request.nbytes
        if nbytes == 0 and type(nbytes) is int and spec.default_cache_bytes:
            nbytes = spec.default_cache_bytes
        if type(nbytes) is not int or nbytes <= 0:
            raise InvalidArgument(
                "size_bytes",
                f"must be a positive integer, got {nbytes!r} (give size_bytes, or dtype and "
                f"shape; pool {spec.name!r} has no default cache size)",
            )
        block = spec.block_bytes
        reserved = -(-nbytes // block) * block
        priority = spec.priority if request.priority is None else request.priority
        self._validate_metadata(request, priority)
        cache_id = request.cache_id
        if cache_id:
            validate_id("cache_id", cache_id)
            if cache_id in self._caches:
                raise AlreadyExists(f"cache {cache_id!r} already exists")
        devices = self._candidate_devices(pool, request.device_hint, reserved)

        addr = new_segment = None
        retired: tuple[SegmentInfo, ...] = ()
        evicted: tuple[str, ...] = ()
        for arena in devices:
            addr = arena.free.take(reserved)
            if addr is None:
                new_segment = self._grow(arena, reserved)
                if new_segment is not None:
                    addr = arena.free.take(reserved)
            if addr is not None:
                break
        else:
            retired_list: list[SegmentInfo] = []
            evicted_list: list[str] = []
            for arena in devices:
                outcome = pressure.make_room(
                    self, arena, reserved, priority, retired_list, evicted_list,
                    allow_eviction=allow_eviction, allow_compaction=allow_compaction,
                )
                retired, evicted = tuple(retired_list), tuple(evicted_list)
                if isinstance(outcome, CompactionPlan):
                    return AllocateResult(None, outcome, None, retired, evicted)
                if outcome:
                    addr = arena.free.take(reserved)
                    if addr is None:
                        new_segment = self._grow(arena, reserved)
                        addr = arena.free.take(reserved)
                    if addr is not None:
                        break
            else:
                raise self._exhausted(pool, devices, reserved)

        if not cache_id:
            cache_id = self._generate_id()
        elif cache_id in self._tombstones:
            del self._tombstones[cache_id]
        now = self._clock()
        # Positional: this runs on every allocation and keyword passing costs microseconds.
        rec = CacheRecord(
            cache_id, pool, arena.device.spec.device_id, request.model_name, nbytes,
            reserved, addr, priority, request.retain, now, request.dtype, tuple(request.shape),
            CacheState.RESIDENT, 0, {request.holder}, {}, 0, now, 1,
        )
        self._caches[cache_id] = rec
        seg = self._segments[addr >> 48]
        seg.caches[cache_id] = rec
        seg.empty_since = None
        arena.allocated_bytes += reserved
        arena.live_caches += 1
        pool.allocation_count += 1
        arena.device.allocation_count += 1
        self.allocation_count += 1
        pool.policy.on_insert(cache_id, reserved)
        if request.pinned:
            self._pin(rec, request.holder)
        self._version += 1
        return AllocateResult(rec.info(), None, new_segment, retired, evicted)

    def abort_allocation(self, result: AllocateResult) -> tuple[SegmentInfo, ...]:
        """Undo an allocation whose new segment the backend could not create: the cache
        is dropped without events (nobody has seen it) and the segment is retired."""
        if result.cache is None or result.new_segment is None:
            raise RuntimeError("only an allocation with a new segment can be aborted")
        rec = self._caches[result.cache.cache_id]
        rec.holders.clear()
        rec.pins.clear()
        if rec.pin_count:
            rec.pin_count = 0
            rec.pool.arenas[rec.device_id].pinned_bytes -= rec.reserved_bytes
            rec.pool.policy.on_unpin(rec.cache_id)
        self._free(rec, CacheState.EVICTED)
        self._tombstones.pop(rec.cache_id, None)
        return (self.retire_segment(result.new_segment.segment_id),)

    # -- holders and pins -------------------------------------------------------------

    def attach(self, cache_id: str, holder: str = ANONYMOUS_HOLDER) -> CacheInfo:
        """Hold an existing resident cache. Raises ``NotFound``, ``FailedPrecondition``."""
        rec = self._resident(cache_id)
        rec.holders.add(holder)
        self._touch(rec)
        self._version += 1
        return rec.info()

    def touch(self, cache_id: str) -> None:
        """Record a use of a resident cache (for the eviction policy)."""
        self._touch(self._resident(cache_id))

    def release(self, cache_id: str, holder: str = ANONYMOUS_HOLDER, *, force: bool = False) -> bool:
        """Drop ``holder``'s hold (and its pins); free the cache when nobody holds it and
        it is not retained. Idempotent. Returns True when this call freed the cache.

        With ``force``, the cache is freed whoever holds it or retains it, unless another
        holder pins it. Raises ``NotFound`` for an id that never existed.
        """
        rec = self._caches.get(cache_id)
        if rec is None:
            if cache_id in self._tombstones:
                return False
            validate_id("cache_id", cache_id)  # a malformed id is INVALID_ARGUMENT
            raise NotFound(f"cache {cache_id!r} does not exist")
        if force:
            others = [h for h in rec.pins if h != holder]
            if others:
                raise FailedPrecondition(
                    f"cache {cache_id!r} is pinned by {len(others)} other holder(s); "
                    "it cannot be force-released"
                )
        if holder in rec.pins:
            self._unpin_all(rec, holder)
        rec.holders.discard(holder)
        self._version += 1
        if force and rec.holders and rec.state is CacheState.RESIDENT:
            rec.epoch += 1  # the other holders lose the cache: tell them with a new epoch
            self._queue_event(EventKind.EVICTED, rec, "released by force")
            rec.holders.clear()
        if rec.holders or (rec.retain and not force and rec.state is CacheState.RESIDENT):
            return False
        was_resident = rec.state is CacheState.RESIDENT
        if was_resident:
            rec.pool.arenas[rec.device_id].release_count += 1
        self._free(rec, CacheState.RESIDENT if was_resident else CacheState.EVICTED)
        return was_resident

    def pin(self, cache_id: str, holder: str = ANONYMOUS_HOLDER) -> CacheInfo:
        """Count one pin by ``holder`` (who becomes a holder). A pinned cache is never
        evicted or moved. Raises ``NotFound``, ``FailedPrecondition`` (evicted)."""
        rec = self._resident(cache_id)
        rec.holders.add(holder)
        self._pin(rec, holder)
        self._touch(rec)
        self._version += 1
        return rec.info()

    def unpin(self, cache_id: str, holder: str = ANONYMOUS_HOLDER) -> CacheInfo:
        """Drop one pin of ``holder``. Raises ``FailedPrecondition`` when it has none."""
        rec = self._cache(cache_id)
        count = rec.pins.get(holder, 0)
        if count == 0:
            raise FailedPrecondition(f"cache {cache_id!r} is not pinned by this caller")
        if count == 1:
            del rec.pins[holder]
        else:
            rec.pins[holder] = count - 1
        rec.pin_count -= 1
        if rec.pin_count == 0 and rec.state is CacheState.RESIDENT:
            rec.pool.arenas[rec.device_id].pinned_bytes -= rec.reserved_bytes
            rec.pool.policy.on_unpin(cache_id)
        self._version += 1
        return rec.info()

    def drop_holder(self, holder: str) -> list[str]:
        """Drop every hold and pin of ``holder`` (a session that ended); returns the ids
        of the caches that were freed. Cost: O(caches)."""
        freed = []
        for rec in [r for r in self._caches.values() if holder in r.holders or holder in r.pins]:
            if self.release(rec.cache_id, holder):
                freed.append(rec.cache_id)
        return freed

    def evict(self, cache_id: str, reason: str = "operator") -> CacheInfo:
        """Evict a resident, unpinned cache now. Raises ``FailedPrecondition`` if pinned."""
        rec = self._resident(cache_id)
        if rec.pin_count:
            raise FailedPrecondition(f"cache {cache_id!r} is pinned and cannot be evicted")
        self._evict(rec, reason, cause="operator")
        return rec.info()

    # -- compaction and segments ------------------------------------------------------

    def plan_compaction(self, *, device: str | None = None, pool: str | None = None) -> CompactionPlan:
        """Plan moves that pack the arenas of ``device``/``pool`` (all when None). Pure:
        nothing changes until ``commit``. Pinned caches never move."""
        moves, emptied, before, after = [], [], [], []
        for arena in self._arenas(device, pool):
            layout = plan_layout(self._layout_of(arena))
            moves.extend(layout.moves)
            emptied.extend(layout.segments_emptied)
            before.extend(layout.free_before)
            after.extend(layout.free_after)
        return CompactionPlan(
            moves=tuple(moves),
            fragmentation_before=fragmentation(before),
            fragmentation_after=fragmentation(after),
            segments_emptied=tuple(emptied),
            largest_free_extent_after=max(after, default=0),
            token=self._version,
        )

    def commit(self, plan: CompactionPlan) -> tuple[SegmentInfo, ...]:
        """Apply a plan whose bytes the backend has copied: move the extents, bump the
        moved caches' epochs and queue MOVED events. Emptied segments go back to the
        device (``release_segment``): the unmapped ones are returned for the backend to
        free, the mapped ones drain until their mappers unmap them.

        Raises ``FailedPrecondition`` when anything changed since the plan was made.
        """
        if plan.token != self._version:
            raise FailedPrecondition("the compaction plan is stale: the broker changed since")
        compacted: set[ArenaRecord] = set()
        for move in plan.moves:
            rec = self._caches[move.cache_id]
            arena = rec.pool.arenas[rec.device_id]
            arena.moved_bytes += move.destination.nbytes
            compacted.add(arena)
            src = address(move.source.segment_id, move.source.offset)
            dst = address(move.destination.segment_id, move.destination.offset)
            assert rec.address == src and rec.pin_count == 0, move
            arena.free.give(src, move.source.nbytes)
            arena.free.take_at(dst, move.destination.nbytes)
            old_seg, new_seg = self._segments[src >> 48], self._segments[dst >> 48]
            del old_seg.caches[rec.cache_id]
            new_seg.caches[rec.cache_id] = rec
            rec.address = dst
            rec.epoch += 1
            self._queue_event(EventKind.MOVED, rec, "compaction")
        for arena in compacted:
            arena.compaction_count += 1
        retired = []
        now = self._clock()
        for segment_id in plan.segments_emptied:
            self._segments[segment_id].empty_since = now
            info = self.release_segment(segment_id, "emptied by compaction")
            if info is not None:
                retired.append(info)
        self._version += 1
        return tuple(retired)

    def retire_segment(self, segment_id: int) -> SegmentInfo:
        """Return an empty, unmapped segment's bytes to its device (also ends a draining
        segment). Raises ``FailedPrecondition`` when the segment still holds caches or a
        session still maps it."""
        seg = self._segments.get(segment_id)
        if seg is None:
            raise NotFound(f"segment {segment_id} does not exist")
        if seg.caches:
            raise FailedPrecondition(f"segment {segment_id} still holds {len(seg.caches)} caches")
        if seg.mappers:
            raise FailedPrecondition(f"segment {segment_id} is still mapped by {len(seg.mappers)} sessions")
        info = seg.info
        arena = self._pools[info.pool].arenas[info.device_id]
        if seg.draining:
            del arena.draining[segment_id]
            arena.draining_bytes -= info.nbytes
        else:
            arena.free.remove_segment(segment_id)
            del arena.segments[segment_id]
        del self._segments[segment_id]
        arena.pool.reserved_bytes -= info.nbytes
        arena.device.reserved_bytes -= info.nbytes
        self._version += 1
        return info

    def release_segment(self, segment_id: int, reason: str) -> SegmentInfo | None:
        """Give an empty segment back: retire it now if nobody maps it (returned, for the
        backend to free), else take it out of placement and tell its mappers to unmap
        it (SEGMENT_RETIRED); the last ``note_unmapped`` then retires it."""
        seg = self._segments[segment_id]
        if not seg.mappers:
            return self.retire_segment(segment_id)
        if not seg.draining:
            if seg.caches:
                raise FailedPrecondition(f"segment {segment_id} still holds {len(seg.caches)} caches")
            arena = self._pools[seg.info.pool].arenas[seg.info.device_id]
            arena.free.remove_segment(segment_id)
            del arena.segments[segment_id]
            arena.draining[segment_id] = seg
            arena.draining_bytes += seg.info.nbytes
            seg.draining = True
            self._events.append(
                Event(
                    EventKind.SEGMENT_RETIRED, frozenset(seg.mappers), segment_id=segment_id,
                    segment_generation=seg.info.generation, reason=reason,
                )
            )
            self._version += 1
        return None

    def retire_idle_segments(self, idle_seconds: float) -> list[SegmentInfo]:
        """Give back every segment that has been empty for at least ``idle_seconds``:
        retired now when unmapped (returned), else drained (see ``release_segment``).
        This is how one pool's memory becomes another's after a burst."""
        now = self._clock()
        idle = [
            sid for sid, seg in self._segments.items()
            if not seg.caches and not seg.draining and seg.empty_since is not None
            and now - seg.empty_since >= idle_seconds
        ]
        retired = [self.release_segment(sid, "idle") for sid in idle]
        return [info for info in retired if info is not None]

    def reclaim(self, *, max_victims: int = 64) -> list[str]:
        """Background reclamation above ``gc_threshold`` (see ``pressure.reclaim``);
        returns the evicted ids, at most ``max_victims`` per call."""
        evicted = pressure.reclaim(self, max_victims=max_victims)
        if evicted:
            self._version += 1
        return evicted

    # -- sessions and mappings --------------------------------------------------------

    def note_mapped(self, segment_id: int, holder: str) -> None:
        """Record that ``holder`` was handed ``segment_id``'s handle (and may map it).
        The anonymous holder is not tracked: it has no session to report unmapping."""
        if holder != ANONYMOUS_HOLDER:
            self._segments[segment_id].mappers.add(holder)

    def note_unmapped(self, segment_id: int, holder: str) -> SegmentInfo | None:
        """Record that ``holder`` unmapped ``segment_id``; returns the segment when this
        retired it (its last mapper of a draining segment), for the backend to free.
        Unknown segments are ignored (already retired)."""
        seg = self._segments.get(segment_id)
        if seg is None:
            return None
        seg.mappers.discard(holder)
        if seg.draining and not seg.mappers:
            return self.retire_segment(segment_id)
        return None

    def end_session(self, holder: str) -> tuple[list[str], list[SegmentInfo]]:
        """A session ended (its stream broke or its lease ran out): drop its holds and
        pins, free its non-retained caches, forget its mappings (a dead process maps
        nothing). Returns the freed cache ids and the segments retired as a result.
        Cost: O(caches + segments)."""
        freed = self.drop_holder(holder)
        retired = []
        for segment_id in [sid for sid, seg in self._segments.items() if holder in seg.mappers]:
            info = self.note_unmapped(segment_id, holder)
            if info is not None:
                retired.append(info)
        return freed, retired

    # -- internals shared with the pressure ladder ------------------------------------

    def _pool(self, name: str) -> PoolRecord:
        pool = self._pools.get(name)
        if pool is None:
            if not name:
                raise InvalidArgument("pool", "is required")
            raise NotFound(f"pool {name!r} does not exist (pools: {', '.join(sorted(self._pools))})")
        return pool

    def _cache(self, cache_id: str) -> CacheRecord:
        rec = self._caches.get(cache_id)
        if rec is None:
            if not cache_id:
                raise InvalidArgument("cache_id", "is required")
            validate_id("cache_id", cache_id)
            state = self._tombstones.get(cache_id)
            if state is CacheState.EVICTED:
                raise FailedPrecondition(f"cache {cache_id!r} was evicted")
            raise NotFound(f"cache {cache_id!r} does not exist")
        return rec

    def _resident(self, cache_id: str) -> CacheRecord:
        rec = self._cache(cache_id)
        if rec.state is not CacheState.RESIDENT:
            raise FailedPrecondition(f"cache {cache_id!r} was evicted")
        return rec

    def _validate_metadata(self, request: AllocationRequest, priority: int) -> None:
        if priority == 0 and type(priority) is int and request.model_name == "" and request.shape == ():
            return
        if type(priority) is not int or not PRIORITY_RANGE[0] <= priority <= PRIORITY_RANGE[1]:
            raise InvalidArgument("priority", f"must be a 32-bit integer, got {priority!r}")
        name = request.model_name
        if not isinstance(name, str) or len(name) > MODEL_NAME_MAX_CHARS or not name.isprintable():
            raise InvalidArgument(
                "model_name", f"must be at most {MODEL_NAME_MAX_CHARS} printable characters"
            )
        if any(type(n) is not int or n < 0 for n in request.shape):
            raise InvalidArgument("shape", f"dimensions must be non-negative integers, got {request.shape}")

    def _candidate_devices(self, pool: PoolRecord, hint: str | None, reserved: int) -> list[ArenaRecord]:
        if not hint and pool.single_arena is not None and reserved <= pool.largest_device_bytes:
            if reserved > pool.max_bytes:
                raise ResourceExhausted(
                    f"pool {pool.spec.name!r} has a quota of {pool.max_bytes} bytes",
                    requested_bytes=reserved, free_bytes=0, largest_free_extent_bytes=0,
                    satisfiable=False,
                )
            return pool.single_arena
        if hint:
            arena = pool.arenas.get(hint)
            if arena is None:
                if hint not in self._devices:
                    raise NotFound(f"device {hint!r} does not exist")
                raise InvalidArgument(
                    "device", f"pool {pool.spec.name!r} does not use device {hint!r}"
                )
            candidates = [arena]
        elif len(pool.arenas) == 1:
            candidates = list(pool.arenas.values())
        elif pool.spec.placement is Placement.ROUND_ROBIN:
            arenas = list(pool.arenas.values())
            start = pool.next_device % len(arenas)
            pool.next_device += 1
            candidates = arenas[start:] + arenas[:start]
        else:
            candidates = sorted(
                pool.arenas.values(),
                key=lambda a: a.allocated_bytes / a.device.spec.capacity_bytes,
            )
        largest = max(a.device.spec.capacity_bytes for a in candidates)
        if reserved > largest:
            raise InvalidArgument(
                "size_bytes",
                f"{reserved} bytes exceed the capacity of every device the request may use "
                f"(largest: {largest} bytes)",
            )
        if reserved > pool.max_bytes:
            raise ResourceExhausted(
                f"pool {pool.spec.name!r} has a quota of {pool.max_bytes} bytes",
                requested_bytes=reserved, free_bytes=0, largest_free_extent_bytes=0,
                satisfiable=False,
            )
        return candidates

    def _headroom(self, arena: ArenaRecord) -> int:
        """Bytes a new segment of this arena may take: within the device budget and the
        pool's quota, rounded down to the segment granule."""
        granule = max(arena.device.spec.segment_alignment_bytes, arena.pool.spec.block_bytes)
        room = min(arena.device.unreserved_bytes, arena.pool.max_bytes - arena.pool.reserved_bytes)
        return room // granule * granule if room > 0 else 0

    def _grow(self, arena: ArenaRecord, reserved: int) -> SegmentInfo | None:
        """Add a segment big enough for ``reserved`` if the budget allows; else None."""
        granule = max(arena.device.spec.segment_alignment_bytes, arena.pool.spec.block_bytes)
        need = -(-reserved // granule) * granule
        room = self._headroom(arena)
        if need > room:
            return None
        preferred = -(-arena.pool.spec.segment_bytes // granule) * granule
        floor = -(-arena.device.spec.min_segment_bytes // granule) * granule
        nbytes = max(need, floor, min(preferred, room))
        if nbytes > room:
            return None
        info = SegmentInfo(
            segment_id=next(self._segment_ids), generation=next(self._generations),
            pool=arena.pool.spec.name, device_id=arena.device.spec.device_id, nbytes=nbytes,
        )
        seg = SegmentRecord(info, empty_since=self._clock())
        self._segments[info.segment_id] = seg
        arena.segments[info.segment_id] = seg
        arena.free.add_segment(info.segment_id, nbytes)
        arena.pool.reserved_bytes += nbytes
        arena.device.reserved_bytes += nbytes
        self._version += 1
        return info

    def _exhausted(self, pool: PoolRecord, arenas: list[ArenaRecord], reserved: int) -> ResourceExhausted:
        # The pool's quota is shared by its devices: count the unreserved budget once,
        # and only where a segment can be made of it (not below a device's minimum).
        headroom = {
            id(a): h if (h := self._headroom(a)) >= pressure._segment_need(a, 1) else 0
            for a in arenas
        }
        quota_room = max(pool.max_bytes - pool.reserved_bytes, 0)
        free = sum(a.free.free_bytes for a in arenas) + min(sum(headroom.values()), quota_room)
        largest = max(max(a.free.largest_extent(), headroom[id(a)]) for a in arenas)
        ceiling = min(pool.max_bytes, max(a.device.spec.capacity_bytes for a in arenas))
        return ResourceExhausted(
            f"pool {pool.spec.name!r} cannot place the cache now",
            requested_bytes=reserved, free_bytes=free, largest_free_extent_bytes=largest,
            satisfiable=reserved <= ceiling,
        )

    def _generate_id(self) -> str:
        while True:
            cache_id = f"{self._id_prefix}-{next(self._cache_ids):x}"
            if cache_id not in self._caches:
                return cache_id

    def _touch(self, rec: CacheRecord) -> None:
        rec.last_access_at = self._clock()
        rec.access_count += 1
        rec.pool.policy.on_access(rec.cache_id)

    def _pin(self, rec: CacheRecord, holder: str) -> None:
        rec.pins[holder] = rec.pins.get(holder, 0) + 1
        rec.pin_count += 1
        if rec.pin_count == 1:
            rec.pool.arenas[rec.device_id].pinned_bytes += rec.reserved_bytes
            rec.pool.policy.on_pin(rec.cache_id)

    def _unpin_all(self, rec: CacheRecord, holder: str) -> None:
        rec.pin_count -= rec.pins.pop(holder)
        if rec.pin_count == 0 and rec.state is CacheState.RESIDENT:
            rec.pool.arenas[rec.device_id].pinned_bytes -= rec.reserved_bytes
            rec.pool.policy.on_unpin(rec.cache_id)

    def _queue_event(self, kind: EventKind, rec: CacheRecord, reason: str) -> None:
        if rec.holders:
            self._events.append(
                Event(kind, frozenset(rec.holders), cache_id=rec.cache_id, epoch=rec.epoch, reason=reason)
            )

    def _release_bytes(self, rec: CacheRecord) -> None:
        """Give a resident cache's extent back to its arena's free space."""
        arena = rec.pool.arenas[rec.device_id]
        arena.free.give(rec.address, rec.reserved_bytes)
        arena.allocated_bytes -= rec.reserved_bytes
        arena.live_caches -= 1
        seg = self._segments[rec.address >> 48]
        del seg.caches[rec.cache_id]
        if not seg.caches:
            seg.empty_since = self._clock()
        rec.pool.policy.on_remove(rec.cache_id)
        rec.address = -1

    def _evict(self, rec: CacheRecord, reason: str, *, cause: str) -> None:
        """Evict a resident unpinned cache: bytes freed, epoch bumped, holders told.
        ``reason`` is told to the holders; ``cause`` (one of ``EVICTION_CAUSES``) is
        counted per arena for telemetry."""
        assert rec.pin_count == 0 and rec.state is CacheState.RESIDENT, rec.cache_id
        arena = rec.pool.arenas[rec.device_id]
        arena.evictions[cause] = arena.evictions.get(cause, 0) + 1
        arena.evicted_bytes[cause] = arena.evicted_bytes.get(cause, 0) + rec.reserved_bytes
        self._release_bytes(rec)
        rec.state = CacheState.EVICTED
        rec.epoch += 1
        pool = rec.pool
        pool.eviction_count += 1
        pool.arenas[rec.device_id].device.eviction_count += 1
        self.eviction_count += 1
        self._queue_event(EventKind.EVICTED, rec, reason)
        if not rec.holders:
            self._forget(rec, CacheState.EVICTED)
        self._version += 1

    def _free(self, rec: CacheRecord, tombstone: CacheState) -> None:
        if rec.state is CacheState.RESIDENT:
            self._release_bytes(rec)
        self._forget(rec, tombstone)
        self._version += 1

    def _forget(self, rec: CacheRecord, tombstone: CacheState) -> None:
        del self._caches[rec.cache_id]
        self._tombstones[rec.cache_id] = tombstone
        if len(self._tombstones) > TOMBSTONES:
            self._tombstones.popitem(last=False)

    def _arenas(self, device: str | None, pool: str | None) -> list[ArenaRecord]:
        if device and device not in self._devices:
            raise NotFound(f"device {device!r} does not exist")
        pools = [self._pool(pool)] if pool else list(self._pools.values())
        return [
            arena for p in pools for dev, arena in p.arenas.items() if not device or dev == device
        ]

    def _layout_of(self, arena: ArenaRecord) -> list[SegmentLayout]:
        layouts = []
        for segment_id in sorted(arena.segments):
            seg = arena.segments[segment_id]
            occupants = tuple(
                Occupant(rec.cache_id, rec.address & ((1 << 48) - 1), rec.reserved_bytes, rec.pin_count == 0)
                for rec in seg.caches.values()
            )
            layouts.append(SegmentLayout(segment_id, seg.info.nbytes, occupants))
        return layouts
