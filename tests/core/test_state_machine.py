"""The broker driven as a state machine against a model, with a byte-level replay.

A ``RuleBasedStateMachine`` runs a few pools (different policies, minimums and quotas) on
two devices through allocate (with compaction results replayed and committed, and some
backend failures aborted), release (with force), attach, pin, unpin, evict, compaction,
idle retirement, background reclamation (which must never take a held cache), session
drops and event draining (every eviction is also in ``drain_evictions``, for the log). The model tracks every record's
holders, pins, state and epoch, and every event the broker owes its holders. After every
step it checks the accounting (``audit`` and independent sums), that extents never
overlap, that quotas and minimums hold, that pinned caches never move or vanish, and,
with a ``bytearray`` per segment into which every new cache writes a unique pattern and
every plan's moves are copied with memmove semantics, that no cache's bytes ever change.

Sessions (holder ids opened by a rule) allocate, attach and pin as the daemon does: each
handle handed out is followed by ``note_mapped`` for its segment. The model tracks which
live session maps which segment, which segments drain (out of placement, waiting for
their mappers) and the SEGMENT_RETIRED events each session received; sessions report
unmapping (``note_unmapped``) or crash (``end_session``). Checked: no segment is retired
while a live session maps it, a draining segment never holds a cache, a retired segment
id never comes back, and a drained segment is retired exactly when its last mapper
leaves. Waiting: a request that failed with ``satisfiable=True`` is retried after the
caches in its way are released (and the drained segments unmapped), and must then fit;
one that failed with ``satisfiable=False`` must fail again, even on an empty broker.

Work the daemon does outside its lock is modelled as steps of its own, with other rules
running in between. An allocation is PENDING until its segment is created and its bytes
are ready; meanwhile it is never handed out, evicted or moved, its holder may leave (the
cache is freed at ``cache_ready``) and the allocation may be aborted (a segment still
being created goes with it). Bytes the broker calls fresh (``needs_zeroing`` False)
must be zero. A compaction is begun, then the machine releases, ends sessions and
allocates elsewhere, then it commits a random prefix of the plan (the backend copied
those moves) or aborts it: frozen arenas are never placed in or evicted from, caches
freed in them keep their bytes until the end, moving caches refuse attach and pin, and
the byte replay of the committed prefix keeps every cache's bytes intact. Targeted plans
(the pressure path's, and ``compact_targeted``'s ``target_bytes``) open the free extent
they promise, checked against the model's own layout after the commit.
"""

from __future__ import annotations

import struct
from collections import Counter
from collections.abc import Callable

import pytest
from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from kvbroker.core import (
    AllocateResult,
    AllocationRequest,
    Broker,
    CacheState,
    CompactionPlan,
    DeviceSpec,
    EventKind,
    Extent,
    FailedPrecondition,
    NotFound,
    Placement,
    PoolSpec,
    ResourceExhausted,
    SegmentInfo,
)
from kvbroker.core.audit import audit

from .support import evict

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
HOLDERS = ("", "s1", "s2")  # holders that never map a segment
#: Where a rule draws a holder from ``ANY_HOLDER``, "#i" stands for the i-th live
#: session (if any): a session maps the segment of every handle it is handed.
ANY_HOLDER = st.sampled_from(HOLDERS + ("#0", "#1", "#2"))
MAX_SESSIONS = 4

sizes = st.one_of(
    st.integers(1, 24 * K),
    st.integers(1, 96 * K),
    st.sampled_from([4 * K, 16 * K, 32 * K, 48 * K, 64 * K, 128 * K, 200 * K]),
)
small_sizes = st.integers(1, 16 * K)


class Clock:
    """A manual clock: time stands still until a rule advances it, so the model knows
    when each segment became empty (for idle retirement)."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Record:
    __slots__ = ("holders", "retain", "state", "priority", "epoch", "pool", "doomed")

    def __init__(self, holder: str, retain: bool, priority: int, pool: str) -> None:
        self.holders = {holder}
        self.retain = retain
        self.state = "pending"  # then "resident", "evicted"
        self.priority = priority
        self.epoch = 0
        self.pool = pool
        self.doomed = False  # pending, and its holders left: freed at cache_ready


class Active:
    """A compaction in flight: its plan and the arenas (pool, device) it freezes."""

    def __init__(self, plan: CompactionPlan, arenas: set[tuple[str, str]]) -> None:
        self.plan = plan
        self.arenas = arenas


class BrokerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.clock = Clock()
        self.b = Broker(DEVICES, POOLS, clock=self.clock)
        self.mem: dict[int, bytearray] = {}  # live segments, draining ones included
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
        self.expected_evictions: list[tuple[str, str, bool]] = []  # (cache, pool, held) to log
        self.reserved_before: dict[str, int] = {}
        self.shrink_ok: set[str] = set()
        # Sessions and mappings.
        self.sessions: list[str] = []  # live sessions
        self.session_serial = 0
        self.mapped: dict[int, set[str]] = {}  # segment -> live sessions mapping it
        self.draining: set[int] = set()
        self.drain_ok = False  # whether the current step may drain segments
        self.drained_now: set[int] = set()  # segments the last settled step drained
        self.inbox: dict[str, list[tuple[int, int]]] = {}  # SEGMENT_RETIRED (id, generation)
        self.retired_ids: set[int] = set()
        self.empty_at: dict[int, float] = {}  # placeable empty segment -> since when
        # Requests that failed: (allocation args, satisfiable).
        self.waiting: list[tuple[tuple, bool]] = []
        # Work in flight outside the daemon's lock.
        self.pending: dict[str, AllocateResult] = {}  # pending caches: their allocation
        self.pending_at: dict[str, Extent] = {}
        self.creating: set[int] = set()  # segments the backend is still creating
        self.active: list[Active] = []  # compactions begun, not yet committed
        self.deferred: dict[str, Extent] = {}  # freed in a frozen arena: bytes kept

    # -- helpers ----------------------------------------------------------------------

    def pin_count(self, cid: str) -> int:
        return sum(n for (c, _), n in self.pins.items() if c == cid)

    def pick(self, index: int) -> str:
        if not self.ids or index % 7 == 6:
            return f"never-{index}"
        return self.ids[index % len(self.ids)]

    def _effective_reserved(self) -> dict[str, int]:
        """Each pool's segment bytes, less those draining (they are on their way out)."""
        return {
            name: pool.reserved_bytes - sum(a.draining_bytes for a in pool.arenas.values())
            for name, pool in self.b._pools.items()
        }

    def _begin(self, shrink_ok: set[str], drain_ok: bool = False) -> None:
        self.reserved_before = self._effective_reserved()
        self.shrink_ok = shrink_ok
        self.drain_ok = drain_ok

    def _event(self, kind: EventKind, cid: str, epoch: int, holders: set[str]) -> None:
        if holders:
            self.expected_events.append((kind.value, cid, epoch, -1, 0, tuple(sorted(holders))))

    def _segment_caches(self, sid: int) -> list[str]:
        """Caches that occupy bytes of segment ``sid``: resident, pending or deferred."""
        return [cid for extents in (self.where, self.pending_at, self.deferred)
                for cid, ext in extents.items() if ext.segment_id == sid]

    def _arena(self, ext: Extent) -> tuple[str, str]:
        info = self.segment_pool[ext.segment_id]
        return info.pool, info.device_id

    def _arena_of(self, sid: int) -> tuple[str, str]:
        info = self.segment_pool[sid]
        return info.pool, info.device_id

    def _frozen(self) -> set[tuple[str, str]]:
        return {arena for active in self.active for arena in active.arenas}

    def _moving(self) -> set[str]:
        return {m.cache_id for active in self.active for m in active.plan.moves if m.cache_id in self.where}

    def _freed_bytes(self, cid: str, ext: Extent) -> None:
        """``cid`` was freed: its bytes wait for the compaction freezing its arena."""
        if self._arena(ext) in self._frozen() and ext.segment_id not in self.creating:
            self.deferred[cid] = ext

    def _retired(self, segments) -> None:
        for info in segments:
            sid = info.segment_id
            assert sid in self.mem, f"retired unknown segment {sid}"
            assert info == self.segment_pool[sid]
            assert not self._segment_caches(sid), f"segment {sid} retired with caches"
            assert not self.mapped.get(sid), f"segment {sid} retired while {self.mapped[sid]} map it"
            del self.mem[sid]
            del self.segment_pool[sid]
            self.mapped.pop(sid, None)
            self.draining.discard(sid)
            self.empty_at.pop(sid, None)
            self.retired_ids.add(sid)

    def _new_segment(self, info: SegmentInfo, pool: str) -> None:
        assert info.segment_id not in self.mem and info.segment_id not in self.retired_ids
        assert info.pool == pool and info.device_id in SPEC[pool].devices
        granule = max(ALIGN[info.device_id], SPEC[pool].block_bytes)
        assert info.nbytes > 0 and info.nbytes % granule == 0
        assert info.nbytes >= MIN_SEGMENT[info.device_id]
        self.mem[info.segment_id] = bytearray(info.nbytes)  # zero-filled, as a backend's
        self.segment_pool[info.segment_id] = info

    def _learn_drains(self) -> None:
        """Segments the broker started draining in this step: only when the step may
        drain, only mapped empty ones, each announced to exactly its mappers."""
        now = {seg.info.segment_id for seg in self.b._ledger.segments if seg.draining}
        assert self.draining <= now, f"drained segments vanished: {self.draining - now}"
        self.drained_now = now - self.draining
        for sid in sorted(self.drained_now):
            assert self.drain_ok, f"segment {sid} drained by a step that may not drain"
            assert sid in self.mem
            assert self.mapped.get(sid), f"unmapped segment {sid} drained instead of retired"
            assert not self._segment_caches(sid), f"segment {sid} drained with caches"
            self.expected_events.append((
                EventKind.SEGMENT_RETIRED.value, "", 0, sid,
                self.segment_pool[sid].generation, tuple(sorted(self.mapped[sid])),
            ))
            self.empty_at.pop(sid, None)
        self.draining = now

    def _track_empty(self) -> None:
        occupied = {ext.segment_id for extents in (self.where, self.pending_at, self.deferred)
                    for ext in extents.values()}
        for sid in self.mem:
            if sid in self.draining or sid in occupied:
                self.empty_at.pop(sid, None)
            else:
                self.empty_at.setdefault(sid, self.clock.now)

    def _evicted_in_model(self, cid: str) -> None:
        """The broker evicted ``cid`` (found by _settle): update the model."""
        rec = self.records[cid]
        assert self.pin_count(cid) == 0, f"pinned cache {cid} was evicted"
        assert self._arena(self.where[cid]) not in self._frozen(), f"{cid} evicted from a frozen arena"
        self.expected_evictions.append((cid, rec.pool, bool(rec.holders)))
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
        """Compare the broker with the model after a step; learn evictions and drains."""
        self._learn_evictions(may_vanish)
        self._learn_drains()
        self._track_empty()
        resident = {c.cache_id for c in self.b.caches(state=CacheState.RESIDENT)}
        assert resident == set(self.pattern), "a cache appeared that the model lacks"
        moving = self._moving()
        for cid, rec in self.records.items():
            info = self.b.get(cid)
            assert info.state.value == rec.state, cid
            assert set(info.holders) == rec.holders, (cid, info.holders, rec.holders)
            assert info.pin_count == self.pin_count(cid), cid
            assert info.epoch == rec.epoch, (cid, info.epoch, rec.epoch)
            assert info.retain == rec.retain and info.priority == rec.priority
            assert info.moving == (cid in moving) == self.b.is_moving(cid), cid
            if rec.state == "resident":
                assert info.extents == (self.where[cid],), f"{cid} moved without a plan"
            elif rec.state == "pending":
                assert info.extents == (self.pending_at[cid],), cid
            else:
                assert info.extents == ()
        # Pools stay at or above min_bytes, draining bytes not counted as kept: a drained
        # segment is already promised back to the device.
        after = self._effective_reserved()
        for name, before in self.reserved_before.items():
            now, floor = after[name], SPEC[name].min_bytes
            if now < before and now < floor:
                assert name in self.shrink_ok, f"pool {name} taken below min_bytes ({now} < {floor})"
        self.reserved_before = after

    def _apply_plan(self, plan: CompactionPlan, count: int | None = None) -> None:
        """What a backend does: copy the first ``count`` moves' bytes (all when None), in
        order, memmove-style. A cache freed since the plan began still moves (its
        destination is reserved for it); only its bytes no longer matter."""
        for move in plan.moves[:count]:
            cid = move.cache_id
            if cid not in self.where:
                assert self.deferred[cid] == move.source, (cid, move)
                chunk = bytes(self.mem[move.source.segment_id][move.source.offset:move.source.end])
                self.mem[move.destination.segment_id][move.destination.offset:move.destination.end] = chunk
                self.deferred[cid] = move.destination
                continue
            assert self.pin_count(cid) == 0, f"plan moves pinned cache {cid}"
            assert self.where[cid] == move.source, (cid, self.where[cid], move.source)
            assert move.source.nbytes == move.destination.nbytes
            src, dst = move.source, move.destination
            assert dst.segment_id not in self.draining, f"plan moves {cid} into draining {dst}"
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
        # Emptied segments go back to the device: now when unmapped, else they drain.
        emptied = set(plan.segments_emptied)
        assert {s.segment_id for s in retired} == {sid for sid in emptied if not self.mapped.get(sid)}
        self._retired(retired)
        for sid in emptied - {s.segment_id for s in retired}:
            assert self.b._ledger.segments[sid].draining, f"emptied mapped segment {sid} not drained"
        self.check_bytes()

    def _release_model(self, cid: str, holder: str, force: bool) -> bool:
        """Apply a successful release to the model; return what release must return."""
        rec = self.records[cid]
        self.pins.pop((cid, holder), None)
        if self.pin_count(cid) == 0:
            self.pinned_at.pop(cid, None)
        rec.holders.discard(holder)
        forced = False
        if force and rec.holders:
            if rec.state == "resident":
                rec.epoch += 1
                self._event(EventKind.EVICTED, cid, rec.epoch, rec.holders)
                forced = True
            rec.holders.clear()
        if rec.holders or (rec.retain and not force and rec.state != "evicted"):
            return False
        if rec.state == "pending":
            rec.doomed = True
            return False
        was_resident = rec.state == "resident"
        del self.records[cid]
        self.tomb[cid] = ("forced" if forced else "released") if was_resident else "evicted"
        if was_resident:
            del self.pattern[cid]
            self._freed_bytes(cid, self.where.pop(cid))
        return was_resident

    def _expect_lookup_error(self, cid: str, call: Callable[[], object]) -> None:
        """``cid`` has no record: NotFound, or FailedPrecondition for an evicted one (saying
        so when another holder force-released it)."""
        tomb = self.tomb.get(cid)
        expected = FailedPrecondition if tomb in ("evicted", "forced") else NotFound
        try:
            call()
        except expected as err:
            assert tomb != "forced" or "released by force" in str(err), err
            return
        raise AssertionError(f"{cid}: expected {expected.__name__}")

    # -- rules ------------------------------------------------------------------------

    @rule(
        pool=st.sampled_from(sorted(SPEC)),
        size=sizes,
        holder=ANY_HOLDER,
        pinned=st.booleans(),
        retain=st.booleans(),
        priority=st.sampled_from([None, None, -1, 0, 1, 2, 3]),
        hint=st.sampled_from([None, None, "d0", "d1"]),
        named=st.booleans(),
        backend=st.integers(0, 9),
    )
    def allocate(self, pool, size, holder, pinned, retain, priority, hint, named, backend) -> None:
        holder = self._holder(holder)
        outcome, cid = self._allocate(pool, size, holder, pinned, retain, priority, hint, named, backend)
        if outcome == "ok":
            self._handed(holder, cid)

    # The rules below make small, mostly unpinned allocations and holes more frequent,
    # so that devices fill up and fragment and the whole pressure ladder runs.
    @rule(pool=st.sampled_from(sorted(SPEC)), size=small_sizes, holder=ANY_HOLDER,
          pin=st.integers(0, 5), retain=st.booleans())
    def allocate_small(self, pool, size, holder, pin, retain) -> None:
        holder = self._holder(holder)
        outcome, cid = self._allocate(pool, size, holder, pin == 0, retain, None, None, False, 1)
        if outcome == "ok":
            self._handed(holder, cid)

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
          hint=st.sampled_from(["d0", "d1"]), holder=ANY_HOLDER,
          pin_every=st.integers(0, 4), then_compact=st.booleans())
    def fill_and_punch_rule(self, pool, count, size, hint, holder, pin_every, then_compact) -> None:
        self.fill_and_punch(pool, count, size, hint, holder, pin_every, then_compact)

    def fill_and_punch(self, pool, count, size, hint, holder, pin_every, then_compact) -> None:
        """Allocate a run of caches, then release every other one: fragmentation."""
        holder = self._holder(holder)
        first = self.serial + 1
        for i in range(count):
            outcome, cid = self._allocate(pool, size, holder, pin_every > 0 and i % 4 == pin_every % 4,
                                          False, None, hint, True, 1)
            if outcome == "ok":
                self._handed(holder, cid)
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
          holder=ANY_HOLDER)
    def holder_op(self, op, index, holder) -> None:
        holder = self._holder(holder)
        if op == "evict":
            self.evict(index)
        elif op == "unpin":
            self.unpin(index, holder)
        else:
            cid = getattr(self, op)(index, holder)
            if cid is not None:
                self._handed(holder, cid)

    @rule(op=st.sampled_from(["drain", "drain", "drop_holder", "retire_idle"]),
          holder=st.sampled_from(HOLDERS))
    def maintenance(self, op, holder) -> None:
        if op == "drain":
            self.drain_events()
        elif op == "drop_holder":
            self.drop_holder(holder)
        else:
            self.retire_idle(0, 0)

    def _allocate(self, pool, size, holder, pinned, retain, priority, hint, named, backend,
                  *, record: bool = True) -> tuple[str, object]:
        """Allocate as the daemon does: compaction plans copied and committed, then the
        placed cache finished by ``backend``: 0 aborts it (the backend failed), 2 has
        its holder release it before it is ready, 3 leaves it pending (``record`` only)
        for ``finish_pending``, others make it ready. Returns ("ok", cache id) for a
        cache handed to its holder, ("aborted" | "released" | "pending", cache id),
        or ("exhausted", the error); a request larger than every candidate device is
        exhausted for good (``satisfiable=False``), never invalid."""
        spec = SPEC[pool]
        args = (pool, size, holder, pinned, retain, priority, hint, named)
        if hint is not None and hint not in spec.devices:
            hint = None
        self.serial += 1
        cid = f"k{self.serial}" if named else None
        request = AllocationRequest(pool, size, holder=holder, cache_id=cid, pinned=pinned,
                                    retain=retain, priority=priority, device_hint=hint)
        prio = spec.priority if priority is None else priority
        reserved = -(-size // spec.block_bytes) * spec.block_bytes
        candidates = [hint] if hint else list(spec.devices)
        self._begin({pool}, drain_ok=True)
        evicted: set[str] = set()
        for _ in range(4):
            try:
                result = self.b.allocate(request)
            except ResourceExhausted as err:
                event("allocate: resource exhausted")
                if reserved > max(CAPACITY[d] for d in candidates):
                    event("allocate: larger than every candidate device")
                assert err.requested_bytes == reserved
                assert err.largest_free_extent_bytes < reserved
                assert 0 <= err.largest_free_extent_bytes <= err.free_bytes
                # Satisfiable exactly when the request fits an empty broker.
                ceiling = min(self.b._pools[pool].max_bytes, max(CAPACITY[d] for d in candidates))
                assert err.satisfiable == (reserved <= ceiling), (err, ceiling)
                # Evictions on a failed request are allowed (they stand), but only of
                # unpinned caches of equal or lower priority.
                self._settle(lambda c: self.records[c].priority <= prio)
                if record:
                    self.waiting = [*self.waiting[-5:], (args, err.satisfiable)]
                if self.drained_now:
                    event("allocate: waits for drained segments")
                    if backend >= 5:
                        self._retry_while_draining(request)
                return "exhausted", err
            evicted.update(result.evicted)
            for c in result.evicted:
                assert self.records[c].priority <= prio, f"evicted higher-priority {c}"
            if result.compaction is not None:
                event("allocate: compaction plan")
                assert result.cache is None
                # Learn the evictions made before the plan, then copy and commit.
                self._learn_evictions(lambda c: c in evicted)
                self._retired(result.retired_segments)
                plan = result.compaction
                arena = self._arena(plan.moves[0].source)
                self._commit(plan)
                assert plan.largest_free_extent_after >= reserved
                assert self._largest_free(*arena) >= reserved, "the plan did not open the extent it promised"
                continue
            break
        else:
            raise AssertionError("allocate kept asking for compaction")
        new_id = result.cache.cache_id if result.cache is not None else None
        self._learn_evictions(lambda c: c in evicted and c != new_id)
        frozen = self._frozen()
        for info in result.retired_segments:
            assert (info.pool, info.device_id) not in frozen, f"segment {info} taken from a frozen arena"
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
        assert ext.segment_id not in self.draining, f"{cid} placed in draining segment"
        seg = self.segment_pool[ext.segment_id]
        assert seg.pool == pool and seg.device_id == info.device_id
        assert ext.offset + ext.nbytes <= seg.nbytes
        assert info.holders == frozenset({holder}) and info.pin_count == int(pinned)
        assert info.state is CacheState.PENDING and not info.moving
        fresh = self.mem[ext.segment_id][ext.offset:ext.end]
        if result.needs_zeroing:
            event("allocate: needs zeroing")
        else:
            assert not any(fresh), f"{cid}: bytes called fresh are not zero"
        if result.new_segment is None:
            assert (pool, info.device_id) not in frozen, f"{cid} placed in a frozen arena"
            assert ext.segment_id not in self.creating
        else:
            assert ext.offset == 0 and result.new_segment.segment_id == ext.segment_id
            self.creating.add(ext.segment_id)
        self.ids.append(cid)
        self.records[cid] = Record(holder, retain, prio, pool)
        self.pending[cid] = result
        self.pending_at[cid] = ext
        if pinned:
            self.pins[(cid, holder)] += 1
            self.pinned_at[cid] = ext
        self._settle(lambda c: c in evicted)
        if backend == 0:
            self._finish(cid, "abort")
            return "aborted", cid
        if backend == 2:
            self._finish(cid, "release")
            return "released", cid
        if backend == 3 and record:
            event("allocate: left pending")
            return "pending", cid
        self._finish(cid, "ready")
        return "ok", cid

    def _finish(self, cid: str, action: str) -> None:
        """The daemon's work on a pending cache ended: ``abort`` (the backend failed),
        ``create`` (its new segment exists; the cache stays pending), ``release`` (its
        holders leave first, then the cache is made ready) or ``ready``."""
        result, ext, rec = self.pending[cid], self.pending_at[cid], self.records[cid]
        sid = ext.segment_id
        self._begin({rec.pool} if action == "abort" else set())
        if action == "abort":
            event("pending: aborted")
            assert self.b.abort_allocation(result) == ()
            del self.pending[cid], self.pending_at[cid], self.records[cid]
            for key in [k for k in self.pins if k[0] == cid]:
                del self.pins[key]
            self.pinned_at.pop(cid, None)
            self.tomb[cid] = "aborted"
            if sid in self.creating:  # the segment goes with it: nothing to free
                self.creating.discard(sid)
                del self.mem[sid], self.segment_pool[sid]
                self.empty_at.pop(sid, None)
                self.retired_ids.add(sid)
            else:
                self._freed_bytes(cid, ext)
            self._settle()
            return
        if sid in self.creating:
            self.b.segment_created(sid)
            self.creating.discard(sid)
            if action == "create":
                event("pending: segment created")
                self._settle()
                return
        if action == "release":
            for holder in sorted(rec.holders):
                assert self.b.release(cid, holder) is self._release_model(cid, holder, False)
        ready = self.b.cache_ready(cid)
        assert ready is not rec.doomed, (cid, ready)
        del self.pending[cid], self.pending_at[cid]
        if rec.doomed:
            event("pending: freed at ready")
            del self.records[cid]
            self.tomb[cid] = "released"
            self._freed_bytes(cid, ext)
        else:
            rec.state = "resident"
            self.pattern[cid] = struct.pack("<Q", self.serial) * (ext.nbytes // 8)
            self.mem[sid][ext.offset:ext.end] = self.pattern[cid]
            self.where[cid] = ext
        self._settle()

    def _retry_while_draining(self, request: AllocationRequest) -> None:
        """The daemon retries a queued request (another cache was released, say) before
        the sessions unmapped what its first attempt drained: the room is on its way,
        so the retry must take nothing more (no eviction, no drain) and still wait."""
        event("allocate: retried while draining")
        self._begin(set())
        try:
            self.b.allocate(request)
        except ResourceExhausted as err:
            assert err.satisfiable
        else:
            raise AssertionError("a request fit while the room it waits for still drains")
        self._settle()

    @rule(index=st.integers(0, 10**6), holder=st.sampled_from(HOLDERS), force=st.booleans())
    def release(self, index, holder, force) -> None:
        self._release(self.pick(index), holder, force)

    def _release(self, cid, holder, force) -> None:
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

    def _expect_refusal(self, cid: str, rec: Record, call: Callable[[], object]) -> None:
        """Attach or pin of a cache that is evicted, pending or moving: refused, saying why."""
        why = {"evicted": "was evicted", "pending": "is not ready yet"}.get(rec.state, "is being moved")
        try:
            call()
        except FailedPrecondition as err:
            assert why in str(err), (cid, err)
            event(f"refused: {why}")
        else:
            raise AssertionError(f"{cid} {why} but was handed out")

    def attach(self, index, holder) -> str | None:
        """Returns the id when the attach succeeded (a handle was handed out)."""
        cid = self.pick(index)
        self._begin(set())
        rec = self.records.get(cid)
        if rec is None:
            self._expect_lookup_error(cid, lambda: self.b.attach(cid, holder))
        elif rec.state != "resident" or cid in self._moving():
            self._expect_refusal(cid, rec, lambda: self.b.attach(cid, holder))
        else:
            info = self.b.attach(cid, holder)
            rec.holders.add(holder)
            assert info.extents == (self.where[cid],)
            self._settle()
            return cid
        self._settle()
        return None

    def pin(self, index, holder) -> str | None:
        """Returns the id when the pin succeeded (a handle was handed out)."""
        cid = self.pick(index)
        self._begin(set())
        rec = self.records.get(cid)
        if rec is None:
            self._expect_lookup_error(cid, lambda: self.b.pin(cid, holder))
        elif rec.state != "resident" or cid in self._moving():
            self._expect_refusal(cid, rec, lambda: self.b.pin(cid, holder))
        else:
            info = self.b.pin(cid, holder)
            rec.holders.add(holder)
            self.pins[(cid, holder)] += 1
            self.pinned_at.setdefault(cid, self.where[cid])
            assert info.pin_count == self.pin_count(cid)
            assert info.extents == (self.where[cid],)
            self._settle()
            return cid
        self._settle()
        return None

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
        """Evict one cache as the pressure ladder may: resident, unpinned, not frozen."""
        cid = self.pick(index)
        rec = self.records.get(cid)
        if rec is None or rec.state != "resident" or self.pin_count(cid):
            return
        if self._arena(self.where[cid]) in self._frozen():
            return
        self._begin(set())
        evict(self.b, cid)
        if rec.holders:
            assert self.b.get(cid).state is CacheState.EVICTED
        self._settle(lambda c: c == cid)

    def _drop_holder_model(self, holder) -> list[str]:
        """Drop ``holder``'s holds and pins in the model; the ids a drop_holder frees."""
        expected = []
        for cid in sorted(self.records):
            if holder in self.records[cid].holders or self.pins[(cid, holder)]:
                if self._release_model(cid, holder, False):
                    expected.append(cid)
        self.pins += Counter()
        return expected

    def drop_holder(self, holder) -> None:
        self._begin(set())
        expected = self._drop_holder_model(holder)
        assert sorted(self.b.drop_holder(holder)) == expected
        self._settle()

    @rule(
        device=st.sampled_from([None, "d0", "d1"]),
        pool=st.sampled_from([None, "a", "b", "c", "e"]),
        stale=st.integers(0, 5),
    )
    def compact(self, device, pool, stale) -> None:
        self._begin(set(SPEC), drain_ok=True)
        plan = self.b.plan_compaction(device=device, pool=pool)
        assert plan == self.b.plan_compaction(device=device, pool=pool)  # pure
        for move in plan.moves:
            info = self.b.get(move.cache_id)
            assert device is None or info.device_id == device
            assert pool is None or info.pool == pool
        assert 0.0 <= plan.fragmentation_after <= 1.0 and 0.0 <= plan.fragmentation_before <= 1.0
        for figures, total in ((plan.before, plan.fragmentation_before), (plan.after, plan.fragmentation_after)):
            assert figures.ratio == total
            assert figures.within_segments + figures.across_segments == pytest.approx(total, abs=1e-9)
        assert plan.after.free_bytes == plan.before.free_bytes, "moves neither free nor take bytes"
        if stale == 0 and plan.moves:
            cid = plan.moves[0].cache_id
            holder = sorted(self.records[cid].holders or {""})[0]
            self.b.pin(cid, holder)  # the plan would move a pinned cache: it is stale
            self.b.unpin(cid, holder)
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
            if any(self.mapped.get(sid) for sid in plan.segments_emptied):
                event("compact: mapped segment emptied")
        self._commit(plan)
        self._settle()

    @rule(device=st.sampled_from(["d0", "d1"]), pool=st.sampled_from(["a", "b", "c", "e"]),
          want=st.integers(1, 96 * K), fragment=st.integers(0, 6), size=small_sizes)
    def compact_targeted(self, device, pool, want, fragment, size) -> None:
        """Defragment with ``target_bytes=want`` (the pressure path's planner): a plan
        with moves promises a free extent of ``want`` bytes, which the model's layout has
        after its commit; no pinned cache moved, every cache's bytes are intact
        (``_commit``)."""
        if device not in SPEC[pool].devices:
            return
        if fragment >= 2:
            self.fill_and_punch(pool, fragment, size, device, "", 0, False)
        if (pool, device) in self._frozen():
            return
        self._begin(set(SPEC), drain_ok=True)
        plan = self.b.plan_compaction(device=device, pool=pool, target_bytes=want)
        assert plan == self.b.plan_compaction(device=device, pool=pool, target_bytes=want)  # pure
        assert plan.after.free_bytes == plan.before.free_bytes
        for move in plan.moves:
            assert self._arena(self.where[move.cache_id]) == (pool, device)
        largest_before = self._largest_free(pool, device)
        if not plan.moves:
            event("compact_targeted: nothing to move")
            return
        assert largest_before < want <= plan.largest_free_extent_after, "a plan that opens nothing"
        event("compact_targeted: moves")
        self._commit(plan)
        self._settle()
        assert self._largest_free(pool, device) >= want, "the extent the plan promised is not free"

    def _largest_free(self, pool: str, device: str) -> int:
        """The model's largest free extent among the arena's placeable segments."""
        largest = 0
        for sid, info in self.segment_pool.items():
            if (info.pool, info.device_id) != (pool, device) or sid in self.draining or sid in self.creating:
                continue
            if sid not in self.mem:
                continue
            taken = sorted((e.offset, e.end) for extents in (self.where, self.pending_at, self.deferred)
                           for e in extents.values() if e.segment_id == sid)
            pos = 0
            for lo, hi in taken:
                largest = max(largest, lo - pos)
                pos = max(pos, hi)
            largest = max(largest, len(self.mem[sid]) - pos)
        return largest

    @rule(advance=st.sampled_from([0, 0, 5, 20]), idle_seconds=st.sampled_from([0, 10, 30, 10**9]))
    def retire_idle(self, advance, idle_seconds) -> None:
        """Idle retirement: segments empty for ``idle_seconds`` go back to the device,
        at once when nobody maps them, else they drain (SEGMENT_RETIRED to the mappers)."""
        self.clock.now += advance
        frozen = self._frozen()
        idle = {sid for sid, t in self.empty_at.items()
                if self.clock.now - t >= idle_seconds and self._arena_of(sid) not in frozen}
        self._begin(set(SPEC), drain_ok=True)
        retired = self.b.retire_idle_segments(idle_seconds)
        assert {s.segment_id for s in retired} == {sid for sid in idle if not self.mapped.get(sid)}
        self._retired(retired)
        self._settle()
        assert self.drained_now == {sid for sid in idle if self.mapped.get(sid)}
        if retired:
            event("retire_idle: retired")
        if self.drained_now:
            event("retire_idle: drained")

    @rule()
    def drain_events(self) -> None:
        got = sorted(
            (e.kind.value, e.cache_id, e.epoch, e.segment_id, e.segment_generation,
             tuple(sorted(e.recipients)))
            for e in self.b.drain_events()
        )
        assert got == sorted(self.expected_events), (got, sorted(self.expected_events))
        # What the daemon does: SEGMENT_RETIRED goes to the live sessions it names.
        for kind, _, _, sid, generation, recipients in got:
            if kind == EventKind.SEGMENT_RETIRED.value:
                for session in recipients:
                    if session in self.inbox:
                        self.inbox[session].append((sid, generation))
        self.expected_events = []
        assert self.b.drain_events() == []
        # Every eviction is told to the daemon's log, held or not (issue 10.3).
        evictions, dropped = self.b.drain_evictions()
        assert dropped == 0
        got_evictions = sorted((e.cache_id, e.pool, e.held) for e in evictions)
        assert got_evictions == sorted(self.expected_evictions), (got_evictions, self.expected_evictions)
        self.expected_evictions = []

    @rule(batch=st.sampled_from([1, 2, 64]))
    def reclaim(self, batch) -> None:
        """Background reclamation: above a threshold it takes idle retained caches only
        (resident, retained, no holder, no pin, not frozen); never a held one (issue 10.3)."""
        frozen = self._frozen()
        self._begin(set())
        evicted = self.b.reclaim(max_victims=batch)
        assert len(evicted) == len(set(evicted)) <= batch
        for cid in evicted:
            rec = self.records[cid]
            assert not rec.holders, f"reclamation evicted {cid}, which {sorted(rec.holders)} hold"
            assert rec.retain and rec.state == "resident" and not self.pin_count(cid), cid
            assert self._arena(self.where[cid]) not in frozen, cid
        self._settle(lambda cid: cid in evicted)
        if evicted:
            event("reclaim: evicted")

    # -- sessions ---------------------------------------------------------------------

    def _session(self, index: int) -> str | None:
        return self.sessions[index % len(self.sessions)] if self.sessions else None

    def _holder(self, holder: str) -> str:
        """Resolve "#i" to a live session (opened when there is none)."""
        if holder.startswith("#"):
            if not self.sessions:
                self.open_session()
            return self._session(int(holder[1:]))
        return holder

    def _handed(self, holder: str, cid: str) -> None:
        """The daemon handed ``holder`` the handle of ``cid``: a session maps it."""
        if holder in self.inbox:
            self._map(holder, cid)

    def _map(self, session: str, cid: str) -> None:
        """The daemon handed ``session`` the handle of ``cid``'s segment."""
        sid = self.where[cid].segment_id
        self.b.note_mapped(sid, session)
        self.mapped.setdefault(sid, set()).add(session)

    @rule()
    def open_session(self) -> None:
        if len(self.sessions) >= MAX_SESSIONS:
            return
        self.session_serial += 1
        session = f"p{self.session_serial}"
        self.sessions.append(session)
        self.inbox[session] = []

    @rule(index=st.integers(0, 10**6), pool=st.sampled_from(sorted(SPEC)),
          size=st.one_of(small_sizes, sizes), pinned=st.integers(0, 3), retain=st.booleans(),
          backend=st.integers(0, 9))
    def session_allocate(self, index, pool, size, pinned, retain, backend) -> None:
        session = self._holder(f"#{index}")
        outcome, cid = self._allocate(pool, size, session, pinned == 0, retain, None, None,
                                      False, backend)
        if outcome == "ok":
            self._map(session, cid)

    @rule(op=st.sampled_from(["attach", "attach", "pin", "unpin", "release", "unmap"]),
          index=st.integers(0, 10**6), which=st.integers(0, 10**6))
    def session_op(self, op, index, which) -> None:
        session = self._session(index)
        if session is None:
            return
        live = sorted(self.pattern)
        if op == "unmap":  # a voluntary unmap (e.g. the client dropped its mapping)
            mapped = sorted(sid for sid, m in self.mapped.items() if session in m)
            if mapped:
                self._unmap(session, mapped[which % len(mapped)])
            return
        index = self.ids.index(live[which % len(live)]) if live and which % 5 else which
        if op in ("attach", "pin"):
            cid = getattr(self, op)(index, session)
            if cid is not None:
                self._map(session, cid)
        elif op == "unpin":
            self.unpin(index, session)
        else:
            self._release(self.pick(index), session, force=which % 4 == 0)

    def _unmap(self, session: str, sid: int, generation: int | None = None) -> None:
        self._begin(set())
        expect_retire = False
        if sid in self.mem:
            assert generation is None or self.segment_pool[sid].generation == generation
            self.mapped.get(sid, set()).discard(session)
            expect_retire = sid in self.draining and not self.mapped.get(sid)
        got = self.b.note_unmapped(sid, session)
        if expect_retire:
            event("unmap: retired a drained segment")
            assert got is not None and got == self.segment_pool[sid], (sid, got)
            self._retired([got])
        else:
            assert got is None, f"note_unmapped retired {got} unexpectedly"
        self._settle()

    @rule(index=st.integers(0, 10**6), which=st.integers(0, 10**6))
    def unmap_retired(self, index, which) -> None:
        """A session acts on a SEGMENT_RETIRED it received: it unmaps the segment."""
        sessions = [s for s in self.sessions if self.inbox[s]]
        if not sessions:
            return
        session = sessions[index % len(sessions)]
        sid, generation = self.inbox[session].pop(which % len(self.inbox[session]))
        self._unmap(session, sid, generation)

    @rule(index=st.integers(0, 10**6))
    def crash_session(self, index) -> None:
        session = self._session(index)
        if session is not None:
            self._end_session(session)

    def _end_session(self, session: str) -> None:
        """The session's stream broke or its lease ran out."""
        self._begin(set())
        held = {cid for cid, rec in self.records.items() if session in rec.holders}
        alone = {cid for cid in held
                 if self.records[cid].holders == {session} and not self.records[cid].retain
                 and self.records[cid].state != "pending"}
        expected_freed = self._drop_holder_model(session)
        expected_retired = set()
        for sid, mappers in self.mapped.items():
            if session in mappers:
                mappers.discard(session)
                if sid in self.draining and not mappers:
                    expected_retired.add(sid)
        freed, retired = self.b.end_session(session)
        assert sorted(freed) == expected_freed, (freed, expected_freed)
        assert {s.segment_id for s in retired} == expected_retired
        if retired:
            event("crash: retired drained segments")
        self._retired(retired)
        self.sessions.remove(session)
        del self.inbox[session]
        self.waiting = [w for w in self.waiting if w[0][2] != session]
        for c in self.b.caches():
            rec = self.b._ledger.caches.records[c.cache_id]
            assert session not in c.holders and session not in rec.pins, c.cache_id
        for cid in alone:
            assert not any(c.cache_id == cid for c in self.b.caches()), f"{cid} outlived its session"
        for seg in self.b._ledger.segments:
            assert session not in seg.mappers, f"segment {seg.info.segment_id} still lists ended {session}"
        self._settle()

    # -- waiting ----------------------------------------------------------------------

    def _release_all(self, pool: str | None, pinned_too: bool) -> None:
        """Free every cache (of ``pool``), pinned ones only with ``pinned_too``: the
        holders release them, retained ones are released by force."""
        self._begin(set())
        for cid in sorted(self.records):
            rec = self.records[cid]
            if pool is not None and rec.pool != pool:
                continue
            if self.pin_count(cid):
                if not pinned_too:
                    continue
                for h in sorted(rec.holders | {h for (c, h) in self.pins if c == cid}):
                    assert self.b.release(cid, h) is self._release_model(cid, h, False)
                    if cid not in self.records:
                        break
                if cid not in self.records:
                    continue
            # Unpinned now: one forced release frees it, whoever holds or retains it; an
            # evicted one goes when its last holder releases it.
            for h in sorted(rec.holders or {""}):
                assert self.b.release(cid, h, force=True) is self._release_model(cid, h, True)
                if cid not in self.records:
                    break
        self.pins += Counter()
        self._settle()

    def _unmap_all_drained(self) -> None:
        """Every session unmaps every segment it was told to (drains the events first)."""
        self.drain_events()
        for session in list(self.sessions):
            while self.inbox[session]:
                sid, generation = self.inbox[session].pop()
                self._unmap(session, sid, generation)
        assert not self.draining, f"still draining after every mapper unmapped: {self.draining}"

    def _retry(self, args: tuple) -> tuple[str, object]:
        """Retry a queued request as the daemon does: when it fails while segments drain,
        the sessions unmap them and it is tried again."""
        if args[2] not in HOLDERS and args[2] not in self.inbox:
            args = (args[0], args[1], "", *args[3:])  # its session ended meanwhile
        for _ in range(3):
            outcome = self._allocate(*args, backend=1, record=False)
            if outcome[0] != "exhausted" or not self.draining:
                break
            self._unmap_all_drained()
        if outcome[0] == "ok" and args[2] in self.inbox:
            self._map(args[2], outcome[1])
        return outcome

    def _finish_all(self) -> None:
        """The daemon's work in flight ends: pending caches become ready, compactions
        commit whole."""
        for cid in sorted(self.pending):
            self._finish(cid, "ready")
        while self.active:
            self._end_compaction(self.active[0], None)

    def _empty(self) -> None:
        """Every session ends, every cache is released and every segment goes idle."""
        self._finish_all()
        for session in list(self.sessions):
            self._end_session(session)
        self._release_all(None, pinned_too=True)
        self.retire_idle(0, 0)
        assert not self.records and not self.mem and not self.draining

    @rule(which=st.integers(0, 10**6), depth=st.integers(1, 3))
    def wait_for_room(self, which, depth) -> None:
        """A request that failed waits; once what stood in its way is gone, it fits.

        Releasing the pool's own unpinned caches (step 1) is not always enough, and is not
        asserted: other pools' pinned or higher-priority caches, their min_bytes, and the
        pool's own empty segments on another device (they hold its quota until idle
        retirement) may stand in the way. Step 2 leaves only pinned caches; step 3
        nothing."""
        if not self.waiting:
            return
        self._finish_all()
        args, satisfiable = self.waiting.pop(which % len(self.waiting))
        pool, size, _, _, _, _, hint, _ = args
        if not satisfiable:
            # Unsatisfiable: it fails the same way now, and on an empty broker.
            if depth == 3:
                self._empty()
            outcome = self._retry(args)
            assert outcome[0] == "exhausted" and not outcome[1].satisfiable, outcome
            event("wait: unsatisfiable stays unsatisfiable")
            return
        # 1. Release the pool's unpinned caches; unmap what drained.
        self._release_all(pool, pinned_too=False)
        self._unmap_all_drained()
        if self._retry(args)[0] != "exhausted":
            event("wait: fits once the pool's caches are released")
            return
        if depth == 1:
            return
        # 2. Release every unpinned cache and retire idle segments: only pinned caches
        # (the pool's, for its quota, or any on the request's devices) can stand in the way.
        self._release_all(None, pinned_too=False)
        self.retire_idle(0, 0)
        self._unmap_all_drained()
        if self._retry(args)[0] != "exhausted":
            event("wait: fits once every unpinned cache is released")
            return
        devices = [hint] if hint in SPEC[pool].devices else list(SPEC[pool].devices)
        assert any(
            rec.pool == pool or self.segment_pool[self.where[cid].segment_id].device_id in devices
            for cid, rec in self.records.items() if self.pin_count(cid)
        ), f"{args} still fails with no pinned cache in its way"
        if depth == 2:
            return
        # 3. Everything released: an empty broker takes any satisfiable request.
        self._empty()
        outcome = self._retry(args)
        assert outcome[0] == "ok", f"{args} does not fit an empty broker: {outcome}"
        event("wait: fits an empty broker")

    # -- work outside the daemon's lock -----------------------------------------------

    @rule(pool=st.sampled_from(sorted(SPEC)), size=st.one_of(small_sizes, sizes), holder=ANY_HOLDER,
          pinned=st.booleans(), retain=st.booleans())
    def allocate_pending(self, pool, size, holder, pinned, retain) -> None:
        """Place a cache and leave it pending while other rules run."""
        self._allocate(pool, size, self._holder(holder), pinned, retain, None, None, False, 3)

    @rule(which=st.integers(0, 10**6),
          action=st.sampled_from(["ready", "ready", "create", "abort", "release"]))
    def finish_pending(self, which, action) -> None:
        if not self.pending:
            return
        cid = sorted(self.pending)[which % len(self.pending)]
        self._finish(cid, action)
        if cid in self.pattern:
            for holder in sorted(self.records[cid].holders):
                self._handed(holder, cid)

    @rule(device=st.sampled_from([None, "d0", "d1"]), pool=st.sampled_from([None, "a", "b", "c", "e"]),
          fragment=st.integers(0, 6), size=small_sizes)
    def begin_compaction(self, device, pool, fragment, size) -> None:
        """Begin a compaction; other rules run while its bytes are copied. With
        ``fragment`` >= 2, first punch holes into a run of that many caches."""
        if fragment >= 2 and device and pool in SPEC and device in SPEC[pool].devices:
            self.fill_and_punch(pool, fragment, size, device, "", 0, False)
        plan = self.b.plan_compaction(device=device, pool=pool)
        if not plan.moves:
            return
        arenas = {self._arena(self.where[m.cache_id]) for m in plan.moves}
        assert not arenas & self._frozen(), "a plan moves caches of a frozen arena"
        self._begin(set())
        self.b.begin_compaction(plan)
        self.active.append(Active(plan, arenas))
        event("compaction: begun")
        try:
            self.b.begin_compaction(plan)
        except FailedPrecondition:
            pass
        else:
            raise AssertionError("a compaction was begun twice")
        self._settle()

    @rule(which=st.integers(0, 10**6), how=st.sampled_from(["all", "prefix", "prefix", "abort"]),
          k=st.integers(0, 10**6))
    def finish_compaction(self, which, how, k) -> None:
        """The copy ended: all moves done, a prefix (the copy failed at move k), or none."""
        if not self.active:
            return
        active = self.active[which % len(self.active)]
        count = None if how == "all" else 0 if how == "abort" else k % (len(active.plan.moves) + 1)
        event(f"compaction: {how}")
        self._end_compaction(active, count)

    def _end_compaction(self, active: Active, count: int | None) -> None:
        plan = active.plan
        self._begin(set(SPEC), drain_ok=True)
        self._apply_plan(plan, count)
        if count == 0:
            retired = self.b.abort_compaction(plan)
        else:
            retired = self.b.commit(plan, completed=count)
        self.active.remove(active)
        for cid in [c for c, ext in self.deferred.items() if self._arena(ext) in active.arenas]:
            event("compaction: deferred free")
            del self.deferred[cid]
        emptied = {sid for sid in plan.segments_emptied if not self._segment_caches(sid)}
        assert {s.segment_id for s in retired} == {sid for sid in emptied if not self.mapped.get(sid)}
        self._retired(retired)
        self._settle()
        assert self.drained_now == {sid for sid in emptied if self.mapped.get(sid)}
        self.check_bytes()

    # -- invariants -------------------------------------------------------------------

    @invariant()
    def accounting(self) -> None:
        audit(self.b)
        segments = {s.segment_id: s for s in self.b.segments()}
        assert set(segments) == set(self.mem), "segments differ from the backend's"
        assert not set(segments) & self.retired_ids, "a retired segment id came back"
        for sid, info in segments.items():
            assert info.nbytes == len(self.mem[sid])
        # Mappings: exactly the model's, only live sessions; draining exactly the model's.
        live = set(self.sessions)
        for seg in self.b._ledger.segments:
            sid = seg.info.segment_id
            assert seg.mappers == self.mapped.get(sid, set()), (sid, seg.mappers, self.mapped.get(sid))
            assert seg.mappers <= live, f"segment {sid} mapped by ended {seg.mappers - live}"
            assert seg.draining == (sid in self.draining), sid
            assert seg.creating == (sid in self.creating), sid
        # Every placed cache: resident and pending ones as the broker lists them, and those
        # freed in a frozen arena, whose bytes stay allocated until the compaction ends.
        placed = [(c.cache_id, c.extents[0]) for c in self.b.caches() if c.state is not CacheState.EVICTED]
        assert {cid: ext for cid, ext in placed} == {**self.where, **self.pending_at}
        by_segment: dict[int, list[tuple[int, int, str]]] = {}
        allocated_by_device: Counter[str] = Counter()
        for cid, ext in placed + list(self.deferred.items()):
            assert ext.segment_id not in self.draining, f"{cid} lives in a draining segment"
            assert ext.segment_id not in self.retired_ids, f"{cid} lives in a retired segment"
            by_segment.setdefault(ext.segment_id, []).append((ext.offset, ext.nbytes, cid))
            allocated_by_device[segments[ext.segment_id].device_id] += ext.nbytes
        for sid, spans in by_segment.items():
            spans.sort()
            end = 0
            for offset, nbytes, cid in spans:
                assert offset >= end, f"{cid} overlaps the cache before it"
                end = offset + nbytes
            assert end <= segments[sid].nbytes
        free_by_device: Counter[str] = Counter()
        draining_by_device: Counter[str] = Counter()
        for sid, info in segments.items():
            if sid in self.draining:
                draining_by_device[info.device_id] += info.nbytes
                continue
            used = sum(n for _, n, _ in by_segment.get(sid, []))
            if sid in self.creating:  # its bytes beyond its one cache are withheld
                assert [o for o, _, _ in by_segment[sid]] == [0], sid
                free_by_device[info.device_id] += info.nbytes - used
                continue
            free = self.b._pools[info.pool].arenas[info.device_id].free.segment_free_bytes(sid)
            assert used + free == info.nbytes, f"segment {sid}: {used} + {free} != {info.nbytes}"
            free_by_device[info.device_id] += free
        stats = self.b.stats()
        for d in stats.devices:
            u = d.usage
            in_segments = sum(s.nbytes for s in segments.values() if s.device_id == d.device_id)
            assert u.reserved_bytes == in_segments <= u.capacity_bytes == CAPACITY[d.device_id]
            assert u.allocated_bytes == allocated_by_device[d.device_id]
            assert (u.allocated_bytes + free_by_device[d.device_id] + draining_by_device[d.device_id]
                    == in_segments)
            assert u.free_bytes == u.capacity_bytes - u.allocated_bytes
            assert 0.0 <= u.fragmentation_ratio < 1.0 and 0.0 <= u.utilization_ratio <= 1.0
            assert u.fragmentation_within_segments_ratio + u.fragmentation_across_segments_ratio == pytest.approx(
                u.fragmentation_ratio, abs=1e-9)
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
            assert info.state in (CacheState.RESIDENT, CacheState.PENDING) and info.extents == (ext,), cid
            assert info.pin_count == self.pin_count(cid)

    @invariant()
    def check_bytes(self) -> None:
        for cid, ext in self.where.items():
            data = self.mem[ext.segment_id][ext.offset:ext.offset + ext.nbytes]
            assert data == self.pattern[cid], f"bytes of {cid} changed"


BrokerMachine.TestCase.settings = settings(
    max_examples=300, stateful_step_count=50, deadline=None
)
TestBrokerMachine = BrokerMachine.TestCase
