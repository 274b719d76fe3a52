"""Mutable records the core keeps: caches, segments, arenas, pools, devices, compactions.

Private to the core: what leaves it is a frozen view (``CacheInfo``, ``SegmentInfo``,
stats). ``slots=True`` because there are 100k of some of these and every attribute access
is on the hot path. Each record links to its owner (a cache to its arena, a segment to
its arena, an arena to its pool and device, a device to its arenas), so no mechanism
needs a table look-up to find what a record belongs to.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kvbroker.core.eviction import EvictionPolicy
from kvbroker.core.freespace import FreeSpace, split_address
from kvbroker.core.types import (
    CacheInfo,
    CacheState,
    CompactionPlan,
    DeviceSpec,
    Extent,
    PoolSpec,
    SegmentInfo,
)


@dataclass(slots=True, eq=False)
class CacheRecord:
    """One cache. ``address`` is ``freespace.address(segment_id, offset)`` while the cache
    holds bytes (PENDING or RESIDENT), -1 once evicted.

    ``doomed``: a PENDING cache whose last holder left; ``cache_ready`` frees it instead
    of making it resident. ``moving``: a compaction in flight copies it.

    Offload (``kvbroker.core.offload``): ``tier`` names the tier holding a copy of the
    bytes ("" for none); ``offloading``: RESIDENT, its extent still occupied while the
    engine copies it out (out of its policy, never moved); ``restoring``: PENDING in a new
    extent while the engine copies it back in.
    """

    cache_id: str
    pool: PoolRecord
    arena: ArenaRecord
    device_id: str
    model_name: str
    nbytes: int
    reserved_bytes: int
    address: int
    priority: int
    retain: bool
    created_at: float
    dtype: str
    shape: tuple[int, ...]
    state: CacheState = CacheState.PENDING
    epoch: int = 0
    holders: set[str] = field(default_factory=set)
    pins: dict[str, int] = field(default_factory=dict)
    pin_count: int = 0
    last_access_at: float = 0.0
    access_count: int = 0
    moving: bool = False
    doomed: bool = False
    tier: str = ""
    offloading: bool = False
    restoring: bool = False

    @property
    def extent(self) -> Extent:
        segment_id, offset = split_address(self.address)
        return Extent(segment_id, offset, self.reserved_bytes)

    def info(self) -> CacheInfo:
        """The immutable view (positional, in ``CacheInfo``'s field order: this runs on
        every allocate, attach and pin)."""
        extents = () if self.address < 0 else (self.extent,)
        return CacheInfo(
            self.cache_id, self.pool.spec.name, self.model_name, self.nbytes,
            self.reserved_bytes, self.device_id, extents, self.state, self.epoch,
            self.pin_count, frozenset(self.holders), self.retain, self.priority,
            self.created_at, self.last_access_at, self.access_count, self.dtype, self.shape,
            self.moving,
        )


@dataclass(slots=True, eq=False)
class SegmentRecord:
    """A segment, its caches, and the sessions that map it.

    A segment is in exactly one of three places of its arena: ``creating`` (the backend
    is creating it; only the PENDING cache it was made for, at offset 0, lives in it, and
    the rest of its bytes are withheld from placement), ``segments`` (placeable: its free
    bytes are in the arena's ``FreeSpace``) or ``draining`` (empty and out of placement,
    waiting for its last mapper: freeing memory another process still maps is undefined
    behaviour on CUDA and keeps RAM in use on the host).

    ``mappers`` are the holders that were handed this segment's handle and have not
    reported unmapping it. ``high_water`` is the end of the highest byte ever handed out
    (placed or moved into) since the segment was created: bytes above it are still the
    zeros a new segment starts with.
    """

    info: SegmentInfo
    arena: ArenaRecord
    caches: dict[str, CacheRecord] = field(default_factory=dict)
    empty_since: float | None = None
    mappers: set[str] = field(default_factory=set)
    creating: bool = False
    draining: bool = False
    high_water: int = 0


@dataclass(slots=True, eq=False)
class Compaction:
    """A compaction in flight (between ``begin_compaction`` and its commit or abort).

    ``records`` are the moved caches, one per move of ``plan`` (captured at the start, so
    a cache released meanwhile, or an id reused, cannot confuse the commit). ``deferred``
    are caches freed meanwhile in a frozen arena: their bytes stay allocated until the
    compaction ends, because a copy may still be reading or writing them.
    """

    plan: CompactionPlan
    records: tuple[CacheRecord, ...]
    arenas: tuple[ArenaRecord, ...]
    deferred: list[CacheRecord] = field(default_factory=list)


@dataclass(slots=True, eq=False)
class ArenaRecord:
    """One pool's share of one device: its segments and their free space.

    Byte accounting (checked by ``audit``): the arena's segment bytes are
    ``allocated_bytes + free.free_bytes + withheld_bytes + draining_bytes``, where
    ``withheld_bytes`` are the bytes of creating segments not taken by their cache.
    ``compaction`` is set while a compaction in flight freezes the arena: nothing is
    placed in it, nothing in it is evicted, none of its segments is taken or retired.
    """

    pool: PoolRecord
    device: DeviceRecord
    free: FreeSpace
    segments: dict[int, SegmentRecord] = field(default_factory=dict)
    creating: dict[int, SegmentRecord] = field(default_factory=dict)
    draining: dict[int, SegmentRecord] = field(default_factory=dict)
    withheld_bytes: int = 0
    draining_bytes: int = 0
    allocated_bytes: int = 0
    pinned_bytes: int = 0
    live_caches: int = 0
    #: Bytes of caches being copied out to an offload tier: free once the copies end.
    offloading_bytes: int = 0
    #: Of the live caches: those PENDING, those pinned (any state), and the retained
    #: RESIDENT ones nobody holds (what the pressure ladder takes first). Counters, so
    #: that stats never walk the caches; ``audit`` checks them against the records.
    pending_caches: int = 0
    pinned_caches: int = 0
    idle_retained: int = 0
    compaction: Compaction | None = None
    #: Caches of the arena that nobody holds (retained ones, and PENDING ones whose
    #: holders left), in the order they became so: what background reclamation may take
    #: (``reclaim``), found without walking the held ones. Kept by ``CacheTable``.
    unheld: dict[str, CacheRecord] = field(default_factory=dict)
    #: Cumulative counts for telemetry (``ArenaCounters``): evictions and their bytes by
    #: cause (``EVICTION_CAUSES``), caches freed by a release, compactions that moved
    #: caches of this arena and the bytes they moved.
    evictions: dict[str, int] = field(default_factory=dict)
    evicted_bytes: dict[str, int] = field(default_factory=dict)
    release_count: int = 0
    compaction_count: int = 0
    moved_bytes: int = 0

    @property
    def reserved_bytes(self) -> int:
        return self.allocated_bytes + self.free.free_bytes + self.withheld_bytes + self.draining_bytes


@dataclass(slots=True, eq=False)
class PoolRecord:
    spec: PoolSpec
    max_bytes: int
    policy: EvictionPolicy
    arenas: dict[str, ArenaRecord] = field(default_factory=dict)
    #: ``[the arena]`` when the pool has one device: the allocation fast path.
    single_arena: list[ArenaRecord] | None = None
    largest_device_bytes: int = 0
    reserved_bytes: int = 0
    allocation_count: int = 0
    eviction_count: int = 0
    next_device: int = 0

    @property
    def kept_bytes(self) -> int:
        """Segment bytes the pool keeps: its draining segments are already leaving.
        What ``min_bytes`` is checked against. Cost: O(devices of the pool)."""
        return self.reserved_bytes - sum(a.draining_bytes for a in self.arenas.values())


@dataclass(slots=True, eq=False)
class DeviceRecord:
    spec: DeviceSpec
    #: Every pool's arena on this device, in pool definition order.
    arenas: list[ArenaRecord] = field(default_factory=list)
    reserved_bytes: int = 0
    allocation_count: int = 0
    eviction_count: int = 0

    @property
    def unreserved_bytes(self) -> int:
        return self.spec.capacity_bytes - self.reserved_bytes
