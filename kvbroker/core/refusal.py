"""Explaining a refusal: which limit an allocation hit, in figures that match Stats.

An operator reads a RESOURCE_EXHAUSTED message next to ``kvbroker stats``. So every
figure here is computed as ``kvbroker.core.stats`` computes it for the same pool or
device (``free = capacity - allocated``, a pool's capacity being its ``max_bytes``), is
named as Stats names it (free, allocated, pinned, largest free extent, ``max_bytes``),
and is given in human units and in bytes (``amount``). Each message leads with the limit
that was hit:

- the request can never fit: it exceeds the pool's quota (``max_bytes``) or the
  capacity of every device the pool may use (``satisfiable=False``: nobody waits);
- the pool's quota is used up (by caches it may not evict: pinned, of a higher
  priority, being created);
- every candidate device is full (the caches of every pool on it count);
- there are free bytes, but no free extent large enough that this pool can use:
  fragmented free space that pinned caches keep from being compacted, or free bytes
  inside other pools' segments (their ``min_bytes`` or their caches keep them), or an
  arena frozen by a compaction in flight.

The messages stay under the 400 characters the server passes on whole
(``kvbroker.server.convert.MAX_MESSAGE_CHARS``) for pool and device ids of usual length.
Cost: O(arenas of the pool and of its devices); only refusals pay for it.
"""

from __future__ import annotations

from kvbroker.core.arena import headroom, segment_need
from kvbroker.core.errors import ResourceExhausted, amount
from kvbroker.core.records import ArenaRecord, DeviceRecord, PoolRecord


def never_fits(pool: PoolRecord, arenas: list[ArenaRecord], reserved: int) -> ResourceExhausted:
    """The refusal of a request larger than the pool's quota or than every candidate
    device: it could not be placed even on an empty broker."""
    name = pool.spec.name
    biggest = max((a.device for a in arenas), key=lambda d: d.spec.capacity_bytes)
    limits = []
    if reserved > biggest.spec.capacity_bytes:
        if len(arenas) == 1:
            limits.append(f"the capacity of device {biggest.spec.device_id!r}, {amount(biggest.spec.capacity_bytes)}")
        else:
            limits.append(
                f"the capacity of every device it may use (the largest, {biggest.spec.device_id!r}, "
                f"has {amount(biggest.spec.capacity_bytes)}; a cache lives on one device)"
            )
    if reserved > pool.max_bytes and pool.spec.max_bytes is not None:
        # Without max_bytes the pool's capacity is its devices': said above.
        limits.append(f"the pool's quota, max_bytes = {amount(pool.max_bytes)}")
    pool_free = pool.max_bytes - _allocated(pool.arenas.values())
    free, largest = _reach(pool, arenas)
    return ResourceExhausted(
        f"pool {name!r} cannot place {amount(reserved)}: it exceeds {' and '.join(limits)}, "
        f"so it can never fit (the pool has {amount(pool_free)} free)",
        requested_bytes=reserved, free_bytes=free, largest_free_extent_bytes=largest, satisfiable=False,
    )


def exhausted(pool: PoolRecord, arenas: list[ArenaRecord], reserved: int) -> ResourceExhausted:
    """The refusal of a request that found no room now, after the pressure ladder: the
    limit it hit, the free bytes and largest extent the pool could use now (a frozen
    arena's free extents cannot be used until its compaction ends), and whether it could
    ever fit (``satisfiable``: the pool's quota and the largest candidate device allow
    it, so waiting may help)."""
    free, largest = _reach(pool, arenas)
    ceiling = min(pool.max_bytes, max(a.device.spec.capacity_bytes for a in arenas))
    own = list(pool.arenas.values())
    pool_allocated = _allocated(own)
    pool_free = pool.max_bytes - pool_allocated
    devices = [a.device for a in arenas]
    roomiest = max(devices, key=_device_free)
    if pool.spec.max_bytes is not None and pool_free < reserved:
        reason = (
            f"its quota, max_bytes = {amount(pool.max_bytes)}, has {amount(pool_free)} free; "
            f"{amount(pool_allocated)} is allocated, {amount(_pinned(own))} of it pinned"
        )
    elif _device_free(roomiest) < reserved:
        device_allocated = _allocated(roomiest.arenas)
        others = device_allocated - sum(a.allocated_bytes for a in roomiest.arenas if a.pool is pool)
        reason = (
            f"device {roomiest.spec.device_id!r} has {amount(_device_free(roomiest))} free of "
            f"{amount(roomiest.spec.capacity_bytes)}; {amount(device_allocated)} is allocated "
            f"({amount(others)} by other pools), {amount(_pinned(roomiest.arenas))} pinned"
        )
    else:
        reason = (
            f"the pool has {amount(pool_free)} free, but the largest free extent it can use is "
            f"{amount(largest)}"
        )
        pinned = _pinned(arenas)
        if pinned:
            reason += f"; {amount(pinned)} of pinned caches can be neither moved nor evicted"
        elsewhere = sum(a.free.free_bytes for a in roomiest.arenas if a.pool is not pool)
        if elsewhere:
            reason += (
                f"; {amount(elsewhere)} free on device {roomiest.spec.device_id!r} is in other pools' "
                "segments"
            )
    frozen = [a.device.spec.device_id for a in arenas if a.compaction is not None]
    if frozen:
        reason += f"; a compaction is running on {', '.join(map(repr, frozen))}"
    return ResourceExhausted(
        f"pool {pool.spec.name!r} cannot place {amount(reserved)} now: {reason}",
        requested_bytes=reserved, free_bytes=free, largest_free_extent_bytes=largest,
        satisfiable=reserved <= ceiling,
    )


def _reach(pool: PoolRecord, arenas: list[ArenaRecord]) -> tuple[int, int]:
    """The free bytes and the largest free extent the pool could use now on ``arenas``."""
    # The pool's quota is shared by its devices: count the unreserved budget once, and
    # only where a segment can be made of it (not below a device's minimum).
    grow = {id(a): h if (h := headroom(a)) >= segment_need(a, 1) else 0 for a in arenas}
    usable = [a for a in arenas if a.compaction is None]
    quota_room = max(pool.max_bytes - pool.reserved_bytes, 0)
    free = sum(a.free.free_bytes for a in usable) + min(sum(grow.values()), quota_room)
    largest = max([max(grow.values(), default=0)] + [a.free.largest_extent() for a in usable])
    return free, largest


def _allocated(arenas) -> int:
    return sum(a.allocated_bytes for a in arenas)


def _pinned(arenas) -> int:
    return sum(a.pinned_bytes for a in arenas)


def _device_free(device: DeviceRecord) -> int:
    """Stats' ``free_bytes`` of a device: its capacity less every pool's allocated bytes."""
    return device.spec.capacity_bytes - _allocated(device.arenas)
