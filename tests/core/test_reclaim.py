"""Background reclamation above gc_threshold: idle retained caches (no holder, no pin) in
the pool's policy order, down to the threshold minus the hysteresis; a cache that
anyone holds or pins never (issue 10.3: that is the pressure path's, when an allocation
needs the room)."""

from __future__ import annotations

from kvbroker.core import AllocationRequest, Broker, CacheState, DeviceSpec, PoolSpec
from kvbroker.core.audit import audit
from kvbroker.core.reclaim import RECLAIM_HYSTERESIS

from .support import allocate

MiB = 1 << 20


def make(gc_threshold: float) -> Broker:
    return Broker(
        [DeviceSpec("d", 100 * MiB, 4096)],
        [PoolSpec("p", ("d",), gc_threshold=gc_threshold, block_bytes=MiB, segment_bytes=100 * MiB)],
    )


def test_nothing_happens_at_or_below_the_threshold():
    broker = make(0.5)
    for i in range(5):
        allocate(broker, AllocationRequest("p", 10 * MiB, holder="s"))
    assert broker.reclaim() == []
    assert broker.stats().total.allocated_bytes == 50 * MiB


def test_idle_retained_caches_go_in_policy_order_down_to_the_hysteresis():
    broker = make(0.5)
    for i in range(8):
        allocate(broker, AllocationRequest("p", 10 * MiB, cache_id=f"c{i}", holder="s", retain=i != 1))
    for i in (5, 0, 7, 6, 3):
        broker.release(f"c{i}", "s")  # idle retained: no holder, kept only by retain
    broker.attach("c0", "t")
    broker.release("c0", "t")  # c0 was used last: LRU order is now c3, c5, c6, c7, c0
    evicted = broker.reclaim()  # 80 MiB allocated, 45 MiB the target: four go
    target = (0.5 - RECLAIM_HYSTERESIS) * 100 * MiB
    assert evicted == ["c3", "c5", "c6", "c7"], "the least recently used idle caches, and no more than needed"
    assert broker.stats().total.allocated_bytes <= target
    assert broker.stats().total.allocated_bytes > target - 10 * MiB, "no more than needed"
    assert broker.drain_events() == [], "nobody held them: nobody to tell"
    audit(broker)


def test_pinned_and_held_caches_are_never_reclaimed_and_batches_are_bounded():
    broker = make(0.1)
    for i in range(9):
        allocate(broker, AllocationRequest("p", 10 * MiB, cache_id=f"c{i}", holder="s", pinned=i < 3, retain=True))
    for i in range(3, 8):
        broker.release(f"c{i}", "s")
    first = broker.reclaim(max_victims=2)
    assert len(first) == 2
    rest = broker.reclaim(max_victims=64)
    assert sorted(first + rest) == [f"c{i}" for i in range(3, 8)]
    assert {c.cache_id for c in broker.caches(state=CacheState.RESIDENT)} == {"c0", "c1", "c2", "c8"}
    audit(broker)


def test_a_cache_a_live_holder_holds_is_never_reclaimed():
    """Issue 10.3: the example config's vista pool (gc_threshold 0.85) took a 1400 MiB
    cache from the live worker that had just allocated it. Above the threshold, only
    idle retained caches go; held ones (retained or not) stay however full the pool."""
    broker = make(0.5)
    held = [allocate(broker, AllocationRequest("p", 10 * MiB, cache_id=f"h{i}", holder="s", retain=i % 2 == 0))
            for i in range(9)]
    assert broker.reclaim() == []
    assert {c.cache_id for c in broker.caches(state=CacheState.RESIDENT)} == {r.cache.cache_id for r in held}
    assert broker.drain_events() == []
    audit(broker)


def test_only_idle_retained_caches_go_and_reclamation_stops_when_none_is_left():
    broker = make(0.3)
    for i in range(6):
        allocate(broker, AllocationRequest("p", 10 * MiB, cache_id=f"c{i}", holder="s", retain=i < 3))
    broker.release("c0", "s")
    broker.release("c2", "s")  # idle retained
    broker.release("c3", "s")  # not retained: freed by its release
    assert sorted(broker.reclaim()) == ["c0", "c2"]
    assert broker.stats().total.allocated_bytes == 30 * MiB, "still above the threshold: nothing else is idle"
    assert broker.reclaim() == []
    evictions, dropped = broker.drain_evictions()
    assert [(e.cache_id, e.pool, e.device_id, e.nbytes, e.cause, e.held) for e in evictions] == [
        ("c0", "p", "d", 10 * MiB, "threshold", False), ("c2", "p", "d", 10 * MiB, "threshold", False)]
    assert dropped == 0
    assert broker.drain_evictions() == ([], 0)
    audit(broker)


def test_a_device_above_its_threshold_takes_idle_retained_caches_of_any_pool_only():
    broker = Broker(
        [DeviceSpec("d", 100 * MiB, 4096)],
        [PoolSpec("low", ("d",), gc_threshold=0.95, priority=0, block_bytes=MiB, segment_bytes=50 * MiB),
         PoolSpec("high", ("d",), gc_threshold=0.4, priority=5, block_bytes=MiB, segment_bytes=50 * MiB)],
    )
    for i in range(4):
        allocate(broker, AllocationRequest("low", 10 * MiB, cache_id=f"l{i}", holder="s", retain=True))
        allocate(broker, AllocationRequest("high", 10 * MiB, cache_id=f"h{i}", holder="s"))
    broker.release("l1", "s")
    assert broker.reclaim() == ["l1"], "the device's threshold (0.4) is passed; only l1 is idle"
    assert broker.reclaim() == []
    audit(broker)


def test_a_pool_above_its_threshold_full_of_held_caches_costs_nothing_per_tick():
    """Held caches are not candidates, so a tick over a pool they fill must not walk its
    policy's every candidate to find none (four ticks a second, for as long as the
    holders keep them): it looks at the arena's unheld caches only."""
    from .test_scale import Unwalkable, forbid_walks

    broker = make(0.5)
    for i in range(90):
        allocate(broker, AllocationRequest("p", MiB, cache_id=f"c{i}", holder=f"s{i % 3}", retain=i % 2 == 0))
    forbid_walks(broker)
    assert broker.reclaim() == []
    assert Unwalkable.lookups == 0
