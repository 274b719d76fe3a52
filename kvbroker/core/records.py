"""Mutable records the broker keeps: caches, segments, arenas, pools and devices.

Private to the core: only ``Broker`` mutates them, and what leaves the core is a frozen
view (``CacheInfo``, ``SegmentInfo``, stats). ``slots=True`` because there are 100k of
some of these and every attribute access is on the hot path.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kvbroker.core.eviction import EvictionPolicy
from kvbroker.core.freespace import _OFFSET_BITS, _OFFSET_MASK, FreeSpace, split_address
from kvbroker.core.types import CacheInfo, CacheState, DeviceSpec, Extent, PoolSpec, SegmentInfo


@dataclass(slots=True, eq=False)
class CacheRecord:
    cache_id: str
    pool: PoolRecord
    device_id: str
    model_name: str
    nbytes: int
    reserved_bytes: int
    address: int  # freespace.address(segment_id, offset); -1 once evicted
    priority: int
    retain: bool
    created_at: float
    dtype: str
    shape: tuple[int, ...]
    state: CacheState = CacheState.RESIDENT
    epoch: int = 0
    holders: set[str] = field(default_factory=set)
    pins: dict[str, int] = field(default_factory=dict)
    pin_count: int = 0
    last_access_at: float = 0.0
    access_count: int = 0

    @property
    def extent(self) -> Extent:
        segment_id, offset = split_address(self.address)
        return Extent(segment_id, offset, self.reserved_bytes)

    def info(self) -> CacheInfo:
        """The immutable view (positional, in ``CacheInfo``'s field order: this runs on
        every allocate, attach and pin)."""
        address = self.address
        extents = (
            (Extent(address >> _OFFSET_BITS, address & _OFFSET_MASK, self.reserved_bytes),)
            if self.state is CacheState.RESIDENT
            else ()
        )
        return CacheInfo(
            self.cache_id, self.pool.spec.name, self.model_name, self.nbytes,
            self.reserved_bytes, self.device_id, extents, self.state, self.epoch,
            self.pin_count, frozenset(self.holders), self.retain, self.priority,
            self.created_at, self.last_access_at, self.access_count, self.dtype, self.shape,
        )


@dataclass(slots=True, eq=False)
class SegmentRecord:
    """A segment, its caches, and the sessions that map it.

    ``mappers`` are the holders that were handed this segment's handle and have not
    reported unmapping it. A ``draining`` segment is empty and retired from placement,
    waiting for its last mapper: freeing memory another process still maps is undefined
    behaviour on CUDA and keeps RAM in use on the host.
    """

    info: SegmentInfo
    caches: dict[str, CacheRecord] = field(default_factory=dict)
    empty_since: float | None = None
    mappers: set[str] = field(default_factory=set)
    draining: bool = False


@dataclass(slots=True, eq=False)
class ArenaRecord:
    """One pool's share of one device: its segments and their free space."""

    pool: PoolRecord
    device: DeviceRecord
    free: FreeSpace
    segments: dict[int, SegmentRecord] = field(default_factory=dict)
    #: Retired from placement, waiting for their mappers to unmap (see SegmentRecord).
    draining: dict[int, SegmentRecord] = field(default_factory=dict)
    draining_bytes: int = 0
    allocated_bytes: int = 0
    pinned_bytes: int = 0
    live_caches: int = 0
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
        return self.allocated_bytes + self.free.free_bytes + self.draining_bytes


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


@dataclass(slots=True, eq=False)
class DeviceRecord:
    spec: DeviceSpec
    reserved_bytes: int = 0
    allocation_count: int = 0
    eviction_count: int = 0

    @property
    def unreserved_bytes(self) -> int:
        return self.spec.capacity_bytes - self.reserved_bytes
