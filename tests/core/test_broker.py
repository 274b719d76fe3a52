"""Broker: placement, validation, holders and pins, the pressure ladder, compaction, stats."""

from __future__ import annotations

import pytest

from kvbroker.core import (
    AllocateResult,
    AllocationRequest,
    AlreadyExists,
    Broker,
    CacheState,
    DeviceSpec,
    EventKind,
    Extent,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Placement,
    PoolSpec,
    ResourceExhausted,
)
from kvbroker.core.audit import audit

from .support import evict, settle

K = 1024


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make(
    pools: list[PoolSpec] | None = None,
    devices: list[DeviceSpec] | None = None,
    clock: Clock | None = None,
) -> Broker:
    devices = devices or [DeviceSpec("d0", 256 * K, 4 * K)]
    pools = pools or [PoolSpec("p", ("d0",), block_bytes=4 * K, segment_bytes=64 * K)]
    return Broker(devices, pools, clock=clock or Clock())


def req(nbytes: int = 4 * K, pool: str = "p", **kw) -> AllocationRequest:
    return AllocationRequest(pool, nbytes, **kw)


def alloc(b: Broker, nbytes: int = 4 * K, pool: str = "p", **kw) -> AllocateResult:
    """Allocate and finish the allocation as the daemon does (segment created, ready)."""
    result = b.allocate(req(nbytes, pool, **kw))
    assert result.cache is not None and result.compaction is None
    audit(b)
    settle(b, result)
    audit(b)
    return result


def place(b: Broker, nbytes: int = 4 * K, pool: str = "p", **kw) -> AllocateResult:
    """Allocate the way the daemon does: commit compaction plans and ask again."""
    for _ in range(4):
        result = b.allocate(req(nbytes, pool, **kw))
        if result.cache is not None:
            settle(b, result)
            audit(b)
            return result
        b.commit(result.compaction)
        audit(b)
    raise AssertionError("compaction did not converge")


def extent(b: Broker, cache_id: str) -> Extent:
    (ext,) = b.get(cache_id).extents
    return ext


def pool_usage(b: Broker, name: str):
    return next(p for p in b.stats().pools if p.pool == name).usage


def device_usage(b: Broker, name: str):
    return next(d for d in b.stats().devices if d.device_id == name).usage


# --- construction -----------------------------------------------------------------------


def test_construction_validates_specs() -> None:
    d0 = DeviceSpec("d0", 64 * K)
    with pytest.raises(InvalidArgument, match="devices"):
        Broker([], [PoolSpec("p", ("d0",))])
    with pytest.raises(InvalidArgument, match="pools"):
        Broker([d0], [])
    with pytest.raises(InvalidArgument, match="unknown device"):
        Broker([d0], [PoolSpec("p", ("d9",))])
    with pytest.raises(InvalidArgument, match="twice"):
        Broker([d0, d0], [PoolSpec("p", ("d0",))])
    with pytest.raises(InvalidArgument, match="twice"):
        Broker([d0], [PoolSpec("p", ("d0",)), PoolSpec("p", ("d0",))])
    with pytest.raises(InvalidArgument, match="min_bytes"):
        Broker([d0], [PoolSpec("p", ("d0",), min_bytes=128 * K)])
    with pytest.raises(InvalidArgument) as err:
        Broker([d0], [PoolSpec("p", ("d0",), eviction_policy="fifo")])
    assert err.value.field == "eviction_policy"
    with pytest.raises(InvalidArgument) as err:
        PoolSpec("p", ("d0",), block_bytes=3000)
    assert err.value.field == "pools.p.block_bytes"


# --- placement --------------------------------------------------------------------------


def test_first_allocation_creates_a_segment_and_rounds_to_blocks() -> None:
    b = make()
    r1 = alloc(b, 5000, model_name="llama", dtype="float16", shape=(2, 1250))
    c1 = r1.cache
    assert (c1.nbytes, c1.reserved_bytes) == (5000, 8 * K)
    assert r1.new_segment is not None and r1.new_segment.nbytes == 64 * K
    assert r1.new_segment.pool == "p" and r1.new_segment.device_id == "d0"
    assert c1.extents == (Extent(r1.new_segment.segment_id, 0, 8 * K),)
    assert (c1.model_name, c1.dtype, c1.shape, c1.state) == ("llama", "float16", (2, 1250), CacheState.PENDING)
    assert not r1.needs_zeroing and b.get(c1.cache_id).state is CacheState.RESIDENT
    assert c1.holders == frozenset({""}) and c1.pin_count == 0 and c1.epoch == 0
    r2 = alloc(b, 4 * K)
    assert r2.new_segment is None
    assert r2.cache.extents == (Extent(r1.new_segment.segment_id, 8 * K, 4 * K),)
    usage = pool_usage(b, "p")
    assert (usage.reserved_bytes, usage.allocated_bytes, usage.segments) == (64 * K, 12 * K, 1)


def test_segment_size_follows_alignment_and_big_caches_get_their_own_segment() -> None:
    b = make(
        pools=[PoolSpec("p", ("d0",), block_bytes=4 * K, segment_bytes=100 * K)],
        devices=[DeviceSpec("d0", 1024 * K, 64 * K)],
    )
    r1 = alloc(b, 4 * K)
    assert r1.new_segment.nbytes == 128 * K  # 100 KiB rounded up to the 64 KiB granule
    r2 = alloc(b, 200 * K)
    assert r2.new_segment.nbytes == 256 * K
    assert r2.cache.extents[0].offset == 0
    for seg in b.segments():
        assert seg.nbytes % (64 * K) == 0


def test_last_segment_is_cut_to_the_remaining_budget() -> None:
    b = make(pools=[PoolSpec("p", ("d0",), block_bytes=4 * K, segment_bytes=64 * K, max_bytes=96 * K)])
    alloc(b, 64 * K)
    r = alloc(b, 4 * K)
    assert r.new_segment.nbytes == 32 * K  # quota left, not the preferred 64 KiB
    assert pool_usage(b, "p").reserved_bytes == 96 * K


def test_new_segment_only_under_max_bytes() -> None:
    b = make(pools=[PoolSpec("p", ("d0",), block_bytes=4 * K, segment_bytes=64 * K, max_bytes=128 * K)])
    alloc(b, 64 * K, pinned=True)
    alloc(b, 64 * K, pinned=True)
    with pytest.raises(ResourceExhausted) as err:
        b.allocate(req(4 * K))
    assert err.value.requested_bytes == 4 * K
    assert err.value.free_bytes == 0 and err.value.largest_free_extent_bytes == 0
    assert err.value.satisfiable is True
    assert pool_usage(b, "p").reserved_bytes == 128 * K
    audit(b)


def test_max_bytes_is_never_exceeded_by_mixed_sizes() -> None:
    b = make(
        pools=[PoolSpec("p", ("d0",), block_bytes=4 * K, segment_bytes=48 * K, max_bytes=200 * K)],
        devices=[DeviceSpec("d0", 1024 * K, 8 * K)],
    )
    sizes = [5 * K, 40 * K, 1, 100 * K, 12 * K, 60 * K, 3 * K, 90 * K, 7 * K] * 4
    for i, n in enumerate(sizes):
        try:
            b.allocate(req(n, pinned=i % 3 == 0))
        except ResourceExhausted:
            pass
        audit(b)
        assert pool_usage(b, "p").reserved_bytes <= 200 * K
        assert sum(s.nbytes for s in b.segments()) <= 200 * K


def test_request_above_quota_is_never_satisfiable() -> None:
    b = make(pools=[PoolSpec("p", ("d0",), block_bytes=4 * K, max_bytes=64 * K)])
    with pytest.raises(ResourceExhausted) as err:
        b.allocate(req(65 * K))
    assert err.value.satisfiable is False
    assert err.value.requested_bytes == 68 * K
    assert b.segments() == []


def test_resource_exhausted_reports_free_bytes_and_largest_extent() -> None:
    b = make()  # 256 KiB device, 64 KiB segments
    for i in range(16):
        alloc(b, 16 * K, cache_id=f"c{i}", pinned=i % 2 == 0)
    for i in range(1, 16, 2):
        b.release(f"c{i}")
    # Every segment is [pinned 16K][free 16K][pinned 16K][free 16K]: 128 KiB free in
    # 16 KiB pieces, nothing movable, nothing evictable, no budget left.
    with pytest.raises(ResourceExhausted) as err:
        b.allocate(req(32 * K))
    e = err.value
    assert (e.requested_bytes, e.free_bytes, e.largest_free_extent_bytes) == (32 * K, 128 * K, 16 * K)
    assert e.satisfiable is True
    assert "32768" in str(e) and "131072" in str(e) and "16384" in str(e)
    audit(b)


def test_resource_exhausted_counts_a_shared_quota_once() -> None:
    b = make(
        pools=[PoolSpec("p", ("d0", "d1"), block_bytes=4 * K, segment_bytes=16 * K, max_bytes=64 * K)],
        devices=[DeviceSpec("d0", 256 * K), DeviceSpec("d1", 256 * K)],
    )
    alloc(b, 16 * K, pinned=True, device_hint="d0")
    alloc(b, 16 * K, pinned=True, device_hint="d1")
    with pytest.raises(ResourceExhausted) as err:
        b.allocate(req(48 * K))
    # 32 KiB of quota is left, whichever device takes it.
    assert err.value.free_bytes == 32 * K
    assert err.value.largest_free_extent_bytes == 32 * K
    assert err.value.satisfiable is True


def test_round_robin_placement_alternates_devices() -> None:
    b = make(
        pools=[PoolSpec("p", ("d0", "d1"), block_bytes=4 * K, segment_bytes=64 * K,
                        placement=Placement.ROUND_ROBIN)],
        devices=[DeviceSpec("d0", 256 * K), DeviceSpec("d1", 256 * K)],
    )
    got = [alloc(b, 4 * K).cache.device_id for _ in range(5)]
    assert got == ["d0", "d1", "d0", "d1", "d0"]


def test_round_robin_falls_over_to_the_next_device_when_one_is_full() -> None:
    b = make(
        pools=[PoolSpec("p", ("d0", "d1"), block_bytes=4 * K, segment_bytes=64 * K,
                        placement=Placement.ROUND_ROBIN)],
        devices=[DeviceSpec("d0", 64 * K), DeviceSpec("d1", 256 * K)],
    )
    assert alloc(b, 64 * K, pinned=True).cache.device_id == "d0"
    assert [alloc(b, 4 * K).cache.device_id for _ in range(3)] == ["d1", "d1", "d1"]


def test_least_loaded_placement_uses_the_least_utilized_device() -> None:
    b = make(
        pools=[PoolSpec("p", ("d0", "d1"), block_bytes=4 * K, segment_bytes=64 * K)],
        devices=[DeviceSpec("d0", 512 * K), DeviceSpec("d1", 256 * K)],
    )
    assert alloc(b, 64 * K).cache.device_id == "d0"  # tie: the pool's first device
    assert alloc(b, 32 * K).cache.device_id == "d1"  # d0 at 1/8, d1 at 0
    assert alloc(b, 4 * K).cache.device_id == "d0"  # both at 1/8: first device
    assert alloc(b, 4 * K).cache.device_id == "d1"  # d0 68/512 > d1 32/256


def test_device_hint_restricts_placement() -> None:
    b = make(
        pools=[PoolSpec("p", ("d0", "d1"), block_bytes=4 * K, segment_bytes=64 * K)],
        devices=[DeviceSpec("d0", 256 * K), DeviceSpec("d1", 64 * K)],
    )
    assert alloc(b, 4 * K, device_hint="d1").cache.device_id == "d1"
    alloc(b, 60 * K, device_hint="d1", pinned=True)
    with pytest.raises(ResourceExhausted):
        b.allocate(req(8 * K, device_hint="d1"))  # d0 has room, but the hint says d1
    assert alloc(b, 8 * K).cache.device_id == "d0"
    audit(b)


# --- validation -------------------------------------------------------------------------


@pytest.mark.parametrize("nbytes", [0, -1, -4096, True, 1.5, "4096", None])
def test_bad_size_names_size_bytes(nbytes) -> None:
    b = make()
    with pytest.raises(InvalidArgument) as err:
        b.allocate(req(nbytes))
    assert err.value.field == "size_bytes"


def test_size_above_every_device_is_exhausted_for_good() -> None:
    """Larger than any device the pool may use: RESOURCE_EXHAUSTED (what a worker's
    out-of-memory handling catches), never satisfiable so nobody waits for it."""
    b = make(
        pools=[PoolSpec("p", ("d0", "d1"))],
        devices=[DeviceSpec("d0", 256 * K), DeviceSpec("d1", 128 * K)],
    )
    with pytest.raises(ResourceExhausted) as err:
        b.allocate(req(256 * K + 1))
    assert err.value.satisfiable is False and "capacity of every device" in str(err.value)
    with pytest.raises(ResourceExhausted) as err:  # the hinted device is the only one
        b.allocate(req(200 * K, device_hint="d1"))
    assert err.value.satisfiable is False and "capacity of device 'd1'" in str(err.value)


def test_unknown_pool_is_not_found_and_empty_pool_is_invalid() -> None:
    b = make()
    with pytest.raises(NotFound, match="nope"):
        b.allocate(req(pool="nope"))
    with pytest.raises(InvalidArgument) as err:
        b.allocate(req(pool=""))
    assert err.value.field == "pool"


def test_device_hint_errors() -> None:
    b = make(
        pools=[PoolSpec("p", ("d0",))],
        devices=[DeviceSpec("d0", 256 * K), DeviceSpec("d1", 256 * K)],
    )
    with pytest.raises(NotFound, match="d9"):
        b.allocate(req(device_hint="d9"))
    with pytest.raises(InvalidArgument) as err:
        b.allocate(req(device_hint="d1"))  # exists, but the pool may not use it
    assert err.value.field == "device"


def test_duplicate_cache_id_already_exists() -> None:
    b = make()
    alloc(b, cache_id="kv-1")
    with pytest.raises(AlreadyExists, match="kv-1"):
        b.allocate(req(cache_id="kv-1"))
    # an evicted cache that is still held keeps its id
    evict(b, "kv-1")
    with pytest.raises(AlreadyExists):
        b.allocate(req(cache_id="kv-1"))


@pytest.mark.parametrize(
    "cache_id", ["x" * 129, "a\x00b", "a b", "caf\u00e9", ".hidden", "-dash", "tab\t", "new\nline"]
)
def test_bad_cache_id_names_cache_id(cache_id: str) -> None:
    b = make()
    with pytest.raises(InvalidArgument) as err:
        b.allocate(req(cache_id=cache_id))
    assert err.value.field == "cache_id"


def test_longest_valid_cache_id_is_accepted() -> None:
    b = make()
    assert alloc(b, cache_id="x" * 128).cache.cache_id == "x" * 128
    assert alloc(b, cache_id="A0._:/@+=-z").cache.cache_id == "A0._:/@+=-z"


@pytest.mark.parametrize("model_name", ["m" * 257, "bad\nname", "nul\x00", None, 7])
def test_bad_model_name(model_name) -> None:
    b = make()
    with pytest.raises(InvalidArgument) as err:
        b.allocate(req(model_name=model_name))
    assert err.value.field == "model_name"


@pytest.mark.parametrize("priority", [2**31, -(2**31) - 1, "1", 1.0, True])
def test_bad_priority(priority) -> None:
    b = make()
    with pytest.raises(InvalidArgument) as err:
        b.allocate(req(priority=priority))
    assert err.value.field == "priority"


def test_priority_range_edges_are_accepted() -> None:
    b = make()
    assert alloc(b, priority=2**31 - 1).cache.priority == 2**31 - 1
    assert alloc(b, priority=-(2**31)).cache.priority == -(2**31)
    assert alloc(b).cache.priority == 0  # the pool's


def test_bad_shape() -> None:
    b = make()
    with pytest.raises(InvalidArgument) as err:
        b.allocate(req(shape=(2, -1)))
    assert err.value.field == "shape"


def test_failed_validation_leaves_no_trace() -> None:
    b = make()
    for bad in (req(0), req(cache_id="a b"), req(priority=2**40), req(model_name="\x01"),
                req(pool="nope"), req(device_hint="zz"), req(10**9)):
        with pytest.raises((InvalidArgument, NotFound, ResourceExhausted)):
            b.allocate(bad)
    assert b.caches() == [] and b.segments() == []
    assert b.stats().allocation_count == 0
    audit(b)


def test_lookups_of_unknown_ids() -> None:
    b = make()
    for call in (b.get, b.attach, b.pin, b.unpin):
        with pytest.raises(NotFound):
            call("ghost")
    with pytest.raises(InvalidArgument) as err:
        b.get("")
    assert err.value.field == "cache_id"
    for call in (b.get, b.attach, b.pin, b.unpin, b.release):
        for bad in ("", "a b", "x" * 129, "nul\x00"):
            with pytest.raises(InvalidArgument) as err:
                call(bad)
            assert err.value.field == "cache_id"
    with pytest.raises(NotFound):
        b.segment(42)
    with pytest.raises(NotFound):
        b.caches(pool="nope")


# --- release, retain, force -------------------------------------------------------------


def test_release_frees_and_is_idempotent() -> None:
    b = make()
    c = alloc(b, 8 * K, cache_id="a").cache
    assert b.release("a") is True
    assert b.release("a") is False  # harmless
    assert b.release("a", "someone-else") is False
    with pytest.raises(NotFound):
        b.get("a")
    with pytest.raises(NotFound):
        b.attach("a")
    with pytest.raises(NotFound):
        b.release("never-existed")
    assert pool_usage(b, "p").allocated_bytes == 0
    # the freed extent is reused and the id may be used again
    c2 = alloc(b, 8 * K, cache_id="a").cache
    assert c2.extents == c.extents
    audit(b)


def test_cache_is_freed_only_when_its_last_holder_releases() -> None:
    b = make()
    alloc(b, cache_id="a", holder="s1")
    assert b.attach("a", "s2").holders == frozenset({"s1", "s2"})
    assert b.release("a", "s3") is False  # not a holder: nothing happens
    assert b.release("a", "s1") is False
    assert b.get("a").holders == frozenset({"s2"})
    assert b.release("a", "s2") is True
    with pytest.raises(NotFound):
        b.get("a")
    audit(b)


def test_retained_cache_outlives_its_holders() -> None:
    b = make()
    alloc(b, cache_id="r", holder="prefill", retain=True)
    assert b.release("r", "prefill") is False
    info = b.get("r")
    assert info.state is CacheState.RESIDENT and info.holders == frozenset()
    assert b.attach("r", "decode").holders == frozenset({"decode"})
    assert b.release("r", "decode") is False
    assert b.release("r", force=True) is True
    with pytest.raises(NotFound):
        b.get("r")
    audit(b)


def test_force_release_is_refused_while_another_holder_pins() -> None:
    b = make()
    alloc(b, cache_id="a", holder="s1")
    b.pin("a", "s2")
    with pytest.raises(FailedPrecondition, match="pinned"):
        b.release("a", "s1", force=True)
    assert b.get("a").holders == frozenset({"s1", "s2"})
    b.unpin("a", "s2")
    b.drain_events()
    assert b.release("a", "s1", force=True) is True
    (event,) = b.drain_events()
    assert event.kind is EventKind.EVICTED and event.recipients == frozenset({"s2"})
    assert event.cache_id == "a" and event.epoch == 1  # the epoch moves on
    audit(b)


def test_force_release_by_the_only_pinner_is_allowed() -> None:
    b = make()
    alloc(b, cache_id="a", holder="s1", pinned=True, retain=True)
    b.pin("a", "s1")
    assert b.release("a", "s1", force=True) is True
    assert b.drain_events() == []
    assert pool_usage(b, "p").pinned_bytes == 0
    audit(b)


def test_drop_holder_releases_everything_of_a_session() -> None:
    b = make()
    alloc(b, cache_id="own", holder="s1", pinned=True)
    alloc(b, cache_id="shared", holder="s1")
    b.attach("shared", "s2")
    alloc(b, cache_id="kept", holder="s1", retain=True)
    alloc(b, cache_id="other", holder="s2")
    b.pin("other", "s1")
    freed = b.drop_holder("s1")
    assert sorted(freed) == ["own"]
    assert b.get("shared").holders == frozenset({"s2"})
    assert b.get("kept").holders == frozenset() and b.get("kept").state is CacheState.RESIDENT
    assert b.get("other").pin_count == 0 and b.get("other").holders == frozenset({"s2"})
    audit(b)


# --- pins -------------------------------------------------------------------------------


def test_pins_are_counted_per_holder() -> None:
    b = make()
    alloc(b, 8 * K, cache_id="a", holder="s1", pinned=True)
    b.pin("a", "s1")
    assert b.pin("a", "s2").pin_count == 3
    assert b.get("a").holders == frozenset({"s1", "s2"})  # pinning makes a holder
    assert pool_usage(b, "p").pinned_bytes == 8 * K
    with pytest.raises(FailedPrecondition):
        b.unpin("a", "s3")
    assert b.unpin("a", "s1").pin_count == 2
    b.release("a", "s1")  # drops s1's last pin with its hold
    assert b.get("a").pin_count == 1
    assert b.unpin("a", "s2").pin_count == 0
    with pytest.raises(FailedPrecondition):
        b.unpin("a", "s2")
    assert pool_usage(b, "p").pinned_bytes == 0
    evict(b, "a")
    audit(b)


# --- eviction and events ----------------------------------------------------------------


def test_evicted_cache_keeps_its_record_for_holders() -> None:
    b = make()
    alloc(b, cache_id="a", holder="s1")
    b.attach("a", "s2")
    b.drain_events()
    evict(b, "a")
    info = b.get("a")
    assert info.state is CacheState.EVICTED and info.extents == () and info.epoch == 1
    (event,) = b.drain_events()
    assert (event.kind, event.cache_id, event.epoch) == (EventKind.EVICTED, "a", 1)
    assert event.recipients == frozenset({"s1", "s2"})
    assert b.drain_events() == []
    for call in (b.attach, b.pin):
        with pytest.raises(FailedPrecondition, match="evicted"):
            call("a")
    assert b.get("a").state is CacheState.EVICTED
    assert b.caches(state=CacheState.EVICTED)[0].cache_id == "a"
    assert b.release("a", "s1") is False
    assert b.release("a", "s2") is False  # record gone now, but nothing was resident
    with pytest.raises(FailedPrecondition, match="evicted"):
        b.attach("a", "s3")  # the tombstone remembers why
    assert b.release("a", "s3") is False
    assert pool_usage(b, "p").allocated_bytes == 0
    assert b.stats().eviction_count == 1
    audit(b)


def test_evicting_an_unheld_retained_cache_raises_no_event() -> None:
    b = make()
    alloc(b, cache_id="r", retain=True)
    b.release("r")
    evict(b, "r")
    assert b.drain_events() == []
    with pytest.raises(FailedPrecondition):
        b.attach("r")
    audit(b)


def _four_full_segments(pool_priority: int = 0, cache_priority: int | None = None, **pool_kw) -> Broker:
    """A 256 KiB device, 64 KiB segments, four 64 KiB caches a..d, one per segment."""
    b = make(pools=[PoolSpec("p", ("d0",), block_bytes=4 * K, segment_bytes=64 * K,
                             priority=pool_priority, **pool_kw)])
    for name in "abcd":
        alloc(b, 64 * K, cache_id=name, holder="s1", priority=cache_priority)
    b.drain_events()
    return b


def test_pressure_evicts_by_lru_and_tells_holders() -> None:
    b = _four_full_segments()
    b.attach("a", "s1")  # a use
    b.attach("c", "s2")
    r = alloc(b, 64 * K, cache_id="e")
    assert r.evicted == ("b",)
    assert r.cache.extents[0].segment_id == extent(b, "a").segment_id + 1
    assert b.get("b").state is CacheState.EVICTED
    (event,) = b.drain_events()
    assert (event.kind, event.cache_id, event.recipients) == (EventKind.EVICTED, "b", frozenset({"s1"}))
    alloc(b, 64 * K, cache_id="f")  # then d (c was used when s2 attached it)
    assert b.get("d").state is CacheState.EVICTED
    assert b.get("c").state is CacheState.RESIDENT


def test_lfu_pool_evicts_the_least_frequently_used() -> None:
    b = _four_full_segments(eviction_policy="lfu")
    for name, uses in (("a", 3), ("b", 1), ("c", 0), ("d", 2)):
        for _ in range(uses):
            b.attach(name, "s1")
    assert alloc(b, 64 * K).evicted == ("c",)


def test_idle_retained_caches_are_reclaimed_first() -> None:
    b = _four_full_segments()
    b.release("d", "s1")  # d was never retained: freed at once
    alloc(b, 64 * K, cache_id="r", retain=True, holder="s1")
    b.release("r", "s1")  # idle, retained, and the most recently used of all
    r = alloc(b, 64 * K)
    assert r.evicted == ("r",)
    assert all(b.get(n).state is CacheState.RESIDENT for n in "abc")


def test_pinned_caches_are_never_evicted() -> None:
    b = _four_full_segments()
    for name in "abcd":
        b.pin(name, "s1")
    with pytest.raises(ResourceExhausted) as err:
        b.allocate(req(4 * K))
    assert err.value.satisfiable is True
    assert all(b.get(n).state is CacheState.RESIDENT for n in "abcd")
    b.unpin("c", "s1")
    assert alloc(b, 4 * K).evicted == ("c",)


def test_eviction_takes_only_equal_or_lower_priority() -> None:
    b = _four_full_segments(cache_priority=5)
    with pytest.raises(ResourceExhausted):
        b.allocate(req(64 * K, priority=4))
    assert all(b.get(n).state is CacheState.RESIDENT for n in "abcd")
    assert b.drain_events() == []
    assert alloc(b, 64 * K, priority=5).evicted == ("a",)
    assert alloc(b, 64 * K, priority=9).evicted == ("b",)


def test_allow_eviction_false_refuses_instead() -> None:
    b = _four_full_segments()
    with pytest.raises(ResourceExhausted):
        b.allocate(req(4 * K), allow_eviction=False)
    assert all(b.get(n).state is CacheState.RESIDENT for n in "abcd")


def test_retiring_own_empty_segments_makes_room_for_a_bigger_one() -> None:
    b = make(pools=[PoolSpec("p", ("d0",), block_bytes=4 * K, segment_bytes=32 * K, max_bytes=128 * K)])
    for i in range(4):
        alloc(b, 32 * K, cache_id=f"c{i}")
    for i in range(4):
        b.release(f"c{i}")
    assert len(b.segments()) == 4  # empty, but still reserved
    r = alloc(b, 64 * K)
    assert len(r.retired_segments) == 2
    assert r.new_segment is not None and r.new_segment.nbytes == 64 * K
    assert r.evicted == ()
    assert pool_usage(b, "p").reserved_bytes == 128 * K


# --- compaction -------------------------------------------------------------------------


def _fragmented(pin_b: bool = False) -> Broker:
    """One 64 KiB segment: [free 16K][b 16K][free 16K][d 16K]."""
    b = make(
        pools=[PoolSpec("p", ("d0",), block_bytes=4 * K, segment_bytes=64 * K)],
        devices=[DeviceSpec("d0", 64 * K)],
    )
    for name in "abcd":
        alloc(b, 16 * K, cache_id=name, holder="s1", pinned=name == "b" and pin_b)
    b.release("a", "s1")
    b.release("c", "s1")
    b.drain_events()
    return b


def test_fragmented_free_space_yields_a_compaction_plan() -> None:
    """The pressure path opens one extent with the fewest bytes moved: b (16K) goes to
    the hole at 32K, which opens [0, 32K); the full pack would move b and d (32K)."""
    b = _fragmented()
    before = b.caches()
    r = b.allocate(req(32 * K, cache_id="big"))
    assert r.cache is None and r.evicted == ()
    plan = r.compaction
    assert [(m.cache_id, m.source.offset, m.destination.offset) for m in plan.moves] == [("b", 16 * K, 32 * K)]
    assert plan.fragmentation_before == pytest.approx(0.5) and plan.fragmentation_after == 0.0
    assert plan.largest_free_extent_after == 32 * K
    assert (plan.bytes_moved, plan.caches_moved) == (16 * K, 1)
    assert b.plan_compaction().bytes_moved == 32 * K  # the full pack, for comparison
    assert b.caches() == before  # planning changed nothing
    assert b.commit(plan) == ()
    assert extent(b, "b").offset == 32 * K and extent(b, "d").offset == 48 * K
    assert b.get("b").epoch == 1 and b.get("d").epoch == 0
    events = b.drain_events()
    assert [(e.kind, e.cache_id, e.epoch, e.recipients) for e in events] == [
        (EventKind.MOVED, "b", 1, frozenset({"s1"})),
    ]
    audit(b)
    r = alloc(b, 32 * K, cache_id="big")
    assert r.cache.extents[0].offset == 0


def test_full_pack_on_the_pressure_path_when_targeted_compaction_is_off() -> None:
    b = _fragmented()
    b._ledger.targeted_compaction = False  # what Broker(targeted_compaction=False) sets
    plan = b.allocate(req(32 * K, cache_id="big")).compaction
    assert [(m.cache_id, m.source.offset, m.destination.offset) for m in plan.moves] == [
        ("b", 16 * K, 0), ("d", 48 * K, 16 * K)
    ]
    assert (plan.bytes_moved, plan.largest_free_extent_after) == (32 * K, 32 * K)
    b.commit(plan)
    audit(b)
    assert alloc(b, 32 * K, cache_id="big").cache.extents[0].offset == 32 * K


def test_compaction_never_moves_a_pinned_cache() -> None:
    b = _fragmented(pin_b=True)
    r = b.allocate(req(32 * K))
    assert [m.cache_id for m in r.compaction.moves] == ["d"]
    b.commit(r.compaction)
    assert extent(b, "b").offset == 16 * K and extent(b, "d").offset == 0
    assert place(b, 32 * K).cache.extents[0].offset == 32 * K
    assert extent(b, "b").offset == 16 * K


def test_without_compaction_the_ladder_evicts() -> None:
    b = _fragmented()
    r = b.allocate(req(32 * K), allow_compaction=False)
    assert r.cache is not None and r.evicted == ("b",)
    audit(b)


def test_stale_plan_is_refused() -> None:
    b = _fragmented()
    plan = b.plan_compaction()
    assert b.plan_compaction() == plan  # pure
    b.pin("d", "s2")  # a pinned cache may not move: the plan no longer holds
    with pytest.raises(FailedPrecondition, match="stale"):
        b.commit(plan)
    b.unpin("d", "s2")
    assert extent(b, "d").offset == 48 * K
    plan = b.plan_compaction()
    b.commit(plan)
    with pytest.raises(FailedPrecondition):
        b.commit(plan)  # twice is stale too
    audit(b)


def test_plan_compaction_scopes_and_errors() -> None:
    b = make(
        pools=[PoolSpec("p", ("d0", "d1"), block_bytes=4 * K, segment_bytes=64 * K),
               PoolSpec("q", ("d0",), block_bytes=4 * K, segment_bytes=64 * K)],
        devices=[DeviceSpec("d0", 256 * K), DeviceSpec("d1", 256 * K)],
    )
    for name, pool, dev in (("p0", "p", "d0"), ("p1", "p", "d0"), ("p2", "p", "d1"),
                            ("p3", "p", "d1"), ("q0", "q", "d0"), ("q1", "q", "d0")):
        alloc(b, 8 * K, cache_id=name, pool=pool, device_hint=dev)
    for name in ("p0", "p2", "q0"):
        b.release(name)
    moved = lambda plan: sorted(m.cache_id for m in plan.moves)  # noqa: E731
    assert moved(b.plan_compaction()) == ["p1", "p3", "q1"]
    assert moved(b.plan_compaction(pool="p")) == ["p1", "p3"]
    assert moved(b.plan_compaction(device="d0")) == ["p1", "q1"]
    assert moved(b.plan_compaction(device="d1", pool="p")) == ["p3"]
    assert moved(b.plan_compaction(device="d1", pool="q")) == []
    with pytest.raises(NotFound):
        b.plan_compaction(pool="nope")
    with pytest.raises(NotFound):
        b.plan_compaction(device="d9")


def test_commit_retires_emptied_segments() -> None:
    b = make()
    alloc(b, 32 * K, cache_id="x", holder="s1")
    alloc(b, 32 * K, cache_id="y", holder="s1")
    alloc(b, 16 * K, cache_id="z", holder="s1")
    seg1, seg2 = extent(b, "x").segment_id, extent(b, "z").segment_id
    assert seg1 != seg2
    b.release("x", "s1")
    plan = b.plan_compaction()
    assert plan.segments_emptied == (seg2,)
    retired = b.commit(plan)
    assert [s.segment_id for s in retired] == [seg2]
    assert [s.segment_id for s in b.segments()] == [seg1]
    assert extent(b, "y") == Extent(seg1, 0, 32 * K) and extent(b, "z") == Extent(seg1, 32 * K, 16 * K)
    assert sorted(e.cache_id for e in b.drain_events()) == ["y", "z"]
    assert device_usage(b, "d0").reserved_bytes == 64 * K
    audit(b)


def test_defragment_after_releases_does_not_copy_into_an_empty_segment() -> None:
    b = make()
    alloc(b, 64 * K, cache_id="a")
    alloc(b, 32 * K, cache_id="b")
    alloc(b, 32 * K, cache_id="c")
    b.release("a")  # segment 1 is empty now; segment 2 is full
    assert b.plan_compaction().moves == ()


# --- taking segments from other pools ---------------------------------------------------


def _two_pools(a_min: int, *, a_kw: dict | None = None) -> Broker:
    b = make(
        pools=[
            PoolSpec("a", ("d0",), min_bytes=a_min, block_bytes=4 * K, segment_bytes=8 * K,
                     priority=0, **(a_kw or {})),
            PoolSpec("b", ("d0",), block_bytes=4 * K, segment_bytes=8 * K, priority=5),
        ],
        devices=[DeviceSpec("d0", 64 * K)],
    )
    for i in range(8):
        alloc(b, 8 * K, pool="a", cache_id=f"a{i}", holder="sa")
    b.drain_events()
    return b


def test_segments_are_taken_from_other_pools_down_to_their_min_bytes() -> None:
    b = _two_pools(16 * K)
    # a holds 64 KiB and must keep 16 KiB: 48 KiB can be had, 56 KiB cannot.
    with pytest.raises(ResourceExhausted):
        b.allocate(req(56 * K, pool="b"))
    assert len(b.caches(pool="a", state=CacheState.RESIDENT)) == 8  # nothing destroyed
    assert pool_usage(b, "a").reserved_bytes == 64 * K
    assert b.drain_events() == []
    r = alloc(b, 48 * K, pool="b")
    assert len(r.retired_segments) == 6 and {s.pool for s in r.retired_segments} == {"a"}
    assert len(r.evicted) == 6
    assert pool_usage(b, "a").reserved_bytes == 16 * K
    events = b.drain_events()
    assert {e.cache_id for e in events} == set(r.evicted)
    assert all(e.kind is EventKind.EVICTED and e.recipients == frozenset({"sa"}) for e in events)
    audit(b)


def test_a_failed_take_destroys_nothing_and_loses_no_segment() -> None:
    b = _two_pools(0)
    for i in range(6):
        b.pin(f"a{i}", "sa")
    segments = {s.segment_id for s in b.segments()}
    with pytest.raises(ResourceExhausted):
        b.allocate(req(32 * K, pool="b"))  # only 16 KiB are unpinned
    assert {s.segment_id for s in b.segments()} == segments
    assert all(c.state is CacheState.RESIDENT for c in b.caches(pool="a"))
    assert b.drain_events() == []
    audit(b)


def test_higher_priority_caches_of_other_pools_are_not_taken() -> None:
    b = make(
        pools=[
            PoolSpec("a", ("d0",), block_bytes=4 * K, segment_bytes=8 * K, priority=9),
            PoolSpec("b", ("d0",), block_bytes=4 * K, segment_bytes=8 * K, priority=5),
        ],
        devices=[DeviceSpec("d0", 64 * K)],
    )
    for i in range(8):
        alloc(b, 8 * K, pool="a")
    with pytest.raises(ResourceExhausted):
        b.allocate(req(8 * K, pool="b"))
    assert alloc(b, 8 * K, pool="b", priority=9).evicted != ()


def test_empty_segments_of_other_pools_go_first() -> None:
    b = _two_pools(0)
    for i in (2, 5):
        b.release(f"a{i}", "sa")
    r = alloc(b, 16 * K, pool="b")
    assert r.evicted == ()
    assert len(r.retired_segments) == 2
    assert len(b.caches(pool="a")) == 6


# --- stats ------------------------------------------------------------------------------


def test_stats_figures_per_device_and_pool() -> None:
    b = make(
        pools=[PoolSpec("p", ("d0",), block_bytes=4 * K, segment_bytes=64 * K),
               PoolSpec("q", ("d1",), block_bytes=4 * K, segment_bytes=32 * K, max_bytes=128 * K)],
        devices=[DeviceSpec("d0", 256 * K), DeviceSpec("d1", 256 * K)],
    )
    for name in "abc":
        alloc(b, 16 * K, cache_id=name)
    b.release("b")
    b.pin("c")
    alloc(b, 32 * K, pool="q")
    s = b.stats()
    d0 = device_usage(b, "d0")
    assert d0.capacity_bytes == 256 * K
    assert (d0.reserved_bytes, d0.allocated_bytes, d0.pinned_bytes) == (64 * K, 32 * K, 16 * K)
    assert d0.free_bytes == 224 * K
    assert d0.largest_free_extent_bytes == 192 * K  # the unreserved budget
    assert d0.fragmentation_ratio == pytest.approx(0.5)  # 32 KiB free inside, in 16 KiB pieces
    assert d0.utilization_ratio == pytest.approx(32 / 256)
    assert (d0.active_caches, d0.segments) == (2, 1)
    p = pool_usage(b, "p")
    assert p.capacity_bytes == 256 * K and p.fragmentation_ratio == pytest.approx(0.5)
    assert p.utilization_ratio == pytest.approx(32 / 256)
    q = pool_usage(b, "q")
    assert (q.capacity_bytes, q.reserved_bytes, q.allocated_bytes) == (128 * K, 32 * K, 32 * K)
    assert q.fragmentation_ratio == 0.0 and q.utilization_ratio == pytest.approx(0.25)
    assert q.largest_free_extent_bytes == 96 * K
    d1 = device_usage(b, "d1")
    assert d1.fragmentation_ratio == 0.0 and d1.largest_free_extent_bytes == 224 * K
    qs = next(x for x in s.pools if x.pool == "q")
    assert (qs.max_bytes, qs.min_bytes, qs.eviction_policy, qs.allocation_count) == (128 * K, 0, "lru", 1)
    assert s.total.capacity_bytes == 512 * K
    assert s.total.allocated_bytes == 64 * K and s.total.reserved_bytes == 96 * K
    assert s.total.utilization_ratio == pytest.approx(64 / 512)
    assert s.allocation_count == 4 and s.eviction_count == 0
    evict(b, "a")
    s = b.stats()
    assert s.eviction_count == 1
    assert next(x for x in s.devices if x.device_id == "d0").eviction_count == 1
    assert next(x for x in s.pools if x.pool == "p").eviction_count == 1


def test_empty_broker_stats() -> None:
    s = make().stats()
    assert s.total.allocated_bytes == 0 and s.total.fragmentation_ratio == 0.0
    assert s.total.utilization_ratio == 0.0 and s.total.segments == 0


# --- segments: abort, idle retirement ---------------------------------------------------


def test_abort_allocation_undoes_a_new_segment() -> None:
    b = make()
    r = b.allocate(req(8 * K, cache_id="a", pinned=True))
    assert b.abort_allocation(r) == ()  # the backend cleans up its own failed create
    assert b.segments() == [] and b.caches() == []
    with pytest.raises(NotFound):
        b.release("a")
    assert pool_usage(b, "p").pinned_bytes == 0 and pool_usage(b, "p").reserved_bytes == 0
    audit(b)
    r2 = alloc(b, 8 * K, cache_id="a")
    assert r2.new_segment is not None
    r3 = b.allocate(req(8 * K))  # in the existing segment: aborting frees only the extent
    assert r3.new_segment is None and b.abort_allocation(r3) == ()
    assert [c.cache_id for c in b.caches()] == ["a"] and len(b.segments()) == 1
    with pytest.raises(RuntimeError):
        b.abort_allocation(r2)  # ready already: not pending
    audit(b)


def test_retire_idle_segments_after_the_idle_time() -> None:
    clock = Clock()
    b = make(clock=clock)
    alloc(b, 64 * K, cache_id="a")
    alloc(b, 64 * K, cache_id="b")
    b.release("a")
    clock.now += 5
    assert b.retire_idle_segments(10) == []
    clock.now += 5
    (retired,) = b.retire_idle_segments(10)
    assert retired.segment_id == b.segment(extent(b, "b").segment_id).segment_id - 1
    assert len(b.segments()) == 1
    audit(b)


def test_generated_ids_are_unique_and_valid() -> None:
    b = make()
    ids = {alloc(b, 4 * K).cache.cache_id for _ in range(20)}
    assert len(ids) == 20
    assert all(i.startswith("c-") for i in ids)


def test_caches_listing_filters() -> None:
    b = make(pools=[PoolSpec("p", ("d0",), block_bytes=4 * K, segment_bytes=64 * K),
                    PoolSpec("q", ("d0",), block_bytes=4 * K, segment_bytes=64 * K)])
    alloc(b, cache_id="x", model_name="m1", holder="s")
    alloc(b, cache_id="y", model_name="m2", pool="q")
    alloc(b, cache_id="w", model_name="m1", pool="q", holder="s")
    evict(b, "w")
    assert [c.cache_id for c in b.caches()] == ["w", "x", "y"]
    assert [c.cache_id for c in b.caches(pool="q")] == ["w", "y"]
    assert [c.cache_id for c in b.caches(model_name="m1")] == ["w", "x"]
    assert [c.cache_id for c in b.caches(state=CacheState.RESIDENT)] == ["x", "y"]


def test_a_first_segment_may_claim_the_whole_device_budget() -> None:
    # Documents current behaviour: a segment is cut to the room left, so one pool's
    # first tiny cache can reserve the whole device, and another pool's first request
    # then takes that segment back (evicting the cache) when priorities allow.
    b = make(pools=[PoolSpec("p", ("d0",), block_bytes=4 * K), PoolSpec("q", ("d0",), block_bytes=4 * K)])
    r = alloc(b, cache_id="x")
    assert r.new_segment.nbytes == 256 * K
    r = alloc(b, pool="q")
    assert r.evicted == ("x",)


def test_ladder_knows_the_minimum_segment_size() -> None:
    # 16 KiB of budget are left, but no segment may be smaller than 32 KiB: the ladder
    # must not stop at "a segment can be made", and must take pool a's segment instead.
    b = make(
        pools=[PoolSpec("a", ("d0",), block_bytes=4 * K, segment_bytes=8 * K, priority=0),
               PoolSpec("b", ("d0",), block_bytes=4 * K, segment_bytes=8 * K, priority=5)],
        devices=[DeviceSpec("d0", 48 * K, 4 * K, min_segment_bytes=32 * K)],
    )
    assert alloc(b, 8 * K, pool="a", cache_id="a0").new_segment.nbytes == 32 * K
    with pytest.raises(ResourceExhausted) as err:
        b.allocate(req(8 * K, pool="b", priority=-1))  # may not take a0 (priority 0)
    assert err.value.free_bytes == 0 and err.value.largest_free_extent_bytes == 0
    r = alloc(b, 8 * K, pool="b", priority=5)
    assert r.evicted == ("a0",) and [s.pool for s in r.retired_segments] == ["a"]
    assert r.new_segment.nbytes == 32 * K


def test_a_request_that_cannot_succeed_evicts_nothing() -> None:
    # One 64 KiB segment: 32 KiB pinned, 32 KiB in evictable caches. A 48 KiB request
    # could only fit by evicting the pinned cache, so no cache is sacrificed for it.
    b = make(
        devices=[DeviceSpec("d0", 64 * K, 4 * K)],
        pools=[PoolSpec("p", ("d0",), block_bytes=4 * K, segment_bytes=64 * K)],
    )
    alloc(b, 32 * K, cache_id="pinned", pinned=True)
    for i in range(4):
        alloc(b, 8 * K, cache_id=f"victim-{i}")
    with pytest.raises(ResourceExhausted):
        b.allocate(req(48 * K))
    assert {c.cache_id for c in b.caches()} == {"pinned", "victim-0", "victim-1", "victim-2", "victim-3"}
    assert b.stats().eviction_count == 0
    # A 16 KiB request can succeed by eviction, and evicts only what it needs.
    place(b, 16 * K, cache_id="new")
    assert b.stats().eviction_count == 2
    audit(b)


def test_defragment_figures_tell_what_compaction_fixes_from_what_it_cannot() -> None:
    """Issue 10.5: on a device a plan said "fragmentation 40% -> 40%" while the same plan
    on the pool said "50% -> 0%". The device's free space is split across two pools'
    segments, which no move merges; the figures now say so apart."""
    b = make(
        pools=[PoolSpec("p", ("d0",), block_bytes=4 * K, segment_bytes=64 * K),
               PoolSpec("q", ("d0",), block_bytes=4 * K, segment_bytes=64 * K)],
        devices=[DeviceSpec("d0", 256 * K)],
    )
    for name in "abcd":
        alloc(b, 16 * K, cache_id=name, holder="s1")
    alloc(b, 16 * K, pool="q", cache_id="q1", holder="s1")  # q's segment: 48 KiB free at its end
    b.release("a", "s1")
    b.release("c", "s1")  # p's segment: two 16 KiB holes
    device, pool = b.plan_compaction(device="d0"), b.plan_compaction(pool="p")
    assert device.moves == pool.moves and device.caches_moved == 2
    # The classic figure cannot tell: 1 - 48/80 before and after on the device.
    assert device.fragmentation_before == device.fragmentation_after == pytest.approx(0.4)
    assert (device.before.free_bytes, device.before.largest_free_extent) == (80 * K, 48 * K)
    assert (device.before.within_segments, device.before.across_segments) == (pytest.approx(0.2), pytest.approx(0.2))
    assert (device.after.within_segments, device.after.across_segments) == (0.0, pytest.approx(0.4))
    assert (pool.before.within_segments, pool.after.within_segments, pool.after.across_segments) == (0.5, 0.0, 0.0)
    b.commit(device)
    usage = next(d.usage for d in b.stats().devices)
    assert usage.fragmentation_ratio == pytest.approx(0.4)
    assert (usage.fragmentation_within_segments_ratio, usage.fragmentation_across_segments_ratio) == (
        0.0, pytest.approx(0.4)), "what is left no compaction can fix"
    assert b.plan_compaction(device="d0").moves == ()
