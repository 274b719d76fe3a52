"""The offload tier: where a pool's unpinned caches go instead of being evicted.

A pool with ``PoolSpec.offload`` (``"host"``, ``"disk"`` or both, host first) keeps its
caches' bytes when the pressure ladder or background reclamation would evict them
(causes ``OFFLOAD_CAUSES``): the cache is copied out to the first tier with room, and
its record stays, OFFLOADED, until an attach or pin restores it. Only when no tier has
room is the cache finally evicted. Operators' evictions, a pool's segment taken by
another pool (``cause="reclaim"``: the segment leaves at once) and a failed copy-out
still evict.

The life of one offload, as core states (the engine copies between them, in threads):

1. ``begin`` (from ``Ledger.evict``): the cache stays RESIDENT with ``offloading`` set,
   its extent occupied (a copy is reading it), out of its policy, never moved; its tier
   bytes are counted at once, so two offloads never overbook a tier. A ``COPY_OUT`` job
   is queued for the engine. Attach and pin wait; a last release marks it ``doomed``.
2. ``finish``: the copy is whole: the extent goes back to free space, the cache is
   OFFLOADED (no extent, epoch bumped, holders told MOVED: their next use attaches,
   which restores). A doomed one is freed instead and its copy discarded.
   ``fail``: the copy failed: the cache is evicted (as it would have been).
3. ``place_restore``: an attach of an OFFLOADED cache places it like an allocation
   (same ladder, same compaction plans); it becomes PENDING with ``restoring`` set in
   its new extent, the engine copies the bytes in, and ``Broker.cache_ready`` makes it
   RESIDENT (``restored``: the tier copy is discarded, epoch bumped, holders told MOVED)
   or ``abort_restore`` puts it back to OFFLOADED, its copy intact (freed instead when
   its holders left meanwhile). An operator's ``kvbroker evict`` of the pool drops its
   OFFLOADED caches too (``lose``).

Accounting (checked by ``audit``): each tier's ``used`` is the ``nbytes`` of the caches
whose ``tier`` names it (offloading, OFFLOADED or restoring), never above its budget; an
arena's ``offloading_bytes`` is the reserved bytes of its offloading caches. Cost: O(1)
per step, O(tiers) to choose one.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple, Protocol

from kvbroker.core.arena import occupy
from kvbroker.core.caches import Gone
from kvbroker.core.errors import FailedPrecondition, InvalidArgument
from kvbroker.core.freespace import segment_of
from kvbroker.core.placement import Placer, candidate_arenas, find_room
from kvbroker.core.records import CacheRecord
from kvbroker.core.types import OFFLOAD_TIERS, AllocateResult, CacheState, EventKind, Extent

#: Eviction causes that offload instead, in a pool with ``offload`` and a tier with room.
OFFLOAD_CAUSES = frozenset({"idle", "policy", "threshold"})

COPY_OUT = "copy_out"
DISCARD = "discard"


class Ledger(Placer, Protocol):
    """The part of ``kvbroker.core.ledger.Ledger`` the protocol drives (a Protocol, so
    the ledger, which owns the tiers, is not imported back)."""

    caches: Any
    segments: Any
    devices: Any

    def changed(self) -> None: ...
    def free(self, rec: CacheRecord, gone: Gone | None) -> None: ...
    def give_back(self, rec: CacheRecord) -> None: ...
    def queue_event(self, kind: EventKind, rec: CacheRecord, reason: str) -> None: ...


class OffloadJob(NamedTuple):
    """Work for the engine. ``COPY_OUT``: copy ``nbytes`` at ``extent`` of ``device_id``
    to ``tier`` (then ``Broker.offload.finish`` or ``fail``). ``DISCARD``: drop the
    cache's copy in ``tier`` (it was restored or freed)."""

    kind: str
    cache_id: str
    tier: str
    pool: str = ""
    device_id: str = ""
    extent: Extent | None = None
    nbytes: int = 0


class Tiers:
    """The tiers' budgets and use, the engine's job queue, and the offload protocol."""

    def __init__(self, ledger: Ledger, budgets: Mapping[str, int] | None) -> None:
        budgets = dict(budgets or {})
        for tier, nbytes in budgets.items():
            if tier not in OFFLOAD_TIERS:
                raise InvalidArgument("offload", f"unknown tier {tier!r} (known: {', '.join(OFFLOAD_TIERS)})")
            if type(nbytes) is not int or nbytes < 0:
                raise InvalidArgument(f"{tier}_max_bytes", f"must be a whole number of bytes >= 0, got {nbytes!r}")
        self._ledger = ledger
        self.budgets = {tier: budgets.get(tier, 0) for tier in OFFLOAD_TIERS}
        self.used = dict.fromkeys(OFFLOAD_TIERS, 0)
        #: (pool, tier) -> bytes the pool's caches hold there.
        self.by_pool: dict[tuple[str, str], int] = {}
        self.jobs: list[OffloadJob] = []

    def drain_jobs(self) -> list[OffloadJob]:
        jobs, self.jobs = self.jobs, []
        return jobs

    # -- 1. begin ---------------------------------------------------------------------

    def begin(self, rec: CacheRecord) -> bool:
        """Offload ``rec`` (RESIDENT, unpinned, not moving) instead of evicting it, if
        its pool offloads and a tier has room. Returns whether it did."""
        tier = next((t for t in rec.pool.spec.offload if self.used[t] + rec.nbytes <= self.budgets[t]), None)
        if tier is None or rec.offloading:
            return False
        self._count(rec, tier, +1)
        rec.offloading = True
        rec.arena.offloading_bytes += rec.reserved_bytes
        rec.pool.policy.on_remove(rec.cache_id)
        extent = rec.extent
        self.jobs.append(OffloadJob(COPY_OUT, rec.cache_id, tier, rec.pool.spec.name, rec.device_id, extent, rec.nbytes))
        self._ledger.changed()
        return True

    # -- 2. finish or fail ------------------------------------------------------------

    def _offloading(self, cache_id: str) -> CacheRecord:
        rec = self._ledger.caches.get(cache_id)
        if rec is None or not rec.offloading:
            raise RuntimeError(f"cache {cache_id!r} is not being offloaded")
        if rec.arena.compaction is not None:
            raise RuntimeError(f"cache {cache_id!r}: its arena is frozen (wait for the compaction)")
        return rec

    def finish(self, cache_id: str) -> bool:
        """The copy-out is whole. Returns False when the cache was freed meanwhile (its
        copy is discarded: a ``DISCARD`` job follows)."""
        ledger = self._ledger
        rec = self._offloading(cache_id)
        self._stop(rec)
        if rec.doomed:
            rec.doomed = False
            rec.pool.policy.on_insert(rec.cache_id, rec.reserved_bytes)  # ``free`` removes it
            ledger.free(rec, Gone.RELEASED)
            return False
        ledger.give_back(rec)
        if rec.retain and not rec.holders:
            rec.arena.idle_retained -= 1  # no longer RESIDENT (``caches.retained_resident``)
        rec.state = CacheState.OFFLOADED
        rec.epoch += 1
        ledger.queue_event(EventKind.MOVED, rec, f"offloaded to the {rec.tier} tier")
        ledger.changed()
        return True

    def fail(self, cache_id: str, reason: str) -> None:
        """The copy-out failed: the cache is evicted (or freed, when doomed)."""
        ledger = self._ledger
        rec = self._offloading(cache_id)
        self._stop(rec)
        self._drop(rec)
        rec.pool.policy.on_insert(rec.cache_id, rec.reserved_bytes)
        if rec.doomed:
            rec.doomed = False
            ledger.free(rec, Gone.RELEASED)
        else:
            ledger.evict(rec, f"offload failed: {reason}", cause="policy", may_offload=False)

    def _stop(self, rec: CacheRecord) -> None:
        rec.offloading = False
        rec.arena.offloading_bytes -= rec.reserved_bytes

    # -- 3. restore -------------------------------------------------------------------

    def place_restore(self, cache_id: str, holder: str, *, allow_eviction: bool = True) -> AllocateResult:
        """Place an OFFLOADED cache again, for ``holder`` (who holds it from now on), as
        ``Broker.allocate`` places a new one (``find_room``); the result's cache is
        PENDING with ``restoring`` set, the engine copies its bytes in. Raises
        ``FailedPrecondition`` when it is not OFFLOADED, ``ResourceExhausted``."""
        ledger = self._ledger
        rec = ledger.caches.lookup(cache_id)
        if rec.state is not CacheState.OFFLOADED:
            raise FailedPrecondition(f"cache {cache_id!r} is not offloaded (it is {rec.state.value})")
        arenas = candidate_arenas(rec.pool, ledger.devices, None, rec.reserved_bytes)
        spot, arena, plan, evicted, retired = find_room(ledger, rec.pool, arenas, rec.reserved_bytes,
                                                        rec.priority, allow_eviction, True)  # fmt: skip
        if spot is None:
            return AllocateResult(None, plan, None, retired, evicted)
        addr, seg = spot
        ledger.caches.hold(rec, holder)  # first: an unheld record is listed by its old arena
        rec.arena, rec.device_id, rec.address = arena, arena.device.spec.device_id, addr
        rec.state, rec.restoring = CacheState.PENDING, True
        if seg.creating:
            arena.withheld_bytes -= rec.reserved_bytes
        reused = occupy(seg, rec)
        arena.pending_caches += 1
        ledger.changed()
        return AllocateResult(rec.info(), None, seg.info if seg.creating else None, retired, evicted, reused)

    def restored(self, rec: CacheRecord) -> None:
        """``Ledger.ready`` of a restoring cache: its tier copy goes, its holders re-map."""
        rec.restoring = False
        self._drop(rec)
        rec.epoch += 1
        self._ledger.queue_event(EventKind.MOVED, rec, "restored from its offload tier")

    def abort_restore(self, rec: CacheRecord) -> None:
        """The copy-in failed or was abandoned: back to OFFLOADED, its copy kept."""
        ledger = self._ledger
        seg = ledger.segments[segment_of(rec.address)]
        rec.arena.pending_caches -= 1
        ledger.give_back(rec)
        rec.state, rec.restoring = CacheState.OFFLOADED, False
        if seg.creating and not seg.caches:
            ledger.segments.discard(seg)
        if rec.doomed:  # its holders left meanwhile: nothing keeps it
            rec.doomed = False
            ledger.free(rec, Gone.RELEASED)
        ledger.changed()

    def tier_of(self, cache_id: str) -> str:
        """The tier holding ``cache_id``'s copy ("" for none)."""
        rec = self._ledger.caches.get(cache_id)
        return rec.tier if rec is not None else ""

    def lose(self, cache_id: str, reason: str) -> None:
        """An OFFLOADED cache's copy is unusable (it failed its checks): the cache is
        evicted (holders told EVICTED; forgotten now when nobody holds it)."""
        ledger = self._ledger
        rec = ledger.caches.get(cache_id)
        if rec is None or rec.state is not CacheState.OFFLOADED:
            return
        self._drop(rec)
        rec.state = CacheState.EVICTED
        rec.epoch += 1
        ledger.queue_event(EventKind.EVICTED, rec, reason)
        if not rec.holders:
            ledger.caches.forget(rec, Gone.EVICTED)
        ledger.changed()

    # -- copies that go ---------------------------------------------------------------

    def _drop(self, rec: CacheRecord) -> None:
        """Forget ``rec``'s tier copy (restored, freed, or never made): its bytes leave
        the tier's use and the engine discards it."""
        if rec.tier:
            self.jobs.append(OffloadJob(DISCARD, rec.cache_id, rec.tier, rec.pool.spec.name))
            self._count(rec, rec.tier, -1)

    def freed(self, rec: CacheRecord) -> None:
        """``Ledger.free`` of a cache with a tier copy."""
        self._drop(rec)

    def _count(self, rec: CacheRecord, tier: str, sign: int) -> None:
        self.used[tier] += sign * rec.nbytes
        key = (rec.pool.spec.name, tier)
        self.by_pool[key] = self.by_pool.get(key, 0) + sign * rec.nbytes
        rec.tier = tier if sign > 0 else ""

