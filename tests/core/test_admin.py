"""Operators' actions on a pool (kvbroker/core/admin.py): evict now, change limits at run
time through the pressure rules; and the per-state cache counts that stats report."""

from __future__ import annotations

import pytest

from kvbroker.core import AllocationRequest, Broker, CacheState, DeviceSpec, EventKind, PoolSpec
from kvbroker.core.audit import audit
from kvbroker.core.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted

from .support import allocate

MiB = 1 << 20


def make(**pool: object) -> Broker:
    """One 64 MiB device; pool "p" in 8 MiB segments of 1 MiB blocks; pool "q" beside it."""
    spec = {"block_bytes": MiB, "segment_bytes": 8 * MiB, "gc_threshold": 1.0, **pool}
    return Broker(
        [DeviceSpec("d", 64 * MiB, 4096)],
        [PoolSpec("p", ("d",), **spec), PoolSpec("q", ("d",), block_bytes=MiB, segment_bytes=8 * MiB)],
    )


def put(b: Broker, cache_id: str, mib: int = 4, *, holder: str = "s", **kw: object) -> None:
    allocate(b, AllocationRequest("p", mib * MiB, cache_id=cache_id, holder=holder, **kw))


# -- evict ------------------------------------------------------------------------------


def test_evict_takes_every_unpinned_cache_in_policy_order_and_tells_holders():
    b = make()
    for name in ("a", "b", "c"):
        put(b, name)
    b.pin("b", "s")
    b.attach("a", "s")  # a is now the most recently used
    result = b.admin.evict("p")
    assert result.cache_ids == ("c", "a") and result.nbytes == 8 * MiB and result.kept == 1
    assert {e.cache_id for e in b.drain_events() if e.kind is EventKind.EVICTED} == {"a", "c"}
    assert b.get("b").state is CacheState.RESIDENT
    by_cause = dict(next(a for a in b.stats().arenas if a.pool == "p").evictions)
    assert by_cause == {"operator": 2}
    audit(b)


def test_evict_idle_only_takes_retained_caches_nobody_holds():
    b = make()
    put(b, "held", retain=True)
    put(b, "idle", retain=True)
    put(b, "plain")
    b.release("idle", "s")
    assert b.stats().pools[0].usage.idle_retained_caches == 1
    result = b.admin.evict("p", idle_only=True)
    assert result.cache_ids == ("idle",) and result.kept == 2
    with pytest.raises(FailedPrecondition, match="was evicted"):
        b.get("idle")  # nobody held it: only its tombstone is left
    assert b.stats().pools[0].usage.idle_retained_caches == 0
    audit(b)


def test_evict_names_an_unknown_pool_or_device():
    b = make()
    with pytest.raises(NotFound, match="nosuch"):
        b.admin.evict("nosuch")
    with pytest.raises(InvalidArgument, match="pool"):
        b.admin.evict("")
    with pytest.raises(NotFound, match="uses no device 'gpu'"):
        b.admin.evict("p", device="gpu")


# -- limits -----------------------------------------------------------------------------


def spec(b: Broker, name: str = "p") -> PoolSpec:
    return next(p for p in b.pools if p.name == name)


def test_raising_max_priority_and_min_apply_at_once():
    b = make(max_bytes=16 * MiB)
    change = b.admin.set_limits("p", max_bytes=32 * MiB, min_bytes=8 * MiB, priority=5)
    assert (change.before.max_bytes, change.after.max_bytes) == (16 * MiB, 32 * MiB)
    assert (spec(b).max_bytes, spec(b).min_bytes, spec(b).priority) == (32 * MiB, 8 * MiB, 5)
    assert b.stats().pools[0].max_bytes == 32 * MiB
    for i in range(6):  # 24 MiB: over the old quota
        put(b, f"c{i}")
    assert b.get("c5").priority == 5, "new caches take the pool's new priority"
    assert b.admin.set_limits("p", max_bytes=1 << 40).after.max_bytes == 64 * MiB, "capped at the device"
    audit(b)


def test_lowering_max_gives_back_empty_then_idle_then_smallest_segments():
    b = make()
    # Four 8 MiB segments: one empty (its cache released), one holding an idle retained
    # cache only, one a held 4 MiB cache, one a held 8 MiB cache.
    put(b, "x", 8)
    put(b, "idle", 8, retain=True)
    put(b, "held", 4)
    put(b, "h1", 8)
    b.release("x", "s")
    b.release("idle", "s")
    assert b.stats().pools[0].usage.segments == 4
    change = b.admin.set_limits("p", max_bytes=16 * MiB, dry_run=True)
    assert change.dry_run and change.evicted == ("idle",) and len(change.retired) == 2
    assert b.stats().pools[0].max_bytes == 64 * MiB and b.get("idle").state is CacheState.RESIDENT, "a dry run changes nothing"
    change = b.admin.set_limits("p", max_bytes=16 * MiB)
    assert change.evicted == ("idle",) and change.evicted_bytes == 8 * MiB and len(change.retired) == 2
    assert b.stats().pools[0].usage.reserved_bytes == 16 * MiB and spec(b).max_bytes == 16 * MiB
    change = b.admin.set_limits("p", max_bytes=8 * MiB)
    assert change.evicted == ("held",), "the segment with the fewest cache bytes goes next"
    assert [e.reason for e in b.drain_events() if e.cache_id == "held"] == [
        "pool 'p' max_bytes lowered to 8388608 by an operator"
    ]
    audit(b)


def test_a_mapped_segment_drains_and_the_pool_may_not_grow_meanwhile():
    b = make()
    put(b, "a", 8)
    put(b, "b", 8, pinned=True)
    segment = b.get("a").extents[0].segment_id
    b.note_mapped(segment, "s")
    b.release("a", "s")
    change = b.admin.set_limits("p", max_bytes=8 * MiB)
    assert [s.segment_id for s in change.draining] == [segment] and change.retired == ()
    events = [e for e in b.drain_events() if e.kind is EventKind.SEGMENT_RETIRED]
    assert [e.segment_id for e in events] == [segment]
    audit(b)  # the draining segment is leaving: within max_bytes
    with pytest.raises(ResourceExhausted):
        b.allocate(AllocationRequest("p", 4 * MiB, holder="s"))
    assert b.note_unmapped(segment, "s") is not None
    audit(b)


def test_a_max_that_would_touch_pinned_caches_is_refused_and_nothing_changes():
    b = make()
    put(b, "a", 8, pinned=True)
    put(b, "b", 8)
    with pytest.raises(FailedPrecondition) as info:
        b.admin.set_limits("p", max_bytes=4 * MiB)
    assert "the lowest max_bytes possible now is 8.00 MiB (8388608 bytes)" in str(info.value)
    assert b.get("b").state is CacheState.RESIDENT and b.stats().pools[0].max_bytes == 64 * MiB
    assert b.drain_events() == []
    audit(b)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"max_bytes": 0}, "max_bytes"),
        ({"min_bytes": -1}, "min_bytes"),
        ({"priority": 2**31}, "priority"),
        ({"min_bytes": 128 * MiB}, "min_bytes"),
        ({"max_bytes": 4 * MiB, "min_bytes": 8 * MiB}, "min_bytes"),
        ({"max_bytes": "1GiB"}, "max_bytes"),
    ],
)
def test_invalid_limits_name_the_field(kwargs, field):
    b = make(min_bytes=0)
    with pytest.raises(InvalidArgument) as info:
        b.admin.set_limits("p", **kwargs)
    assert info.value.field == field


def test_a_max_below_min_names_max():
    b = make(min_bytes=16 * MiB)
    with pytest.raises(InvalidArgument) as info:
        b.admin.set_limits("p", max_bytes=8 * MiB)
    assert info.value.field == "max_bytes" and "change min_bytes too" in str(info.value)


# -- counts by state ----------------------------------------------------------------------


def test_usage_counts_pending_pinned_and_idle_retained_caches():
    b = make()
    pending = b.allocate(AllocationRequest("p", MiB, cache_id="new", holder="s", pinned=True))
    put(b, "kept", retain=True)
    put(b, "pin", pinned=True)
    u = b.stats().pools[0].usage
    assert (u.active_caches, u.pending_caches, u.pinned_caches, u.idle_retained_caches) == (3, 1, 2, 0)
    b.release("kept", "s")
    b.segment_created(pending.new_segment.segment_id) if pending.new_segment else None
    b.cache_ready("new")
    u = b.stats().pools[0].usage
    assert (u.pending_caches, u.pinned_caches, u.idle_retained_caches) == (0, 2, 1)
    b.attach("kept", "t")
    assert b.stats().pools[0].usage.idle_retained_caches == 0
    b.release("kept", "t", force=True)
    b.unpin("pin", "s")
    u = b.stats().total
    assert (u.active_caches, u.pinned_caches, u.idle_retained_caches) == (2, 1, 0)
    audit(b)
