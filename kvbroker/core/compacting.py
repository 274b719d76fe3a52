"""Compactions in flight: freeze, then commit all of a plan, a prefix of it, or none.

The daemon copies a plan's bytes in a thread, without its lock, so the core must stay
correct while the copy runs. ``begin`` freezes the arenas the plan moves caches in:
nothing is placed in them (a new segment may still be made for the pool), nothing in
them is evicted, none of their segments is taken, retired or drained, and the moved
caches are MOVING (attach and pin refuse them until the end). Everything else goes on:
caches are released, sessions end, other arenas allocate. A cache freed in a frozen
arena keeps its bytes until the end (``Compaction.deferred``).

``commit(plan, completed=k)`` applies the first ``k`` moves (the backend copied those
and restored the rest: see ``kvbroker.memory.backend.CopyError``), which is a consistent
layout because the planner orders each move after the moves that free its destination;
the other moves are dropped and those caches stay where they were. Then the arenas
thaw, the deferred frees happen and segments the plan emptied go back to the device.
"""

from __future__ import annotations

from kvbroker.core.arena import occupy, vacate
from kvbroker.core.errors import FailedPrecondition, InvalidArgument
from kvbroker.core.freespace import address, segment_of
from kvbroker.core.ledger import Ledger
from kvbroker.core.records import ArenaRecord, Compaction
from kvbroker.core.types import CacheState, CompactionPlan, EventKind, SegmentInfo


def begin(ledger: Ledger, plan: CompactionPlan) -> Compaction:
    """Freeze ``plan``'s arenas and mark its caches MOVING.

    Raises ``FailedPrecondition`` when the plan is stale (any layout changed since it was
    made: its moves might overwrite live bytes) or one of its arenas is already frozen.
    Cost: O(moves).
    """
    if plan.token != ledger.version or plan.token in ledger.compactions:
        raise FailedPrecondition("the compaction plan is stale: the broker changed since it was made")
    records = tuple(ledger.caches.records[move.cache_id] for move in plan.moves)
    arenas: dict[int, ArenaRecord] = {}
    for rec, move in zip(records, plan.moves, strict=True):
        assert rec.state is CacheState.RESIDENT and not rec.pin_count, move
        if rec.arena.compaction is not None:
            raise FailedPrecondition(f"pool {rec.pool.spec.name!r} is already being compacted on "
                                     f"{rec.device_id!r}")
        arenas[id(rec.arena)] = rec.arena
    compaction = Compaction(plan, records, tuple(arenas.values()))
    for arena in compaction.arenas:
        arena.compaction = compaction
    for rec in records:
        rec.moving = True
    ledger.compactions[plan.token] = compaction
    ledger.changed()
    return compaction


def commit(ledger: Ledger, plan: CompactionPlan, completed: int | None) -> tuple[SegmentInfo, ...]:
    """Apply the first ``completed`` moves of a begun plan (all when None), thaw its
    arenas, give back the bytes freed meanwhile and release the segments it emptied.
    Moved caches get a new epoch and their holders a MOVED event. Returns the segments
    retired now, for the backend to free (mapped ones drain instead). A plan never begun
    is begun first (so a stale one is refused). Cost: O(moves + deferred frees)."""
    compaction = ledger.compactions.get(plan.token)
    if compaction is None or compaction.plan is not plan and compaction.plan != plan:
        compaction = begin(ledger, plan)
    moves = plan.moves
    count = len(moves) if completed is None else completed
    if type(count) is not int or not 0 <= count <= len(moves):
        raise InvalidArgument("completed", f"must be between 0 and {len(moves)}, got {completed!r}")
    now = ledger.clock()
    touched: set[int] = set()
    for move, rec in zip(moves[:count], compaction.records, strict=False):
        src = address(move.source.segment_id, move.source.offset)
        dst = address(move.destination.segment_id, move.destination.offset)
        assert rec.address == src and rec.pin_count == 0, move
        arena = rec.arena
        arena.free.give(src, move.source.nbytes)
        arena.free.take_at(dst, move.destination.nbytes)
        vacate(ledger.segments[segment_of(src)], rec, now)
        rec.address = dst
        occupy(ledger.segments[segment_of(dst)], rec)
        arena.moved_bytes += move.destination.nbytes
        touched.add(id(arena))
        if ledger.caches.get(rec.cache_id) is rec:  # not freed meanwhile
            rec.epoch += 1
            ledger.queue_event(EventKind.MOVED, rec, "compaction")
    for arena in compaction.arenas:
        arena.compaction = None
        if id(arena) in touched:
            arena.compaction_count += 1
    for rec in compaction.records:
        rec.moving = False
    del ledger.compactions[plan.token]
    for rec in compaction.deferred:
        ledger.give_back_deferred(rec)
    retired = []
    for segment_id in plan.segments_emptied:
        seg = ledger.segments.get(segment_id)
        if seg is not None and not seg.caches and not seg.draining:
            info = ledger.segments.release(seg, "emptied by compaction")
            if info is not None:
                retired.append(info)
    ledger.changed()
    return tuple(retired)
