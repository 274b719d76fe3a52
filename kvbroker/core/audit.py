"""Self-check of the broker's accounting: the invariants of DESIGN.md §4, asserted.

Used by the property tests after every step and available to operators' diagnostics.
A failure here is a bug in the broker, never a client's fault, so it raises
``AssertionError``. Cost: O(caches + segments + free extents).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kvbroker.core.freespace import split_address
from kvbroker.core.types import CacheState

if TYPE_CHECKING:
    from kvbroker.core.broker import Broker


def audit(broker: Broker) -> None:
    """Assert that the broker's state is consistent.

    Checks: extents of resident caches never overlap and lie inside their segment; per
    segment, allocated + free == size; per device, allocated + free inside segments +
    unreserved == capacity; per pool, segment bytes stay within ``max_bytes``; pin counts
    equal the sum of per-holder pins; every cache is in its segment's table.
    """
    for pool in broker._pools.values():
        assert pool.reserved_bytes <= pool.max_bytes, (pool.spec.name, pool.reserved_bytes)
        reserved = 0
        for device_id, arena in pool.arenas.items():
            arena.free.check()
            allocated = pinned = live = 0
            for segment_id, seg in arena.segments.items():
                assert broker._segments[segment_id] is seg
                spans = []
                for cache_id, rec in seg.caches.items():
                    assert rec.state is CacheState.RESIDENT, cache_id
                    assert broker._caches[cache_id] is rec
                    seg_id, offset = split_address(rec.address)
                    assert seg_id == segment_id and rec.device_id == device_id, cache_id
                    spans.append((offset, rec.reserved_bytes, cache_id))
                    allocated += rec.reserved_bytes
                    live += 1
                    if rec.pin_count:
                        pinned += rec.reserved_bytes
                spans.sort()
                end = 0
                for offset, nbytes, cache_id in spans:
                    assert offset >= end, f"{cache_id} overlaps the cache before it"
                    end = offset + nbytes
                assert end <= seg.info.nbytes, f"segment {segment_id} overflows"
                used = sum(n for _, n, _ in spans)
                assert used + arena.free.segment_free_bytes(segment_id) == seg.info.nbytes, (
                    f"segment {segment_id}: used {used} + free != size {seg.info.nbytes}"
                )
                reserved += seg.info.nbytes
            for segment_id, seg in arena.draining.items():
                assert seg.draining and not seg.caches and seg.mappers, segment_id
                assert broker._segments[segment_id] is seg
                reserved += seg.info.nbytes
            assert arena.draining_bytes == sum(s.info.nbytes for s in arena.draining.values())
            assert sorted(arena.free.segment_ids()) == sorted(arena.segments)
            assert (allocated, pinned, live) == (
                arena.allocated_bytes, arena.pinned_bytes, arena.live_caches,
            ), (pool.spec.name, device_id)
        assert reserved == pool.reserved_bytes, pool.spec.name
    for device in broker._devices.values():
        arenas = [p.arenas[d] for p in broker._pools.values() for d in p.arenas
                  if d == device.spec.device_id]
        in_segments = sum(a.reserved_bytes for a in arenas)
        assert in_segments == device.reserved_bytes, device.spec.device_id
        allocated = sum(a.allocated_bytes for a in arenas)
        free_inside = sum(a.free.free_bytes for a in arenas)
        draining = sum(a.draining_bytes for a in arenas)
        assert allocated + free_inside + draining + device.unreserved_bytes == device.spec.capacity_bytes
        assert device.unreserved_bytes >= 0
    for cache_id, rec in broker._caches.items():
        assert rec.pin_count == sum(rec.pins.values()) and rec.pin_count >= 0, cache_id
        assert all(count > 0 for count in rec.pins.values()), cache_id
        if rec.state is CacheState.RESIDENT:
            assert cache_id in broker._segments[rec.address >> 48].caches
        else:
            assert rec.holders, f"evicted {cache_id} is kept only while held"
