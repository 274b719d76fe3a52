"""Operators' actions on a pool: evict its caches now, change its limits at run time.

Both act through the same rules as the pressure ladder (``pressure``): a pinned cache,
a PENDING one and anything in an arena a compaction freezes are never touched; an
eviction bumps the cache's epoch and tells its holders (EVICTED); memory goes back to
the device a whole segment at a time, at once when no session maps it, else after its
mappers unmap it (SEGMENT_RETIRED, then ``note_unmapped``).

**Evict** (``evict``): every unpinned resident cache of the pool, in the pool's policy
order, or with ``idle_only`` only the retained caches nobody holds (what the ladder's
first step takes). Emptied segments stay with the pool (the idle-segment rule gives them
back later), as after any eviction.

**Limits** (``set_limits``): ``priority`` and ``min_bytes`` apply at once (existing
caches keep their own priority; ``min_bytes`` only guards what the pool keeps). A
``max_bytes`` at or above the bytes the pool keeps in segments applies at once (it is
capped, like the configuration's, at the capacity of the pool's devices). A lower one
must give segments back, so segments are chosen first and acted on after (nothing is
destroyed for a change that cannot complete): empty segments first, then those holding
only idle retained caches, then those with the fewest cache bytes; a segment with a
pinned or PENDING cache is never chosen. When the chosen segments cannot bring the pool
down to the new maximum, the change is refused (``FailedPrecondition``, with the lowest
maximum reachable now) and nothing changes. ``dry_run`` answers what would happen.

Nothing here is persisted: a restart starts from the configuration again (the engine
logs every change). Cost: O(caches of the pool) for an eviction or a lowered maximum,
O(1) otherwise: operators' calls, never on a request's path.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import NamedTuple

from kvbroker.core.errors import FailedPrecondition, InvalidArgument, NotFound, echo
from kvbroker.core.ledger import Ledger
from kvbroker.core.placement import PRIORITY_RANGE, find_pool
from kvbroker.core.pressure import victims
from kvbroker.core.records import CacheRecord, PoolRecord, SegmentRecord
from kvbroker.core.types import CacheState, PoolSpec, SegmentInfo

#: The eviction cause (``EVICTION_CAUSES``) of every eviction made here.
OPERATOR_CAUSE = "operator"
_ANY_PRIORITY = PRIORITY_RANGE[1]


class Evicted(NamedTuple):
    """What ``evict`` did: the evicted ids (policy order), their block-rounded bytes,
    and the live caches of the scope it left (pinned, pending, held with ``idle_only``)."""

    cache_ids: tuple[str, ...]
    nbytes: int
    kept: int


class LimitsChange(NamedTuple):
    """What ``set_limits`` did (or, ``dry_run``, would do): the pool's spec before and
    after (``max_bytes`` effective, never None), the caches evicted to shrink it and
    their bytes, the segments retired now (the backend frees them) and those left
    draining until their mappers unmap them."""

    before: PoolSpec
    after: PoolSpec
    evicted: tuple[str, ...]
    evicted_bytes: int
    retired: tuple[SegmentInfo, ...]
    draining: tuple[SegmentInfo, ...]
    dry_run: bool


class PoolAdmin:
    """The operators' actions on pools, over the broker's ledger (see the module docstring)."""

    def __init__(self, ledger: Ledger) -> None:
        self._ledger = ledger

    def evict(self, pool: str, *, idle_only: bool = False, device: str | None = None) -> Evicted:
        """Evict the pool's unpinned resident caches (on ``device`` only, when given),
        or only its idle retained ones; without ``device``, its offloaded ones (or its
        idle retained offloaded ones) too, their tier copies dropped. Raises ``InvalidArgument``/``NotFound`` for an
        unknown pool or a device the pool does not use."""
        record = find_pool(self._ledger.pools, pool)
        arenas = [a for d, a in record.arenas.items() if device is None or d == device]
        if not arenas:
            raise NotFound(f"pool {pool!r} uses no device {echo(device)} (devices: {', '.join(record.arenas)})")
        evicted: list[str] = []
        nbytes = 0
        reason = "evicted by an operator" + (" (idle retained caches)" if idle_only else "")
        for arena in arenas:
            if arena.compaction is not None:
                continue  # its caches are being moved; the engine waits for it first
            for rec in list(victims(self._ledger, arena, 0, _ANY_PRIORITY, idle_only=idle_only)):
                if rec.state is CacheState.RESIDENT and not rec.pin_count:
                    nbytes += rec.reserved_bytes
                    evicted.append(rec.cache_id)
                    self._ledger.evict(rec, reason, cause=OPERATOR_CAUSE)
        if device is None:  # offloaded caches are on no device; their tier copies go too
            for rec in [r for r in self._ledger.caches.records.values() if r.pool is record]:  # O(caches)
                if rec.state is CacheState.OFFLOADED and not (idle_only and (rec.holders or not rec.retain)):
                    evicted.append(rec.cache_id)
                    self._ledger.tiers.lose(rec.cache_id, reason)
        return Evicted(tuple(evicted), nbytes, sum(a.live_caches for a in arenas))

    def set_limits(
        self, pool: str, *, max_bytes: int | None = None, min_bytes: int | None = None,
        priority: int | None = None, dry_run: bool = False,
    ) -> LimitsChange:  # fmt: skip
        """Change the pool's limits (None: keep). Raises ``InvalidArgument`` naming the
        field, ``NotFound``, and ``FailedPrecondition`` when a lower ``max_bytes`` cannot
        be reached without touching pinned or pending caches (nothing changes then)."""
        record = find_pool(self._ledger.pools, pool)
        before = dataclasses.replace(record.spec, max_bytes=record.max_bytes)
        after = _new_spec(record, before, max_bytes, min_bytes, priority)
        chosen = _segments_to_free(record, after.max_bytes) if after.max_bytes < record.kept_bytes else []
        victims_ = [rec for seg in chosen for rec in seg.caches.values()]
        evicted = tuple(rec.cache_id for rec in victims_)
        nbytes = sum(rec.reserved_bytes for rec in victims_)
        if dry_run:
            would_drain = tuple(s.info for s in chosen if s.mappers)
            return LimitsChange(before, after, evicted, nbytes, tuple(s.info for s in chosen if not s.mappers),
                                would_drain, True)  # fmt: skip
        reason = f"pool {pool!r} max_bytes lowered to {after.max_bytes} by an operator"
        retired: list[SegmentInfo] = []
        draining: list[SegmentInfo] = []
        for seg in chosen:
            for rec in list(seg.caches.values()):
                self._ledger.evict(rec, reason, cause=OPERATOR_CAUSE)
            if seg.mappers:
                self._ledger.drain(seg, reason)
                draining.append(seg.info)
            else:
                retired.append(self._ledger.retire(seg))
        record.spec, record.max_bytes = after, after.max_bytes
        self._ledger.changed()
        return LimitsChange(before, after, evicted, nbytes, tuple(retired), tuple(draining), False)


def _new_spec(
    record: PoolRecord, before: PoolSpec, max_bytes: int | None, min_bytes: int | None, priority: int | None
) -> PoolSpec:
    """The spec after the change, every field checked with its wire name."""
    capacity = sum(a.device.spec.capacity_bytes for a in record.arenas.values())
    for name, value in (("max_bytes", max_bytes), ("min_bytes", min_bytes), ("priority", priority)):
        if value is not None and type(value) is not int:
            raise InvalidArgument(name, f"must be an integer, got {echo(value)}")
    if max_bytes is not None and max_bytes <= 0:
        raise InvalidArgument("max_bytes", f"must be positive, got {max_bytes}")
    if min_bytes is not None and min_bytes < 0:
        raise InvalidArgument("min_bytes", f"must be >= 0, got {min_bytes}")
    if priority is not None and not PRIORITY_RANGE[0] <= priority <= PRIORITY_RANGE[1]:
        raise InvalidArgument("priority", f"must be a 32-bit integer, got {echo(priority)}")
    new_max = before.max_bytes if max_bytes is None else min(max_bytes, capacity)
    new_min = before.min_bytes if min_bytes is None else min_bytes
    if new_min > capacity:
        raise InvalidArgument("min_bytes", f"{_sized(new_min)} exceeds the capacity of the pool's devices "
                              f"({_sized(capacity)})")  # fmt: skip
    if new_min > new_max:
        field, other = ("min_bytes", "max_bytes") if min_bytes is not None else ("max_bytes", "min_bytes")
        raise InvalidArgument(field, f"the pool's min_bytes ({_sized(new_min)}) would exceed its max_bytes "
                              f"({_sized(new_max)}); change {other} too")  # fmt: skip
    return dataclasses.replace(
        before, max_bytes=new_max, min_bytes=new_min, priority=before.priority if priority is None else priority
    )


def _segments_to_free(record: PoolRecord, new_max: int) -> list[SegmentRecord]:
    """Segments whose release brings the pool's kept bytes down to ``new_max``, in the
    order of the module docstring. Raises ``FailedPrecondition`` when no choice does."""
    excess = record.kept_bytes - new_max
    idle: Callable[[CacheRecord], bool] = lambda rec: rec.retain and not rec.holders  # noqa: E731
    candidates = sorted(
        (
            (not all(idle(r) for r in seg.caches.values()), sum(r.reserved_bytes for r in seg.caches.values()),
             bool(seg.mappers), seg.info.segment_id, seg)
            for arena in record.arenas.values() if arena.compaction is None
            for seg in arena.segments.values()
            if all(r.state is CacheState.RESIDENT and not r.pin_count and not r.offloading for r in seg.caches.values())
        ),
        key=lambda c: c[:4],
    )  # fmt: skip
    chosen, freed = [], 0
    for *_, seg in candidates:
        if freed >= excess:
            break
        chosen.append(seg)
        freed += seg.info.nbytes
    if freed < excess:
        lowest = record.kept_bytes - sum(c[-1].info.nbytes for c in candidates)
        raise FailedPrecondition(
            f"pool {record.spec.name!r} keeps {_sized(record.kept_bytes)} in segments and cannot give back "
            f"{_sized(excess)} without touching pinned or pending caches (or a compaction in flight); the "
            f"lowest max_bytes possible now is {_sized(lowest)}: unpin or release caches first"
        )
    return chosen


def _sized(nbytes: int) -> str:
    """``"1.50 GiB (1610612736 bytes)"``: for people, and exact."""
    value, unit = float(nbytes), "bytes"
    for name in ("KiB", "MiB", "GiB", "TiB"):
        if value < 1024:
            break
        value, unit = value / 1024, name
    return f"{nbytes} bytes" if unit == "bytes" else f"{value:.2f} {unit} ({nbytes} bytes)"
