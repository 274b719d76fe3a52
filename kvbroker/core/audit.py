"""Self-check of the broker's accounting: every invariant the core promises, asserted.

Used by the property tests after every step and available to operators' diagnostics.
A failure here is a bug in the broker, never a client's fault, so it raises
``AssertionError``. Cost: O(caches + segments + free extents).

The invariants:

- Bytes: per segment, used + free + withheld == size (free only for placeable segments,
  withheld only for creating ones, a draining segment is empty); per device,
  allocated + free + withheld + draining + unreserved == capacity; per pool, segment
  bytes within ``max_bytes`` (draining ones aside: they are leaving); per arena, its
  allocated, pinned and live-cache counters, and its pending, pinned and idle retained
  cache counts, are the sums over its caches.
- Extents: the extents of a segment's caches never overlap and lie inside it, below its
  high-water mark; a creating segment holds one PENDING cache, at offset 0.
- States: a PENDING cache is not moving; a MOVING cache is resident, unpinned and moved
  by the compaction freezing its arena; a cache a segment holds but the table forgot was
  freed during the compaction freezing its arena; only caches with holders stay EVICTED.
- Indexes: the id order, the holder index, each arena's unheld index and the mapper
  index match the records; pins are counted per holder and every pinner holds the cache.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kvbroker.core.freespace import split_address
from kvbroker.core.types import CacheState

if TYPE_CHECKING:
    from kvbroker.core.broker import Broker


def audit(broker: Broker) -> None:
    """Assert that the broker's state is consistent (see the module docstring)."""
    ledger = broker._ledger
    caches = ledger.caches
    in_segments: set[str] = set()
    for pool in ledger.pools.values():
        # Draining segments are on their way out (a lowered max_bytes drains mapped ones).
        assert pool.kept_bytes <= pool.max_bytes, (pool.spec.name, pool.kept_bytes)
        reserved = 0
        for device_id, arena in pool.arenas.items():
            arena.free.check()
            assert arena in arena.device.arenas
            allocated = pinned = live = withheld = pending = pinned_caches = idle = offloading = 0
            frozen = arena.compaction
            deferred = {id(rec) for rec in frozen.deferred} if frozen else set()
            for table in (arena.segments, arena.creating, arena.draining):
                for segment_id, seg in table.items():
                    assert ledger.segments.get(segment_id) is seg and seg.arena is arena
                    assert (seg.creating, seg.draining) == (table is arena.creating, table is arena.draining)
                    spans = []
                    for cache_id, rec in seg.caches.items():
                        assert rec.cache_id == cache_id and rec.arena is arena and rec.device_id == device_id
                        assert rec.state not in (CacheState.EVICTED, CacheState.OFFLOADED), cache_id
                        offloading += rec.reserved_bytes if rec.offloading else 0
                        if caches.get(cache_id) is rec:
                            in_segments.add(cache_id)
                            pending += rec.state is CacheState.PENDING
                            pinned_caches += rec.pin_count > 0
                            idle += rec.retain and rec.state is CacheState.RESIDENT and not rec.holders
                        else:
                            assert id(rec) in deferred, f"{cache_id} is in a segment but forgotten"
                        seg_id, offset = split_address(rec.address)
                        assert seg_id == segment_id, cache_id
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
                    assert end <= seg.high_water <= seg.info.nbytes, segment_id
                    used = sum(n for _, n, _ in spans)
                    if seg.creating:
                        assert len(spans) == 1 and spans[0][0] == 0, segment_id
                        assert seg.caches[spans[0][2]].state is CacheState.PENDING
                        withheld += seg.info.nbytes - used
                    elif seg.draining:
                        assert not seg.caches and seg.mappers, segment_id
                    else:
                        free = arena.free.segment_free_bytes(segment_id)
                        assert used + free == seg.info.nbytes, f"segment {segment_id}: {used} + {free} != size"
                    reserved += seg.info.nbytes
            assert arena.draining_bytes == sum(s.info.nbytes for s in arena.draining.values())
            assert arena.withheld_bytes == withheld, (pool.spec.name, device_id)
            assert arena.offloading_bytes == offloading, (pool.spec.name, device_id)
            assert sorted(arena.free.segment_ids()) == sorted(arena.segments)
            assert (allocated, pinned, live) == (arena.allocated_bytes, arena.pinned_bytes, arena.live_caches)
            counted = (arena.pending_caches, arena.pinned_caches, arena.idle_retained)
            assert (pending, pinned_caches, idle) == counted, (pool.spec.name, device_id, counted)
            if frozen:
                assert frozen.plan.token in ledger.compactions and arena in frozen.arenas
        assert reserved == pool.reserved_bytes, pool.spec.name
    for device in ledger.devices.values():
        arenas = device.arenas
        assert sum(a.reserved_bytes for a in arenas) == device.reserved_bytes, device.spec.device_id
        total = sum(a.allocated_bytes + a.free.free_bytes + a.withheld_bytes + a.draining_bytes for a in arenas)
        assert total + device.unreserved_bytes == device.spec.capacity_bytes and device.unreserved_bytes >= 0
    for compaction in ledger.compactions.values():
        for rec in compaction.records:
            assert rec.moving and rec.arena.compaction is compaction and not rec.pin_count
    holders: dict[str, set[str]] = {}
    tiers_used: dict[str, int] = {}
    for cache_id, rec in caches.records.items():
        assert rec.pin_count == sum(rec.pins.values()) and rec.pin_count >= 0, cache_id
        assert all(count > 0 for count in rec.pins.values()) and set(rec.pins) <= rec.holders, cache_id
        for holder in rec.holders:
            holders.setdefault(holder, set()).add(cache_id)
        if rec.state is CacheState.EVICTED:
            assert rec.holders and not rec.moving, f"evicted {cache_id} is kept only while held"
        elif rec.state is CacheState.OFFLOADED:
            assert rec.tier and rec.address < 0 and not rec.pin_count and not rec.moving, cache_id
            assert rec.holders or rec.retain, f"offloaded {cache_id} is kept only while held or retained"
        else:
            assert cache_id in in_segments, cache_id
        if rec.offloading:
            assert rec.state is CacheState.RESIDENT and rec.tier and not rec.pin_count and not rec.moving, cache_id
        if rec.restoring:
            assert rec.state is CacheState.PENDING and rec.tier, cache_id
        assert not rec.tier or rec.offloading or rec.restoring or rec.state is CacheState.OFFLOADED, cache_id
        tiers_used[rec.tier] = tiers_used.get(rec.tier, 0) + rec.nbytes
        if rec.moving:
            assert rec.state is CacheState.RESIDENT and rec.arena.compaction is not None, cache_id
        if rec.doomed:
            assert (rec.state is CacheState.PENDING or rec.offloading) and not rec.holders, cache_id
    assert holders == caches.holders(), "the holder index differs from the records"
    tiers = ledger.tiers
    for tier, used in tiers.used.items():
        assert used == tiers_used.get(tier, 0) <= tiers.budgets[tier], (tier, used, tiers_used)
        assert used == sum(n for (_, t), n in tiers.by_pool.items() if t == tier), tier
    unheld: dict[int, set[str]] = {}
    for cache_id, rec in caches.records.items():
        if not rec.holders:
            unheld.setdefault(id(rec.arena), set()).add(cache_id)
    for pool in ledger.pools.values():
        for arena in pool.arenas.values():
            expected = unheld.get(id(arena), set())
            assert set(arena.unheld) == expected, (pool.spec.name, set(arena.unheld) ^ expected)
            assert all(caches.get(cache_id) is rec for cache_id, rec in arena.unheld.items())
    ordered = [rec.cache_id for rec in caches.in_order()]
    assert ordered == sorted(caches.records), "the id order differs from the records"
    mapped: dict[str, set[int]] = {}
    for seg in ledger.segments:
        for holder in seg.mappers:
            mapped.setdefault(holder, set()).add(seg.info.segment_id)
    assert mapped == ledger.segments.mapped_by(), "the mapper index differs from the segments"
