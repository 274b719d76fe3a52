"""Background reclamation above gc_threshold: idle retained caches first, then unpinned
caches by policy, down to the threshold minus the hysteresis; pinned caches never."""

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


def test_idle_retained_first_then_policy_order_down_to_the_hysteresis():
    broker = make(0.5)
    for i in range(8):
        allocate(broker, AllocationRequest("p", 10 * MiB, cache_id=f"c{i}", holder="s", retain=i in (5, 6)))
    broker.release("c5", "s")
    broker.release("c6", "s")  # idle retained: no holder, kept only by retain
    evicted = broker.reclaim()
    target = (0.5 - RECLAIM_HYSTERESIS) * 100 * MiB
    assert evicted[:2] == ["c5", "c6"], "idle retained caches go first"
    assert evicted[2:] == ["c0", "c1"], "then the least recently used"
    assert broker.stats().total.allocated_bytes <= target
    assert broker.stats().total.allocated_bytes > target - 10 * MiB, "no more than needed"
    events = broker.drain_events()
    assert {e.cache_id for e in events} == {"c0", "c1"}, "holders of evicted caches learn of it"
    audit(broker)


def test_pinned_caches_are_never_reclaimed_and_batches_are_bounded():
    broker = make(0.1)
    for i in range(9):
        allocate(broker, AllocationRequest("p", 10 * MiB, cache_id=f"c{i}", holder="s", pinned=i < 3))
    first = broker.reclaim(max_victims=2)
    assert len(first) == 2
    rest = broker.reclaim(max_victims=64)
    assert sorted(first + rest) == [f"c{i}" for i in range(3, 9)]
    assert {c.cache_id for c in broker.caches(state=CacheState.RESIDENT)} == {"c0", "c1", "c2"}
    audit(broker)
