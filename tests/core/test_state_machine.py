"""The broker driven as a state machine against a model, with a byte-level replay.

A ``RuleBasedStateMachine`` runs a few pools (different policies, minimums and quotas) on
two devices through allocate (with compaction results replayed and committed, and some
backend failures aborted), release (with force), attach, pin, unpin, evict, compaction,
idle retirement, session drops and event draining. The model tracks every record's
holders, pins, state and epoch, and every event the broker owes its holders. After every
step it checks the accounting (``audit`` and independent sums), that extents never
overlap, that quotas and minimums hold, that pinned caches never move or vanish, and,
with a ``bytearray`` per segment into which every new cache writes a unique pattern and
every plan's moves are copied with memmove semantics, that no cache's bytes ever change.
"""

from __future__ import annotations

import struct
from collections import Counter
from collections.abc import Callable

from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from kvbroker.core import (
    AllocationRequest,
    Broker,
    CacheState,
    CompactionPlan,
    DeviceSpec,
    EventKind,
    Extent,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Placement,
    PoolSpec,
    ResourceExhausted,
    SegmentInfo,
)
from kvbroker.core.audit import audit

K = 1024

DEVICES = (
    DeviceSpec("d0", 192 * K, 4 * K),
    DeviceSpec("d1", 128 * K, 16 * K, min_segment_bytes=32 * K),
)
POOLS = (
    PoolSpec("a", ("d0", "d1"), min_bytes=48 * K, max_bytes=192 * K, priority=0,
             eviction_policy="lru", block_bytes=4 * K, segment_bytes=32 * K),
    PoolSpec("b", ("d1", "d0"), max_bytes=112 * K, priority=1, eviction_policy="size_aware_lru",
             block_bytes=8 * K, segment_bytes=48 * K, placement=Placement.ROUND_ROBIN),
    PoolSpec("c", ("d1",), min_bytes=32 * K, priority=2, eviction_policy="lfu",
             block_bytes=4 * K, segment_bytes=16 * K),
    PoolSpec("e", ("d0",), max_bytes=96 * K, priority=0, eviction_policy="adaptive",
             block_bytes=16 * K, segment_bytes=48 * K),
)
SPEC = {p.name: p for p in POOLS}
CAPACITY = {d.device_id: d.capacity_bytes for d in DEVICES}
ALIGN = {d.device_id: d.segment_alignment_bytes for d in DEVICES}
MIN_SEGMENT = {d.device_id: d.min_segment_bytes for d in DEVICES}
HOLDERS = ("", "s1", "s2")

sizes = st.one_of(
    st.integers(1, 24 * K),
    st.integers(1, 96 * K),
    st.sampled_from([4 * K, 16 * K, 32 * K, 48 * K, 64 * K, 128 * K, 200 * K]),
)
small_sizes = st.integers(1, 16 * K)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


class Record:
    __slots__ = ("holders", "retain", "state", "priority", "epoch", "pool")

    def __init__(self, holder: str, retain: bool, priority: int, pool: str) -> None:
        self.holders = {holder}
        self.retain = retain
        self.state = "resident"
        self.priority = priority
        self.epoch = 0
        self.pool = pool


class BrokerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.b = Broker(DEVICES, POOLS, clock=Clock())
        self.mem: dict[int, bytearray] = {}
        self.segment_pool: dict[int, SegmentInfo] = {}
        self.pattern: dict[str, bytes] = {}  # resident caches
        self.where: dict[str, Extent] = {}  # resident caches
        self.records: dict[str, Record] = {}
        self.tomb: dict[str, str] = {}  # id -> "released" | "evicted" | "aborted"
        self.pins: Counter[tuple[str, str]] = Counter()
        self.pinned_at: dict[str, Extent] = {}
        self.ids: list[str] = []
        self.serial = 0
        self.expected_events: list[tuple] = []
        self.reserved_before: dict[str, int] = {}
        self.shrink_ok: set[str] = set()

    # -- helpers ----------------------------------------------------------------------

    def pin_count(self, cid: str) -> int:
        return sum(n for (c, _), n in self.pins.items() if c == cid)

    def pick(self, index: int) -> str:
        if not self.ids or index % 7 == 6:
            return f"never-{index}"
        return self.ids[index % len(self.ids)]

    def _pool_reserved(self) -> dict[str, int]:
        return {p.pool: p.usage.reserved_bytes for p in self.b.stats().pools}

    def _begin(self, shrink_ok: set[str]) -> None:
        self.reserved_before = self._pool_reserved()
        self.shrink_ok = shrink_ok

    def _event(self, kind: EventKind, cid: str, epoch: int, holders: set[str]) -> None:
        if holders:
            self.expected_events.append((kind.value, cid, epoch, tuple(sorted(holders))))

    def _retired(self, segments) -> None:
        for info in segments:
            assert info.segment_id in self.mem, f"retired unknown segment {info.segment_id}"
            for cid, ext in self.where.items():
                assert ext.segment_id != info.segment_id, f"{cid} lives in retired segment"
            del self.mem[info.segment_id]
            del self.segment_pool[info.segment_id]

    def _new_segment(self, info: SegmentInfo, pool: str) -> None:
        assert info.segment_id not in self.mem
        assert info.pool == pool and info.device_id in SPEC[pool].devices
        granule = max(ALIGN[info.device_id], SPEC[pool].block_bytes)
        assert info.nbytes > 0 and info.nbytes % granule == 0
        assert info.nbytes >= MIN_SEGMENT[info.device_id]
        self.mem[info.segment_id] = bytearray(info.nbytes)  # zero-filled, as a backend's
        self.segment_pool[info.segment_id] = info

    def _evicted_in_model(self, cid: str) -> None:
        """The broker evicted ``cid`` (found by _settle): update the model."""
        rec = self.records[cid]
        assert self.pin_count(cid) == 0, f"pinned cache {cid} was evicted"
        del self.pattern[cid], self.where[cid]
        rec.epoch += 1
        self._event(EventKind.EVICTED, cid, rec.epoch, rec.holders)
        if rec.holders:
            rec.state = "evicted"
        else:
            del self.records[cid]
            self.tomb[cid] = "evicted"

    def _learn_evictions(self, may_vanish: Callable[[str], bool]) -> None:
        """Caches of the model that are no longer resident were evicted by the broker;
        ``may_vanish`` says which ones the step was allowed to evict."""
        resident = {c.cache_id for c in self.b.caches(state=CacheState.RESIDENT)}
        for cid in list(self.pattern):
            if cid not in resident:
                assert may_vanish(cid), f"{cid} vanished unexpectedly"
                self._evicted_in_model(cid)

    def _settle(self, may_vanish: Callable[[str], bool] = lambda cid: False) -> None:
        """Compare the broker with the model after a step; learn evictions."""
        self._learn_evictions(may_vanish)
        resident = {c.cache_id for c in self.b.caches(state=CacheState.RESIDENT)}
        assert resident == set(self.pattern), "a cache appeared that the model lacks"
        for cid, rec in self.records.items():
            info = self.b.get(cid)
            assert info.state.value == rec.state, cid
            assert set(info.holders) == rec.holders, (cid, info.holders, rec.holders)
            assert info.pin_count == self.pin_count(cid), cid
            assert info.epoch == rec.epoch, (cid, info.epoch, rec.epoch)
            assert info.retain == rec.retain and info.priority == rec.priority
            if rec.state == "resident":
                assert info.extents == (self.where[cid],), f"{cid} moved without a plan"
            else:
                assert info.extents == ()
        after = self._pool_reserved()
        for name, before in self.reserved_before.items():
            now, floor = after[name], SPEC[name].min_bytes
            if now < before and now < floor:
                assert name in self.shrink_ok, f"pool {name} taken below min_bytes ({now} < {floor})"
        self.reserved_before = after

    def _apply_plan(self, plan: CompactionPlan) -> None:
        """What a backend does: copy every move's bytes, in order, memmove-style."""
        for move in plan.moves:
            cid = move.cache_id
            assert self.pin_count(cid) == 0, f"plan moves pinned cache {cid}"
            assert self.where[cid] == move.source, (cid, self.where[cid], move.source)
            assert move.source.nbytes == move.destination.nbytes
            src, dst = move.source, move.destination
            assert self.segment_pool[src.segment_id].pool == self.segment_pool[dst.segment_id].pool
            assert self.segment_pool[src.segment_id].device_id == self.segment_pool[dst.segment_id].device_id
            assert dst.offset + dst.nbytes <= len(self.mem[dst.segment_id])
            chunk = bytes(self.mem[src.segment_id][src.offset:src.offset + src.nbytes])
            self.mem[dst.segment_id][dst.offset:dst.offset + dst.nbytes] = chunk
            self.where[cid] = dst
            rec = self.records[cid]
            rec.epoch += 1
            self._event(EventKind.MOVED, cid, rec.epoch, rec.holders)

    def _commit(self, plan: CompactionPlan) -> None:
        self._apply_plan(plan)
        retired = self.b.commit(plan)
        assert {s.segment_id for s in retired} == set(plan.segments_emptied)
        self._retired(retired)
        self.check_bytes()

    def _release_model(self, cid: str, holder: str, force: bool) -> bool:
        """Apply a successful release to the model; return what release must return."""
        rec = self.records[cid]
        self.pins.pop((cid, holder), None)
        if self.pin_count(cid) == 0:
            self.pinned_at.pop(cid, None)
        rec.holders.discard(holder)
        if force and rec.holders and rec.state == "resident":
            rec.epoch += 1
            self._event(EventKind.EVICTED, cid, rec.epoch, rec.holders)
            rec.holders.clear()
        if rec.holders or (rec.retain and not force and rec.state == "resident"):
            return False
        was_resident = rec.state == "resident"
        del self.records[cid]
        self.tomb[cid] = "released" if was_resident else "evicted"
        if was_resident:
            del self.pattern[cid], self.where[cid]
        return was_resident

    def _expect_lookup_error(self, cid: str, call: Callable[[], object]) -> None:
        """``cid`` has no record: NotFound, or FailedPrecondition for an evicted one."""
        expected = FailedPrecondition if self.tomb.get(cid) == "evicted" else NotFound
        try:
            call()
        except expected:
            return
        raise AssertionError(f"{cid}: expected {expected.__name__}")

    # -- rules ------------------------------------------------------------------------

    @rule(
        pool=st.sampled_from(sorted(SPEC)),
        size=sizes,
        holder=st.sampled_from(HOLDERS),
        pinned=st.booleans(),
        retain=st.booleans(),
        priority=st.sampled_from([None, None, -1, 0, 1, 2, 3]),
        hint=st.sampled_from([None, None, "d0", "d1"]),
        named=st.booleans(),
        backend=st.integers(0, 9),
    )
    def allocate(self, pool, size, holder, pinned, retain, priority, hint, named, backend) -> None:
        self._allocate(pool, size, holder, pinned, retain, priority, hint, named, backend)

    # The rules below make small, mostly unpinned allocations and holes more frequent,
    # so that devices fill up and fragment and the whole pressure ladder runs.
    @rule(pool=st.sampled_from(sorted(SPEC)), size=small_sizes, holder=st.sampled_from(HOLDERS),
          pin=st.integers(0, 5), retain=st.booleans())
    def allocate_small(self, pool, size, holder, pin, retain) -> None:
        self._allocate(pool, size, holder, pin == 0, retain, None, None, False, 1)

    @rule(index=st.integers(0, 10**6))
    def release_live(self, index) -> None:
        """Release a resident cache by each of its holders (makes holes)."""
        live = sorted(self.pattern)
        if not live:
            return
        cid = live[index % len(live)]
        self._begin(set())
        for holder in sorted(self.records[cid].holders):
            expected = self._release_model(cid, holder, False)
            assert self.b.release(cid, holder) is expected
        self._settle()

    @rule(pool=st.sampled_from(sorted(SPEC)), count=st.integers(2, 6), size=small_sizes,
          hint=st.sampled_from(["d0", "d1"]), holder=st.sampled_from(HOLDERS),
          pin_every=st.integers(0, 4), then_compact=st.booleans())
    def fill_and_punch(self, pool, count, size, hint, holder, pin_every, then_compact) -> None:
        """Allocate a run of caches, then release every other one: fragmentation."""
        first = self.serial + 1
        for i in range(count):
            self._allocate(pool, size, holder, pin_every > 0 and i % 4 == pin_every % 4,
                           False, None, hint, True, 1)
        for i in range(0, count, 2):
            cid = f"k{first + i}"
            if cid in self.pattern:
                self._begin(set())
                for h in sorted(self.records[cid].holders):
                    assert self.b.release(cid, h) is self._release_model(cid, h, False)
                self._settle()
        if then_compact and hint in SPEC[pool].devices:
            self.compact(hint, pool, stale=1)

    @rule(op=st.sampled_from(["attach", "pin", "unpin", "evict"]), index=st.integers(0, 10**6),
          holder=st.sampled_from(HOLDERS))
    def holder_op(self, op, index, holder) -> None:
        if op == "evict":
            self.evict(index)
        else:
            getattr(self, op)(index, holder)

    @rule(op=st.sampled_from(["drain", "drain", "drop_holder", "retire_idle"]),
          holder=st.sampled_from(HOLDERS))
    def maintenance(self, op, holder) -> None:
        if op == "drain":
            self.drain_events()
        elif op == "drop_holder":
            self.drop_holder(holder)
        else:
            self.retire_idle()

    def _allocate(self, pool, size, holder, pinned, retain, priority, hint, named, backend) -> None:
        spec = SPEC[pool]
        if hint is not None and hint not in spec.devices:
            hint = None
        self.serial += 1
        cid = f"k{self.serial}" if named else None
        request = AllocationRequest(pool, size, holder=holder, cache_id=cid, pinned=pinned,
                                    retain=retain, priority=priority, device_hint=hint)
        prio = spec.priority if priority is None else priority
        reserved = -(-size // spec.block_bytes) * spec.block_bytes
        candidates = [hint] if hint else list(spec.devices)
        self._begin({pool})
        evicted: set[str] = set()
        for _ in range(4):
            try:
                result = self.b.allocate(request)
            except InvalidArgument as err:
                assert err.field == "size_bytes" and reserved > max(CAPACITY[d] for d in candidates)
                self._settle()
                return
            except ResourceExhausted as err:
                event("allocate: resource exhausted")
                assert reserved <= max(CAPACITY[d] for d in candidates)
                assert err.requested_bytes == reserved
                assert err.largest_free_extent_bytes < reserved
                assert 0 <= err.largest_free_extent_bytes <= err.free_bytes
                if reserved > (spec.max_bytes or 10**18):
                    assert not err.satisfiable
                # Evictions on a failed request are allowed (they stand), but only of
                # unpinned caches of equal or lower priority.
                self._settle(lambda c: self.records[c].priority <= prio)
                return
            evicted.update(result.evicted)
            for c in result.evicted:
                assert self.records[c].priority <= prio, f"evicted higher-priority {c}"
            if result.compaction is not None:
                event("allocate: compaction plan")
                assert result.cache is None
                # Learn the evictions made before the plan, then copy and commit.
                self._learn_evictions(lambda c: c in evicted)
                self._retired(result.retired_segments)
                self._commit(result.compaction)
                continue
            break
        else:
            raise AssertionError("allocate kept asking for compaction")
        new_id = result.cache.cache_id if result.cache is not None else None
        self._learn_evictions(lambda c: c in evicted and c != new_id)
        if evicted:
            event("allocate: evicted")
        if any(s.pool != pool for s in result.retired_segments):
            event("allocate: took another pool's segment")
        elif result.retired_segments:
            event("allocate: retired own segment")
        self._retired(result.retired_segments)
        if result.new_segment is not None:
            self._new_segment(result.new_segment, pool)
        info = result.cache
        assert info is not None
        if cid is not None:
            assert info.cache_id == cid
        cid = info.cache_id
        assert cid not in self.records and cid not in self.tomb
        (ext,) = info.extents
        assert info.pool == pool and info.device_id in candidates
        assert info.nbytes == size and info.reserved_bytes == reserved == ext.nbytes
        assert ext.offset % spec.block_bytes == 0
        seg = self.segment_pool[ext.segment_id]
        assert seg.pool == pool and seg.device_id == info.device_id
        assert ext.offset + ext.nbytes <= seg.nbytes
        assert info.holders == frozenset({holder}) and info.pin_count == int(pinned)
        if result.new_segment is not None and backend == 0:
            event("allocate: aborted")
            self._retired(self.b.abort_allocation(result))
            self.ids.append(cid)
            self.tomb[cid] = "aborted"
            self._settle(lambda c: c in evicted)
            return
        self.ids.append(cid)
        self.records[cid] = Record(holder, retain, prio, pool)
        self.pattern[cid] = struct.pack("<Q", self.serial) * (ext.nbytes // 8)
        self.mem[ext.segment_id][ext.offset:ext.offset + ext.nbytes] = self.pattern[cid]
        self.where[cid] = ext
        if pinned:
            self.pins[(cid, holder)] += 1
            self.pinned_at[cid] = ext
        self._settle(lambda c: c in evicted)

    @rule(index=st.integers(0, 10**6), holder=st.sampled_from(HOLDERS), force=st.booleans())
    def release(self, index, holder, force) -> None:
        cid = self.pick(index)
        self._begin(set())
        rec = self.records.get(cid)
        if rec is None:
            if cid in self.tomb and self.tomb[cid] != "aborted":
                assert self.b.release(cid, holder, force=force) is False
            else:
                try:
                    self.b.release(cid, holder, force=force)
                except NotFound:
                    pass
                else:
                    raise AssertionError("release of an unknown id must be NOT_FOUND")
            self._settle()
            return
        if force and any(n for (c, h), n in self.pins.items() if c == cid and h != holder):
            try:
                self.b.release(cid, holder, force=True)
            except FailedPrecondition:
                event("release: force refused")
                self._settle()
                return
            raise AssertionError("force release of a cache another holder pins")
        expected = self._release_model(cid, holder, force)
        assert self.b.release(cid, holder, force=force) is expected
        self._settle()

    def attach(self, index, holder) -> None:
        cid = self.pick(index)
        self._begin(set())
        rec = self.records.get(cid)
        if rec is None:
            self._expect_lookup_error(cid, lambda: self.b.attach(cid, holder))
        elif rec.state == "evicted":
            try:
                self.b.attach(cid, holder)
            except FailedPrecondition:
                pass
            else:
                raise AssertionError("attach to an evicted cache")
        else:
            info = self.b.attach(cid, holder)
            rec.holders.add(holder)
            assert info.extents == (self.where[cid],)
        self._settle()

    def pin(self, index, holder) -> None:
        cid = self.pick(index)
        self._begin(set())
        rec = self.records.get(cid)
        if rec is None:
            self._expect_lookup_error(cid, lambda: self.b.pin(cid, holder))
        elif rec.state == "evicted":
            try:
                self.b.pin(cid, holder)
            except FailedPrecondition:
                pass
            else:
                raise AssertionError("pin of an evicted cache")
        else:
            info = self.b.pin(cid, holder)
            rec.holders.add(holder)
            self.pins[(cid, holder)] += 1
            self.pinned_at.setdefault(cid, self.where[cid])
            assert info.pin_count == self.pin_count(cid)
        self._settle()

    def unpin(self, index, holder) -> None:
        cid = self.pick(index)
        self._begin(set())
        rec = self.records.get(cid)
        if rec is None:
            self._expect_lookup_error(cid, lambda: self.b.unpin(cid, holder))
        elif self.pins[(cid, holder)] == 0:
            try:
                self.b.unpin(cid, holder)
            except FailedPrecondition:
                pass
            else:
                raise AssertionError("unpin without a pin")
        else:
            self.pins[(cid, holder)] -= 1
            if self.pin_count(cid) == 0:
                del self.pinned_at[cid]
            assert self.b.unpin(cid, holder).pin_count == self.pin_count(cid)
        self.pins += Counter()  # drop zero counts
        self._settle()

    def evict(self, index) -> None:
        cid = self.pick(index)
        self._begin(set())
        rec = self.records.get(cid)
        if rec is None:
            self._expect_lookup_error(cid, lambda: self.b.evict(cid))
        elif rec.state == "evicted" or self.pin_count(cid):
            try:
                self.b.evict(cid)
            except FailedPrecondition:
                pass
            else:
                raise AssertionError("evicted a pinned or evicted cache")
        else:
            info = self.b.evict(cid)
            assert info.state is CacheState.EVICTED
        self._settle(lambda c: c == cid)

    def drop_holder(self, holder) -> None:
        self._begin(set())
        expected = []
        for cid in sorted(self.records):
            if holder in self.records[cid].holders or self.pins[(cid, holder)]:
                if self._release_model(cid, holder, False):
                    expected.append(cid)
        self.pins += Counter()
        assert sorted(self.b.drop_holder(holder)) == expected
        self._settle()

    @rule(
        device=st.sampled_from([None, "d0", "d1"]),
        pool=st.sampled_from([None, "a", "b", "c", "e"]),
        stale=st.integers(0, 5),
    )
    def compact(self, device, pool, stale) -> None:
        self._begin(set(SPEC))
        plan = self.b.plan_compaction(device=device, pool=pool)
        assert plan == self.b.plan_compaction(device=device, pool=pool)  # pure
        for move in plan.moves:
            info = self.b.get(move.cache_id)
            assert device is None or info.device_id == device
            assert pool is None or info.pool == pool
        assert 0.0 <= plan.fragmentation_after <= 1.0 and 0.0 <= plan.fragmentation_before <= 1.0
        if stale == 0 and self.pattern:
            cid = sorted(self.pattern)[0]
            holder = sorted(self.records[cid].holders or {""})[0]
            self.b.attach(cid, holder)  # any mutation makes the plan stale
            self.records[cid].holders.add(holder)
            try:
                self.b.commit(plan)
            except FailedPrecondition:
                event("compact: stale plan refused")
                self._settle()
                return
            raise AssertionError("a stale plan was committed")
        if plan.moves:
            event("compact: moves")
        if plan.segments_emptied:
            event("compact: segments emptied")
        self._commit(plan)
        self._settle()

    def retire_idle(self) -> None:
        self._begin(set(SPEC))
        self._retired(self.b.retire_idle_segments(0))
        self._settle()

    def drain_events(self) -> None:
        got = sorted(
            (e.kind.value, e.cache_id, e.epoch, tuple(sorted(e.recipients)))
            for e in self.b.drain_events()
        )
        assert got == sorted(self.expected_events), (got, sorted(self.expected_events))
        self.expected_events = []
        assert self.b.drain_events() == []

    # -- invariants -------------------------------------------------------------------

    @invariant()
    def accounting(self) -> None:
        audit(self.b)
        segments = {s.segment_id: s for s in self.b.segments()}
        assert set(segments) == set(self.mem), "segments differ from the backend's"
        for sid, info in segments.items():
            assert info.nbytes == len(self.mem[sid])
        by_segment: dict[int, list[tuple[int, int, str]]] = {}
        allocated_by_device: Counter[str] = Counter()
        for c in self.b.caches(state=CacheState.RESIDENT):
            (ext,) = c.extents
            by_segment.setdefault(ext.segment_id, []).append((ext.offset, ext.nbytes, c.cache_id))
            allocated_by_device[c.device_id] += ext.nbytes
            assert segments[ext.segment_id].pool == c.pool
            assert segments[ext.segment_id].device_id == c.device_id
        for sid, spans in by_segment.items():
            spans.sort()
            end = 0
            for offset, nbytes, cid in spans:
                assert offset >= end, f"{cid} overlaps the cache before it"
                end = offset + nbytes
            assert end <= segments[sid].nbytes
        free_by_device: Counter[str] = Counter()
        for sid, info in segments.items():
            used = sum(n for _, n, _ in by_segment.get(sid, []))
            free = self.b._pools[info.pool].arenas[info.device_id].free.segment_free_bytes(sid)
            assert used + free == info.nbytes, f"segment {sid}: {used} + {free} != {info.nbytes}"
            free_by_device[info.device_id] += free
        stats = self.b.stats()
        for d in stats.devices:
            u = d.usage
            in_segments = sum(s.nbytes for s in segments.values() if s.device_id == d.device_id)
            assert u.reserved_bytes == in_segments <= u.capacity_bytes == CAPACITY[d.device_id]
            assert u.allocated_bytes == allocated_by_device[d.device_id]
            assert u.allocated_bytes + free_by_device[d.device_id] == in_segments
            assert u.free_bytes == u.capacity_bytes - u.allocated_bytes
            assert 0.0 <= u.fragmentation_ratio < 1.0 and 0.0 <= u.utilization_ratio <= 1.0
        for p in stats.pools:
            spec = SPEC[p.pool]
            assert p.usage.reserved_bytes <= p.max_bytes
            assert spec.max_bytes is None or p.usage.reserved_bytes <= spec.max_bytes
        assert stats.total.allocated_bytes == sum(allocated_by_device.values())

    @invariant()
    def pinned_caches_stay_put(self) -> None:
        for cid, ext in self.pinned_at.items():
            assert self.pin_count(cid) > 0
            info = self.b.get(cid)
            assert info.state is CacheState.RESIDENT and info.extents == (ext,), cid
            assert info.pin_count == self.pin_count(cid)

    @invariant()
    def check_bytes(self) -> None:
        for cid, ext in self.where.items():
            data = self.mem[ext.segment_id][ext.offset:ext.offset + ext.nbytes]
            assert data == self.pattern[cid], f"bytes of {cid} changed"


BrokerMachine.TestCase.settings = settings(
    max_examples=150, stateful_step_count=50, deadline=None
)
TestBrokerMachine = BrokerMachine.TestCase
