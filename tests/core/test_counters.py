"""Cumulative per-arena counters in the stats snapshot (what telemetry exports as
``kvbroker_evictions_total``, ``kvbroker_releases_total``, ``kvbroker_compactions_total``...)."""

from __future__ import annotations

from kvbroker.core import Broker, DeviceSpec, PoolSpec
from kvbroker.core.types import EVICTION_CAUSES, ArenaCounters

from .support import evict
from .test_broker import K, _four_full_segments, _fragmented, alloc, make, req


def counters(b: Broker, pool: str = "p", device: str = "d0") -> ArenaCounters:
    (arena,) = [a for a in b.stats().arenas if (a.pool, a.device_id) == (pool, device)]
    return arena


def test_a_fresh_broker_has_one_zero_counter_set_per_arena() -> None:
    b = Broker(
        [DeviceSpec("d0", 256 * K, 4 * K), DeviceSpec("d1", 256 * K, 4 * K)],
        [PoolSpec("p", ("d0", "d1"), block_bytes=4 * K), PoolSpec("q", ("d1",), block_bytes=4 * K)],
    )
    assert b.stats().arenas == (
        ArenaCounters("p", "d0"), ArenaCounters("p", "d1"), ArenaCounters("q", "d1"),
    )  # fmt: skip


def test_releases_count_caches_freed_not_calls() -> None:
    b = make()
    alloc(b, 4 * K, cache_id="a", holder="s1")
    alloc(b, 4 * K, cache_id="r", retain=True)
    b.attach("a", "s2")
    assert not b.release("a", "s1")  # s2 still holds it
    assert b.release("a", "s2")
    assert not b.release("a", "s2")  # twice is harmless, and not counted
    assert not b.release("r")  # retained: not freed
    assert counters(b).releases == 1
    assert b.release("r", force=True)
    assert counters(b).releases == 2


def test_evictions_are_counted_by_cause_with_their_bytes() -> None:
    b = _four_full_segments()
    alloc(b, 64 * K, cache_id="e")  # the pool's policy evicts one 64 KiB cache
    evict(b, "c")
    c = counters(b)
    assert dict(c.evictions) == {"policy": 2}
    assert dict(c.evicted_bytes) == {"policy": 128 * K}
    assert set(dict(c.evictions)) <= set(EVICTION_CAUSES)
    assert b.stats().eviction_count == 2  # the existing total agrees


def test_idle_retained_caches_are_counted_as_idle() -> None:
    b = make()
    for i in range(4):
        alloc(b, 64 * K, cache_id=f"r{i}", retain=True)
        b.release(f"r{i}")  # retained, no holder: idle
    alloc(b, 64 * K, cache_id="new")
    assert dict(counters(b).evictions) == {"idle": 1}


def test_a_committed_compaction_counts_once_per_arena_with_its_bytes() -> None:
    b = _fragmented()
    plan = b.allocate(req(32 * K, cache_id="big")).compaction
    assert counters(b).compactions == 0  # planning counts nothing
    b.commit(plan)
    c = counters(b)
    assert (c.compactions, c.moved_bytes) == (1, plan.bytes_moved) == (1, 16 * K)  # targeted: b only
