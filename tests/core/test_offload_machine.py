"""The offload protocol driven as a state machine, with a byte-level replay.

A ``RuleBasedStateMachine`` runs a pool that offloads (host then disk, small budgets so
both fill up) beside one that does not, on one device, through allocations (their
compaction plans copied and committed), attach and pin (restoring OFFLOADED caches,
some restores failing their copy-in and aborted), release, unpin, background
reclamation, and the engine's copy-outs as steps of their own that end (or fail) in any
order while other rules run. Every cache writes a unique pattern; copy-outs read it from
the extent into a model tier, restores write it back into the new extent. After every
step: ``audit`` (the accounting is exact, tiers within their budgets), every RESIDENT
and offloading cache's bytes are its pattern, every OFFLOADED cache's tier copy is its
pattern (no byte lost), and a pinned cache is never offloading or OFFLOADED.
"""

from __future__ import annotations

from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from kvbroker.core import AllocationRequest, Broker, CacheState, DeviceSpec, FailedPrecondition, PoolSpec, ResourceExhausted
from kvbroker.core.audit import audit
from kvbroker.core.offload import COPY_OUT, DISCARD

K = 1024
POOLS = (
    PoolSpec("o", ("d",), max_bytes=32 * K, block_bytes=4 * K, segment_bytes=16 * K, gc_threshold=0.7,
             offload=("host", "disk")),
    PoolSpec("n", ("d",), max_bytes=24 * K, block_bytes=4 * K, segment_bytes=8 * K, eviction_policy="lfu"),
)  # fmt: skip
BUDGETS = {"host": 12 * K, "disk": 20 * K}
HOLDERS = st.sampled_from(["h1", "h2", "h3"])


class OffloadMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.b = Broker([DeviceSpec("d", 48 * K, 4 * K)], POOLS, offload_budgets=BUDGETS)
        self.mem: dict[int, bytearray] = {}
        self.pattern: dict[str, bytes] = {}
        self.tier: dict[str, bytes] = {}  # the engine's copies, by cache id
        self.copying: list = []  # COPY_OUT jobs in flight
        self.ids: list[str] = []
        self.serial = 0

    # -- the engine's part ------------------------------------------------------------

    def _segment(self, info) -> None:
        if info is not None and info.segment_id not in self.mem:
            self.mem[info.segment_id] = bytearray(info.nbytes)
            self.b.segment_created(info.segment_id)

    def _run(self, plan) -> None:
        self.b.begin_compaction(plan)
        for move in plan.moves:
            src, dst = move.source, move.destination
            data = bytes(self.mem[src.segment_id][src.offset : src.offset + src.nbytes])
            self.mem[dst.segment_id][dst.offset : dst.offset + dst.nbytes] = data
        self._forget(self.b.commit(plan))

    def _forget(self, segments) -> None:
        for seg in segments:
            self.mem.pop(seg.segment_id, None)

    def _place(self, place):
        """Run the core's placement, its compaction plans included; None when no room."""
        for _ in range(8):
            try:
                result = place()
            except ResourceExhausted:
                self._settle()
                return None
            self._forget(result.retired_segments)
            if result.compaction is None:
                self._segment(result.new_segment)
                return result
            self._run(result.compaction)
        raise AssertionError("placement did not settle")

    def _write(self, cache_id: str, data: bytes) -> None:
        extent = self.b.get(cache_id).extents[0]
        self.mem[extent.segment_id][extent.offset : extent.offset + len(data)] = data

    def _read(self, cache_id: str) -> bytes:
        info = self.b.get(cache_id)
        extent = info.extents[0]
        return bytes(self.mem[extent.segment_id][extent.offset : extent.offset + info.nbytes])

    def _settle(self) -> None:
        """The engine's ``_settle``: start copy-outs, drop discarded copies."""
        for job in self.b.offload.drain_jobs():
            if job.kind == COPY_OUT:
                assert self.b.get(job.cache_id).pin_count == 0, "a pinned cache is never offloaded"
                self.copying.append(job)
            else:
                assert job.kind == DISCARD
                self.tier.pop(job.cache_id, None)
        self.b.drain_events()

    # -- rules ------------------------------------------------------------------------

    @rule(pool=st.sampled_from(["o", "o", "n"]), size=st.integers(1, 12 * K), holder=HOLDERS,
          retain=st.booleans(), pinned=st.sampled_from([False, False, False, True]))  # fmt: skip
    def allocate(self, pool, size, holder, retain, pinned):
        request = AllocationRequest(pool, size, holder=holder, retain=retain, pinned=pinned)
        result = self._place(lambda: self.b.allocate(request))
        self._settle()
        if result is None and self.copying:  # the engine waits for the copy-outs, then retries
            while self.copying:
                self.copy_out_ends(0, False)
            result = self._place(lambda: self.b.allocate(request))
            self._settle()
        if result is None:
            return
        cache_id = result.cache.cache_id
        self.serial += 1
        self.pattern[cache_id] = bytes((self.serial * 31 + i) % 256 for i in range(result.cache.nbytes))
        if self.b.cache_ready(cache_id):
            self._write(cache_id, self.pattern[cache_id])
            self.ids.append(cache_id)
        self._settle()

    @rule(pool=st.just("o"), size=st.integers(1, 12 * K), holder=HOLDERS, retain=st.booleans(),
          pinned=st.just(False))
    def allocate_more(self, pool, size, holder, retain, pinned):
        """Allocations in the offloading pool twice as often: pressure, so offloads."""
        self.allocate(pool, size, holder, retain, pinned)

    @rule(index=st.integers(0, 100), fail=st.sampled_from([False, False, False, True]))
    def copy_out_ends(self, index, fail):
        if not self.copying:
            return
        job = self.copying.pop(index % len(self.copying))
        info = self.b.get(job.cache_id)
        assert info.extents[0] == job.extent, "an offloading cache never moves"
        data = bytes(self.mem[job.extent.segment_id][job.extent.offset : job.extent.offset + job.nbytes])
        assert data == self.pattern[job.cache_id], "the copy-out reads the cache's own bytes"
        if fail:
            self.b.offload.fail(job.cache_id, "injected")
            event("copy-out failed")
        else:
            self.tier[job.cache_id] = data
            event("offloaded" if self.b.offload.finish(job.cache_id) else "offloaded, but freed meanwhile")
        self._settle()

    @rule(index=st.integers(0, 100), holder=HOLDERS, pin=st.sampled_from([False, False, True]),
          fill_fails=st.sampled_from([False, False, True]))  # fmt: skip
    def use(self, index, holder, pin, fill_fails):
        """Attach or pin, restoring an OFFLOADED cache first (as the engine does); an
        offloaded cache is picked when there is one."""
        offloaded = [c.cache_id for c in self.b.caches(state=CacheState.OFFLOADED)]
        if not self.ids:
            return
        cache_id = offloaded[index % len(offloaded)] if offloaded and index % 4 else self.ids[index % len(self.ids)]
        try:
            info = self.b.get(cache_id)
        except Exception:
            return
        if info.state is CacheState.OFFLOADED:
            result = self._place(lambda: self.b.offload.place_restore(cache_id, holder))
            self._settle()
            if result is None and self.copying:  # as an allocation: wait for the copy-outs, retry
                while self.copying:
                    self.copy_out_ends(0, False)
                if self.b.get(cache_id).state is CacheState.OFFLOADED:
                    result = self._place(lambda: self.b.offload.place_restore(cache_id, holder))
                    self._settle()
            if result is None:
                return
            if fill_fails:
                self.b.abort_allocation(result)
                event("restore aborted")
                assert self.b.get(cache_id).state is CacheState.OFFLOADED
                self._settle()
                return
            self._write(cache_id, self.tier[cache_id])
            event("restored")
            if not self.b.cache_ready(cache_id):
                self._settle()
                return
            self._settle()
        try:
            self.b.pin(cache_id, holder) if pin else self.b.attach(cache_id, holder)
        except FailedPrecondition:
            pass  # evicted, or being offloaded (the engine waits for the copy-out)
        self._settle()

    @rule(index=st.integers(0, 100), holder=HOLDERS, force=st.booleans())
    def release(self, index, holder, force):
        if not self.ids:
            return
        try:
            self.b.release(self.ids[index % len(self.ids)], holder, force=force)
        except FailedPrecondition:
            pass  # pinned by another holder
        except Exception:
            return
        self._settle()

    @rule(index=st.integers(0, 100), holder=HOLDERS)
    def unpin(self, index, holder):
        if not self.ids:
            return
        try:
            self.b.unpin(self.ids[index % len(self.ids)], holder)
        except Exception:
            return
        self._settle()

    @rule(idle_only=st.booleans())
    def operator_evicts(self, idle_only):
        """``kvbroker evict``: resident and offloaded caches of the pool go (pinned stay)."""
        before = {c.cache_id for c in self.b.caches(pool="o", state=CacheState.OFFLOADED)}
        self.b.admin.evict("o", idle_only=idle_only)
        self._settle()
        left = {c.cache_id for c in self.b.caches(pool="o", state=CacheState.OFFLOADED)}
        assert not left - before and (idle_only or not left)

    @rule()
    def reclaim(self):
        self.b.reclaim()
        self._settle()

    # -- invariants -------------------------------------------------------------------

    @invariant()
    def accounting_is_exact_and_no_byte_is_lost(self):
        audit(self.b)
        offloading = {job.cache_id for job in self.copying}
        for info in self.b.caches():
            if info.state is CacheState.RESIDENT:
                assert self._read(info.cache_id) == self.pattern[info.cache_id], info.cache_id
            if info.state is CacheState.OFFLOADED:
                assert self.tier[info.cache_id] == self.pattern[info.cache_id], info.cache_id
            if info.pin_count:
                assert info.state is CacheState.RESIDENT and info.cache_id not in offloading, info.cache_id
        assert sum(self.b.offload.used.values()) <= sum(BUDGETS.values())


TestOffloadMachine = OffloadMachine.TestCase
TestOffloadMachine.settings = settings(max_examples=300, stateful_step_count=50, deadline=None)
