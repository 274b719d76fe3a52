"""The states the daemon's work outside its lock goes through (CONTRACT.md): pending
caches, creating segments, zeroing, compactions in flight; and force-release tombstones.
"""

from __future__ import annotations

import pytest

from kvbroker.core import (
    AllocationRequest,
    Broker,
    CacheState,
    DeviceSpec,
    EventKind,
    Extent,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PoolSpec,
    ResourceExhausted,
)
from kvbroker.core.audit import audit

from .support import allocate, settle

K = 1024


def make(capacity: int = 256 * K, **pool_kw) -> Broker:
    pool_kw = {"block_bytes": 4 * K, "segment_bytes": 64 * K, **pool_kw}
    return Broker([DeviceSpec("d0", capacity, 4 * K)], [PoolSpec("p", ("d0",), **pool_kw)], clock=lambda: 0.0)


def req(nbytes: int = 4 * K, **kw) -> AllocationRequest:
    return AllocationRequest("p", nbytes, **kw)


def extent(b: Broker, cache_id: str) -> Extent:
    (ext,) = b.get(cache_id).extents
    return ext


# --- pending caches ---------------------------------------------------------------------


def test_a_pending_cache_is_never_handed_out_evicted_or_moved() -> None:
    b = make(capacity=64 * K)
    r = b.allocate(req(16 * K, cache_id="p", holder="s1"))
    assert r.cache.state is CacheState.PENDING and b.get("p").state is CacheState.PENDING
    for call in (b.attach, b.pin):
        with pytest.raises(FailedPrecondition, match="not ready yet"):
            call("p", "s2")
    b.segment_created(r.new_segment.segment_id)
    allocate(b, req(16 * K, cache_id="gap"))
    allocate(b, req(16 * K, cache_id="q"))
    b.release("gap")
    assert b.plan_compaction().moves[0].cache_id == "q"  # the pending cache stays put
    with pytest.raises(ResourceExhausted) as err:
        b.allocate(req(64 * K))  # only evicting the pending cache could make room
    assert err.value.satisfiable
    assert b.get("p").state is CacheState.PENDING and b.get("q").state is CacheState.RESIDENT
    assert b.cache_ready("p") and b.attach("p", "s2").state is CacheState.RESIDENT
    audit(b)


def test_a_pending_cache_whose_holder_leaves_is_freed_when_ready() -> None:
    b = make()
    r = b.allocate(req(8 * K, cache_id="p", holder="s1", pinned=True))
    assert b.end_session("s1") == ([], [])  # marked, not freed: its bytes are busy
    assert b.get("p").holders == frozenset() and b.get("p").pin_count == 0
    assert b.stats().total.allocated_bytes == 8 * K
    b.segment_created(r.new_segment.segment_id)
    assert b.cache_ready("p") is False
    assert b.stats().total.allocated_bytes == 0 and b.caches() == []
    assert b.release("p", "s1") is False  # harmless afterwards
    with pytest.raises(NotFound):
        b.attach("p")
    audit(b)


def test_a_retained_pending_cache_survives_its_holder() -> None:
    b = make()
    r = b.allocate(req(8 * K, cache_id="p", holder="s1", retain=True))
    assert b.release("p", "s1") is False
    settle(b, r)
    assert b.get("p").state is CacheState.RESIDENT and b.get("p").holders == frozenset()
    audit(b)


def test_ready_before_the_segment_exists_is_a_bug() -> None:
    b = make()
    r = b.allocate(req(cache_id="p"))
    with pytest.raises(RuntimeError):
        b.cache_ready("p")
    settle(b, r)
    with pytest.raises(RuntimeError):
        b.cache_ready("p")  # ready twice


# --- creating segments ------------------------------------------------------------------


def test_a_creating_segment_withholds_its_free_bytes_until_created() -> None:
    b = make()
    r1 = b.allocate(req(8 * K, cache_id="a"))
    first = r1.new_segment
    assert first is not None and r1.cache.extents == (Extent(first.segment_id, 0, 8 * K),)
    r2 = b.allocate(req(8 * K, cache_id="b"))  # the first segment's rest is withheld
    assert r2.new_segment is not None and r2.new_segment.segment_id != first.segment_id
    usage = b.stats().total
    assert (usage.reserved_bytes, usage.allocated_bytes, usage.segments) == (128 * K, 16 * K, 2)
    assert b.segment(first.segment_id) == first
    audit(b)
    b.segment_created(first.segment_id)
    r3 = b.allocate(req(8 * K, cache_id="c"))
    assert r3.new_segment is None and r3.cache.extents == (Extent(first.segment_id, 8 * K, 8 * K),)
    with pytest.raises(RuntimeError):
        b.segment_created(first.segment_id)  # twice
    audit(b)


def test_abort_drops_a_creating_segment_but_keeps_a_created_one() -> None:
    b = make()
    r = b.allocate(req(8 * K, cache_id="a", holder="s1", pinned=True))
    assert b.abort_allocation(r) == ()  # not returned: the backend cleans up itself
    assert b.segments() == [] and b.stats().total.reserved_bytes == 0
    with pytest.raises(NotFound):
        b.get("a")  # nobody saw it: no tombstone
    r = b.allocate(req(8 * K, cache_id="a"))
    b.segment_created(r.new_segment.segment_id)
    assert b.abort_allocation(r) == ()
    assert b.segments() == [r.new_segment] and b.stats().total.allocated_bytes == 0
    audit(b)


# --- zeroing ----------------------------------------------------------------------------


def test_needs_zeroing_follows_the_high_water_mark() -> None:
    b = make()
    first = allocate(b, req(8 * K, cache_id="a"))
    assert not first.needs_zeroing  # a new segment
    assert not allocate(b, req(8 * K, cache_id="b")).needs_zeroing  # above the mark
    b.release("a")
    again = allocate(b, req(8 * K, cache_id="c"))
    assert again.cache.extents == first.cache.extents and again.needs_zeroing  # reused bytes
    assert not allocate(b, req(16 * K, cache_id="d")).needs_zeroing  # above the mark again


def test_needs_zeroing_is_reported_when_the_pool_does_not_scrub() -> None:
    b = make(scrub=False)
    assert b.pools[0].scrub is False
    allocate(b, req(8 * K, cache_id="a"))
    b.release("a")
    assert allocate(b, req(8 * K)).needs_zeroing  # the daemon decides not to zero


# --- compactions in flight --------------------------------------------------------------


def fragmented() -> Broker:
    """One 64 KiB segment: a (16K) hole (16K) b (16K) c (16K), every cache held by s1."""
    b = make()
    for name in ("a", "x", "b", "c"):
        allocate(b, req(16 * K, cache_id=name, holder="s1"))
    b.release("x", "s1")
    b.drain_events()
    return b


def test_a_frozen_arena_is_not_placed_in_nor_evicted_from() -> None:
    b = fragmented()
    plan = b.plan_compaction()
    assert [m.cache_id for m in plan.moves] == ["b", "c"]
    b.begin_compaction(plan)
    assert b.is_moving("b") and b.is_moving("c") and not b.is_moving("a") and not b.is_moving("nope")
    assert b.get("b").moving
    for call in (b.attach, b.pin):
        with pytest.raises(FailedPrecondition, match="being moved"):
            call("b", "s2")
    b.pin("a", "s2")  # not moving: usable
    assert b.plan_compaction().moves == ()  # nothing more to plan there
    r = b.allocate(req(16 * K, cache_id="n"))  # the hole is frozen: a new segment
    assert r.new_segment is not None
    b.segment_created(r.new_segment.segment_id)
    assert b.cache_ready("n")
    small = make(capacity=64 * K)
    for name in ("a", "x", "b"):
        allocate(small, req(16 * K, cache_id=name))
    small.release("x")
    small.begin_compaction(small.plan_compaction())
    with pytest.raises(ResourceExhausted) as err:
        small.allocate(req(32 * K))  # fits only by compacting or evicting the frozen arena
    assert err.value.satisfiable and err.value.largest_free_extent_bytes < 32 * K
    assert [c.cache_id for c in small.caches()] == ["a", "b"]
    audit(b)
    audit(small)


def test_a_partial_commit_applies_a_prefix_and_releases_wait_for_the_end() -> None:
    b = fragmented()
    plan = b.plan_compaction()
    b.begin_compaction(plan)
    with pytest.raises(FailedPrecondition):
        b.begin_compaction(plan)  # already frozen
    assert b.release("c", "s1")  # freed for the caller; its bytes stay until the end
    assert b.stats().total.allocated_bytes == 48 * K
    audit(b)
    assert b.commit(plan, completed=1) == ()
    assert extent(b, "b").offset == 16 * K and b.get("b").epoch == 1 and not b.get("b").moving
    (event,) = b.drain_events()
    assert (event.kind, event.cache_id, event.recipients) == (EventKind.MOVED, "b", frozenset({"s1"}))
    assert b.stats().total.allocated_bytes == 32 * K  # the deferred free happened
    assert allocate(b, req(16 * K, cache_id="n")).cache is not None  # thawed
    audit(b)


def test_abort_leaves_every_cache_where_it_was() -> None:
    b = fragmented()
    before = {c.cache_id: c.extents for c in b.caches()}
    plan = b.plan_compaction()
    b.begin_compaction(plan)
    assert b.abort_compaction(plan) == ()
    assert {c.cache_id: c.extents for c in b.caches()} == before
    assert b.drain_events() == [] and not b.is_moving("b")
    with pytest.raises(InvalidArgument):
        b.commit(b.plan_compaction(), completed=99)
    audit(b)


def test_a_plan_made_stale_is_refused_at_begin() -> None:
    b = fragmented()
    plan = b.plan_compaction()
    b.pin("c", "s1")
    with pytest.raises(FailedPrecondition, match="stale"):
        b.begin_compaction(plan)
    assert not b.is_moving("b")
    audit(b)


def test_emptied_segments_go_back_after_a_whole_commit() -> None:
    b = make()
    allocate(b, req(32 * K, cache_id="a"))
    allocate(b, req(32 * K, cache_id="gap"))
    allocate(b, req(64 * K, cache_id="big"))
    allocate(b, req(16 * K, cache_id="tail"))  # alone in a third segment
    b.release("gap")
    plan = b.plan_compaction()
    assert plan.segments_emptied
    b.begin_compaction(plan)
    retired = b.commit(plan)
    assert [s.segment_id for s in retired] == list(plan.segments_emptied)
    audit(b)


# --- force release ----------------------------------------------------------------------


def test_other_holders_of_a_force_released_cache_learn_it_was_evicted() -> None:
    b = make()
    allocate(b, req(cache_id="a", holder="s1"))
    b.attach("a", "s2")
    b.drain_events()
    assert b.release("a", "s1", force=True)
    (event,) = b.drain_events()
    assert (event.kind, event.recipients, event.reason) == (EventKind.EVICTED, frozenset({"s2"}), "released by force")
    for call in (b.attach, b.pin, b.get):
        with pytest.raises(FailedPrecondition, match=r"was evicted \(released by force\)"):
            call("a")
    assert b.release("a", "s2") is False
    allocate(b, req(cache_id="b", holder="s1"))
    assert b.release("b", "s1", force=True)  # nobody else held it: a plain release
    with pytest.raises(NotFound):
        b.attach("b")
