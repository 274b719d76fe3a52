"""The segment table: every segment by id, who maps it, and its life cycle.

A segment is created (CREATING: the backend is making it; only the cache it was made
for lives in it, at offset 0, and its other bytes are withheld from placement), becomes
placeable (``created``: its free bytes join the arena's ``FreeSpace``), and goes back to
its device when empty: at once if no session maps it (``retire``), else it drains
(``drain``: out of placement, SEGMENT_RETIRED tells its mappers to unmap) until the last
mapper reports unmapping it. A creating segment whose backend failed is dropped
(``discard``) without ever being placeable. Segment ids (and generations) are never
reused.

Sessions' mappings are indexed both ways (segment -> mappers, holder -> segments), so a
session that ends costs O(its segments), not O(all segments).

``version`` counts structural changes (a segment added, made placeable, drained or
removed); with the ledger's own count it tells whether a compaction plan is stale.
Not thread-safe: one owner calls it.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator

from kvbroker.core.arena import reserve, unreserve
from kvbroker.core.errors import FailedPrecondition, NotFound
from kvbroker.core.records import ArenaRecord, SegmentRecord
from kvbroker.core.types import Event, EventKind, SegmentInfo, is_sessionless


class SegmentTable:
    __slots__ = ("_segments", "_mapped", "_ids", "_events", "_clock", "version")

    def __init__(self, events: list[Event], clock: Callable[[], float]) -> None:
        self._segments: dict[int, SegmentRecord] = {}
        self._mapped: dict[str, set[int]] = {}  # holder -> segment ids it maps
        self._ids = itertools.count(1)
        self._events = events
        self._clock = clock
        self.version = 0

    def __len__(self) -> int:
        return len(self._segments)

    def __iter__(self) -> Iterator[SegmentRecord]:
        return iter(self._segments.values())

    def __getitem__(self, segment_id: int) -> SegmentRecord:
        return self._segments[segment_id]

    def get(self, segment_id: int) -> SegmentRecord | None:
        return self._segments.get(segment_id)

    def lookup(self, segment_id: int) -> SegmentRecord:
        seg = self._segments.get(segment_id)
        if seg is None:
            raise NotFound(f"segment {segment_id} does not exist")
        return seg

    def mapped_by(self) -> dict[str, set[int]]:
        """The holder -> segments index itself (for ``audit``)."""
        return self._mapped

    # -- life cycle -------------------------------------------------------------------

    def create(self, arena: ArenaRecord, nbytes: int) -> SegmentRecord:
        """A new CREATING segment of ``nbytes``: reserved against the device and pool,
        withheld from placement until ``created``."""
        segment_id = next(self._ids)
        info = SegmentInfo(segment_id, segment_id, arena.pool.spec.name, arena.device.spec.device_id, nbytes)
        seg = SegmentRecord(info, arena, empty_since=self._clock(), creating=True)
        self._segments[segment_id] = seg
        arena.creating[segment_id] = seg
        arena.withheld_bytes += nbytes
        reserve(arena, nbytes)
        self.version += 1
        return seg

    def created(self, seg: SegmentRecord) -> None:
        """The backend created ``seg``: its withheld bytes become placeable. Cost: O(1)
        (its one cache is carved out of the fresh free extent at its start)."""
        if not seg.creating:
            raise RuntimeError(f"segment {seg.info.segment_id} is not being created")
        arena, segment_id, nbytes = seg.arena, seg.info.segment_id, seg.info.nbytes
        del arena.creating[segment_id]
        arena.segments[segment_id] = seg
        seg.creating = False
        arena.withheld_bytes -= nbytes - sum(rec.reserved_bytes for rec in seg.caches.values())
        arena.free.add_segment(segment_id, nbytes)
        for rec in seg.caches.values():
            arena.free.take_at(rec.address, rec.reserved_bytes)
        self.version += 1

    def discard(self, seg: SegmentRecord) -> None:
        """Drop a CREATING segment whose caches are gone (its creation failed or was
        cancelled): its bytes go back to the device, and nothing is left to free."""
        assert seg.creating and not seg.caches and not seg.mappers, seg.info
        arena = seg.arena
        del arena.creating[seg.info.segment_id], self._segments[seg.info.segment_id]
        arena.withheld_bytes -= seg.info.nbytes
        unreserve(arena, seg.info.nbytes)
        self.version += 1

    def retire(self, seg: SegmentRecord) -> SegmentInfo:
        """Give an empty, unmapped segment (placeable or draining) back to its device;
        the backend frees what is returned. Raises ``FailedPrecondition`` when it still
        holds caches or a session still maps it."""
        info = seg.info
        if seg.caches or seg.creating:
            raise FailedPrecondition(f"segment {info.segment_id} still holds {len(seg.caches)} caches")
        if seg.mappers:
            raise FailedPrecondition(f"segment {info.segment_id} is still mapped by {len(seg.mappers)} sessions")
        arena = seg.arena
        if seg.draining:
            del arena.draining[info.segment_id]
            arena.draining_bytes -= info.nbytes
        else:
            arena.free.remove_segment(info.segment_id)
            del arena.segments[info.segment_id]
        del self._segments[info.segment_id]
        unreserve(arena, info.nbytes)
        self.version += 1
        return info

    def drain(self, seg: SegmentRecord, reason: str) -> None:
        """Take an empty, mapped, placeable segment out of placement and tell its mappers
        to unmap it (SEGMENT_RETIRED); the last ``note_unmapped`` retires it."""
        info = seg.info
        if seg.caches or seg.creating or seg.draining:
            raise FailedPrecondition(f"segment {info.segment_id} cannot drain: it is not empty and placeable")
        arena = seg.arena
        arena.free.remove_segment(info.segment_id)
        del arena.segments[info.segment_id]
        arena.draining[info.segment_id] = seg
        arena.draining_bytes += info.nbytes
        seg.draining = True
        self._events.append(
            Event(EventKind.SEGMENT_RETIRED, frozenset(seg.mappers), segment_id=info.segment_id,
                  segment_generation=info.generation, reason=reason)
        )
        self.version += 1

    def release(self, seg: SegmentRecord, reason: str) -> SegmentInfo | None:
        """An empty segment goes back: retired now when unmapped (returned, for the
        backend to free), else drained (nothing to free yet)."""
        if not seg.mappers:
            return self.retire(seg)
        if not seg.draining:
            self.drain(seg, reason)
        return None

    def idle(self, idle_seconds: float) -> list[SegmentInfo]:
        """Release every placeable segment that has been empty for ``idle_seconds``,
        except in arenas a compaction freezes. Returns the retired ones. Cost:
        O(segments)."""
        now = self._clock()
        idle = [
            seg for seg in self._segments.values()
            if not seg.caches and not seg.draining and not seg.creating
            and seg.arena.compaction is None
            and seg.empty_since is not None and now - seg.empty_since >= idle_seconds
        ]
        retired = [self.release(seg, "idle") for seg in idle]
        return [info for info in retired if info is not None]

    # -- mappings ---------------------------------------------------------------------

    def note_mapped(self, segment_id: int, holder: str) -> None:
        """``holder`` was handed the segment's handle. Sessionless holders are not
        tracked: they have no session to report unmapping. Unknown ids are ignored."""
        seg = self._segments.get(segment_id)
        if not is_sessionless(holder) and seg is not None and holder not in seg.mappers:
            seg.mappers.add(holder)
            self._mapped.setdefault(holder, set()).add(segment_id)

    def note_unmapped(self, segment_id: int, holder: str) -> SegmentInfo | None:
        """``holder`` unmapped the segment; returns it when this retired it (the last
        mapper of a draining segment). Unknown ids are ignored (already retired)."""
        seg = self._segments.get(segment_id)
        if seg is None or holder not in seg.mappers:
            return None
        seg.mappers.remove(holder)
        mapped = self._mapped[holder]
        mapped.discard(segment_id)
        if not mapped:
            del self._mapped[holder]
        if seg.draining and not seg.mappers:
            return self.retire(seg)
        return None

    def end_mappings(self, holder: str) -> list[SegmentInfo]:
        """Forget every mapping of ``holder`` (its process is gone); returns the draining
        segments this retired. Cost: O(segments ``holder`` maps)."""
        retired = []
        for segment_id in sorted(self._mapped.get(holder, ())):
            info = self.note_unmapped(segment_id, holder)
            if info is not None:
                retired.append(info)
        return retired
