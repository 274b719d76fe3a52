"""Arenas (one pool's share of one device): their records, sizes and byte accounting.

Everything here is a function of records, with no table and no policy: how big a new
segment of an arena is, how much budget is left for one, how a cache's bytes enter and
leave a segment's accounting, how an arena looks to the compaction planner. The rules:

- Every segment size is a multiple of the arena's *granule*: the larger of the device's
  segment alignment and the pool's block size (both powers of two, so each divides it).
- A new segment takes the pool's preferred ``segment_bytes``, at least the device's
  ``min_segment_bytes``, at least the request, and never more than the *headroom*: the
  device's unreserved budget and the pool's quota left, rounded down to the granule.
- A segment's bytes are reserved against its device and its pool when it is created and
  given back when it is retired (``reserve``/``unreserve``); in between they are, per
  arena, allocated, free, withheld (a creating segment) or draining. ``audit`` checks it.
"""

from __future__ import annotations

from collections.abc import Sequence

from kvbroker.core.compaction import Occupant, SegmentLayout
from kvbroker.core.errors import InvalidArgument, echo
from kvbroker.core.eviction import make_policy
from kvbroker.core.freespace import FreeSpace, split_address
from kvbroker.core.records import ArenaRecord, CacheRecord, DeviceRecord, PoolRecord, SegmentRecord
from kvbroker.core.types import CacheState, DeviceSpec, PoolSpec


def build(
    devices: Sequence[DeviceSpec], pools: Sequence[PoolSpec]
) -> tuple[dict[str, DeviceRecord], dict[str, PoolRecord]]:
    """Records for the given specs: one arena per pool and device the pool uses.

    Raises ``InvalidArgument`` for a device listed twice, a pool defined twice or using an
    unknown device, a ``min_bytes`` above the pool's devices' capacity, or no device or
    pool at all.
    """
    if not devices:
        raise InvalidArgument("devices", "the broker needs at least one device")
    device_records: dict[str, DeviceRecord] = {}
    for spec in devices:
        if spec.device_id in device_records:
            raise InvalidArgument("devices", f"device {echo(spec.device_id)} is listed twice")
        if spec.segment_alignment_bytes & (spec.segment_alignment_bytes - 1):
            raise InvalidArgument("segment_alignment_bytes", "must be a power of two")
        device_records[spec.device_id] = DeviceRecord(spec)
    pool_records: dict[str, PoolRecord] = {}
    for spec in pools:
        if spec.name in pool_records:
            raise InvalidArgument("pools", f"pool {echo(spec.name)} is defined twice")
        for device_id in spec.devices:
            if device_id not in device_records:
                raise InvalidArgument(f"pools.{spec.name}.devices", f"unknown device {echo(device_id)}")
        capacities = [device_records[d].spec.capacity_bytes for d in spec.devices]
        max_bytes = sum(capacities) if spec.max_bytes is None else min(spec.max_bytes, sum(capacities))
        if spec.min_bytes > sum(capacities):
            raise InvalidArgument(
                f"pools.{spec.name}.min_bytes",
                f"{spec.min_bytes} exceeds the capacity of the pool's devices ({sum(capacities)})",
            )
        pool = PoolRecord(spec=spec, max_bytes=max_bytes, policy=make_policy(spec.eviction_policy))
        for device_id in spec.devices:
            device = device_records[device_id]
            arena = ArenaRecord(pool=pool, device=device, free=FreeSpace(spec.block_bytes))
            pool.arenas[device_id] = arena
            device.arenas.append(arena)
        if len(pool.arenas) == 1:
            pool.single_arena = list(pool.arenas.values())
        pool.largest_device_bytes = max(capacities)
        pool_records[spec.name] = pool
    if not pool_records:
        raise InvalidArgument("pools", "the broker needs at least one pool")
    return device_records, pool_records


# -- sizes ----------------------------------------------------------------------------


def granule(arena: ArenaRecord) -> int:
    """The unit of every segment size of the arena."""
    return max(arena.device.spec.segment_alignment_bytes, arena.pool.spec.block_bytes)


def round_up(nbytes: int, unit: int) -> int:
    return -(-nbytes // unit) * unit


def headroom(arena: ArenaRecord) -> int:
    """Bytes a new segment of this arena may take: within the device budget and the
    pool's quota, rounded down to the granule. Cost: O(1)."""
    room = min(arena.device.unreserved_bytes, arena.pool.max_bytes - arena.pool.reserved_bytes)
    if room <= 0:
        return 0
    unit = granule(arena)
    return room // unit * unit


def segment_need(arena: ArenaRecord, reserved: int) -> int:
    """The smallest segment ``new_segment_bytes`` would make for ``reserved`` bytes: the
    size rounded up to the granule, and never below the device's minimum segment."""
    unit = granule(arena)
    return max(round_up(reserved, unit), round_up(arena.device.spec.min_segment_bytes, unit))


def new_segment_bytes(arena: ArenaRecord, reserved: int) -> int:
    """The size of a new segment for a cache of ``reserved`` bytes, or 0 when the headroom
    does not allow one: the pool's preferred size where the budget allows, never less
    than ``segment_need``."""
    room = headroom(arena)
    need = segment_need(arena, reserved)
    if need > room:
        return 0
    preferred = round_up(arena.pool.spec.segment_bytes, granule(arena))
    return max(need, min(preferred, room))


def can_grow(arena: ArenaRecord, reserved: int) -> bool:
    return segment_need(arena, reserved) <= headroom(arena)


# -- accounting -----------------------------------------------------------------------


def reserve(arena: ArenaRecord, nbytes: int) -> None:
    """A new segment of ``nbytes`` takes budget from the device and quota from the pool."""
    arena.pool.reserved_bytes += nbytes
    arena.device.reserved_bytes += nbytes


def unreserve(arena: ArenaRecord, nbytes: int) -> None:
    """A retired segment gives its bytes back to the device and the pool."""
    arena.pool.reserved_bytes -= nbytes
    arena.device.reserved_bytes -= nbytes


def occupy(segment: SegmentRecord, rec: CacheRecord) -> bool:
    """Count ``rec``'s extent (already carved out of free space) as allocated in
    ``segment``. Returns whether the extent may hold bytes of an earlier cache (it starts
    below the segment's high-water mark), which then raises to the extent's end."""
    offset = split_address(rec.address)[1]
    end = offset + rec.reserved_bytes
    reused = offset < segment.high_water
    if end > segment.high_water:
        segment.high_water = end
    segment.caches[rec.cache_id] = rec
    segment.empty_since = None
    arena = segment.arena
    arena.allocated_bytes += rec.reserved_bytes
    arena.live_caches += 1
    return reused


def vacate(segment: SegmentRecord, rec: CacheRecord, now: float) -> None:
    """Stop counting ``rec``'s extent as allocated in ``segment`` (the caller gives the
    bytes back to free space, or drops the segment)."""
    del segment.caches[rec.cache_id]
    if not segment.caches:
        segment.empty_since = now
    arena = segment.arena
    arena.allocated_bytes -= rec.reserved_bytes
    arena.live_caches -= 1


# -- compaction -----------------------------------------------------------------------


def layout_of(arena: ArenaRecord) -> list[SegmentLayout]:
    """The arena's placeable segments as the planner sees them, by segment id. Pinned
    and PENDING caches are immovable. Cost: O(caches of the arena)."""
    layouts = []
    for segment_id in sorted(arena.segments):
        seg = arena.segments[segment_id]
        occupants = tuple(
            Occupant(
                rec.cache_id, split_address(rec.address)[1], rec.reserved_bytes,
                rec.pin_count == 0 and rec.state is CacheState.RESIDENT and not rec.offloading,
            )
            for rec in seg.caches.values()
        )
        layouts.append(SegmentLayout(segment_id, seg.info.nbytes, occupants))
    return layouts
