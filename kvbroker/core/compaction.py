"""Compaction planning: which caches to move where so that free space becomes contiguous.

This is the full pack, what ``Defragment`` runs; the pressure path opens one extent for
one request with the fewest bytes moved instead (``kvbroker.core.targeted``), and falls
back to this only when that finds no plan.

Pure: it reads a layout and returns moves; it copies nothing and changes no state. The
broker commits a plan only after a backend copied the bytes (plan -> begin -> copy ->
commit), so only the copy needs a device.

Algorithm, per arena (one pool's segments on one device):

1. Within each segment, in address order, every movable cache goes to the first hole
   below it that is large enough (first fit over the holes left so far), else slides
   down into the hole that touches it from below (if any), else stays.
   With no pinned cache this is a plain slide-down that leaves one free extent at the
   segment's end; pinned caches stay where they are and the holes in front of them are
   filled by later caches that fit.
2. Then later segments are evacuated into earlier segments' holes (largest cache first,
   first fit), but only when a segment can be emptied whole: half-emptied segments gain
   nothing, while an empty segment can go back to the device for any pool to use.
   Wholly empty segments are never targets (that would only swap segments).

Moves are ordered so that each destination is free when its move runs, so every prefix
of a plan is a consistent layout (a copy that failed half way commits the moves before
it); a destination may overlap its own source (a slide), so backends copy with memmove
semantics.

Cost: O(n log n) in the number of caches plus O(holes) per cache for the first fit;
holes persist only in front of pinned caches, so the scan stays short in practice.

Figures (``fragmentation_of``; README, "Defragment"): of the free bytes inside the
planned segments, the share outside each segment's largest free range is fragmentation
*within* segments, what these moves merge; the share in other segments' largest ranges
than the overall largest is fragmentation *across* segments, which no move merges (a
cache never leaves its arena, and bytes of two segments are never contiguous): only a
segment going back to the device, emptied or idle, turns it into budget for any size.
A plan reports both before and after (emptied segments count as free until they go).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from kvbroker.core.types import CompactionPlan, Extent, Fragmentation, Move


@dataclass(frozen=True, slots=True)
class Occupant:
    """A cache as the planner sees it: where it is and whether it may move."""

    cache_id: str
    offset: int
    nbytes: int
    movable: bool


@dataclass(frozen=True, slots=True)
class SegmentLayout:
    segment_id: int
    nbytes: int
    occupants: tuple[Occupant, ...]


@dataclass(frozen=True, slots=True)
class Layout:
    """The outcome of a plan: the moves, and the free extents' sizes before and after
    (all of them, and per segment in the order given)."""

    moves: tuple[Move, ...]
    segments_emptied: tuple[int, ...]
    free_before: tuple[int, ...]
    free_after: tuple[int, ...]
    segment_free_before: tuple[tuple[int, ...], ...] = ()
    segment_free_after: tuple[tuple[int, ...], ...] = ()


def fragmentation(free_extents: Sequence[int]) -> float:
    """``1 - largest free extent / total free`` (0 when nothing is free)."""
    total = sum(free_extents)
    return 0.0 if total == 0 else 1.0 - max(free_extents) / total


def fragmentation_of(segments: Iterable[Sequence[int]]) -> Fragmentation:
    """The figures of free space given as each segment's free extent sizes: within
    segments (outside each one's largest extent) and across them (in the others'
    largest extents but the overall largest), as shares of all free bytes. Their sum is
    ``fragmentation`` of every extent. Cost: O(extents)."""
    free = largest = sum_of_largest = 0
    for extents in segments:
        if extents:
            top = max(extents)
            free += sum(extents)
            sum_of_largest += top
            largest = max(largest, top)
    if free == 0:
        return Fragmentation()
    return Fragmentation(free, largest, (free - sum_of_largest) / free, (sum_of_largest - largest) / free)


def free_gaps(size: int, occupied: list[tuple[int, int]]) -> list[list[int]]:
    """Free gaps [start, nbytes] of a segment, given sorted (offset, nbytes) pairs."""
    holes, pos = [], 0
    for offset, nbytes in occupied:
        if offset > pos:
            holes.append([pos, offset - pos])
        pos = offset + nbytes
    if size > pos:
        holes.append([pos, size - pos])
    return holes


def _first_fit(holes: list[list[int]], nbytes: int) -> int | None:
    for hole in holes:
        if hole[1] >= nbytes:
            start = hole[0]
            hole[0] += nbytes
            hole[1] -= nbytes
            return start
    return None


def plan_layout(segments: Sequence[SegmentLayout]) -> Layout:
    """Plan moves that pack ``segments`` (given in preference order: earlier segments
    are filled, later ones evacuated). Pinned (immovable) occupants never appear in a
    move."""
    moves: list[Move] = []
    before: list[tuple[int, ...]] = []
    # placed[segment_id] = sorted [(offset, nbytes)] after phase 1
    placed: dict[int, list[tuple[int, int]]] = {}
    movable_after: dict[int, list[tuple[int, int, str]]] = {}

    for seg in segments:
        occupants = sorted(seg.occupants, key=lambda o: o.offset)
        before.append(tuple(h[1] for h in free_gaps(seg.nbytes, [(o.offset, o.nbytes) for o in occupants])))
        holes: list[list[int]] = []
        pos = 0
        layout: list[tuple[int, int]] = []
        movable: list[tuple[int, int, str]] = []
        for occ in occupants:
            if occ.offset > pos:
                if holes and holes[-1][0] + holes[-1][1] == pos:
                    holes[-1][1] += occ.offset - pos  # continues the hole a moved cache left
                else:
                    holes.append([pos, occ.offset - pos])
            pos = occ.offset + occ.nbytes
            if not occ.movable:
                layout.append((occ.offset, occ.nbytes))
                continue
            dest = _first_fit(holes, occ.nbytes)
            if dest is None and holes and holes[-1][0] + holes[-1][1] == occ.offset:
                # Too big for every hole, but the hole right below it touches it: slide
                # down into it (the destination overlaps the source: memmove); the hole
                # moves up by the cache's size.
                dest = holes[-1][0]
                holes[-1][0] += occ.nbytes
                moves.append(
                    Move(
                        occ.cache_id,
                        Extent(seg.segment_id, occ.offset, occ.nbytes),
                        Extent(seg.segment_id, dest, occ.nbytes),
                    )
                )
            elif dest is None:
                dest = occ.offset
            else:
                moves.append(
                    Move(
                        occ.cache_id,
                        Extent(seg.segment_id, occ.offset, occ.nbytes),
                        Extent(seg.segment_id, dest, occ.nbytes),
                    )
                )
                if holes and holes[-1][0] + holes[-1][1] == occ.offset:
                    holes[-1][1] += occ.nbytes
                else:
                    holes.append([occ.offset, occ.nbytes])
            holes = [h for h in holes if h[1] > 0]
            layout.append((dest, occ.nbytes))
            movable.append((dest, occ.nbytes, occ.cache_id))
        layout.sort()
        placed[seg.segment_id] = layout
        movable_after[seg.segment_id] = movable
    sizes = {seg.segment_id: seg.nbytes for seg in segments}
    all_movable = {
        seg.segment_id: all(o.movable for o in seg.occupants) and bool(seg.occupants)
        for seg in segments
    }

    emptied: list[int] = []
    order = [seg.segment_id for seg in segments]
    for index in range(len(order) - 1, 0, -1):
        victim = order[index]
        if not all_movable[victim]:
            continue
        # Only segments that keep caches take evacuees: filling a wholly empty segment
        # to empty another copies bytes for nothing (the empty one can be retired as is)
        # and shrinks the largest free extent.
        targets = [t for t in order[:index] if placed[t]]
        holes_by_segment = {t: free_gaps(sizes[t], placed[t]) for t in targets}
        trial: list[tuple[int, int, int, str]] = []  # (segment, offset, nbytes, cache)
        for offset, nbytes, cache_id in sorted(movable_after[victim], key=lambda m: -m[1]):
            for target in targets:
                dest = _first_fit(holes_by_segment[target], nbytes)
                if dest is not None:
                    trial.append((target, dest, nbytes, cache_id))
                    break
            else:
                break
        else:
            current = {cache_id: offset for offset, _, cache_id in movable_after[victim]}
            for target, dest, nbytes, cache_id in trial:
                moves.append(
                    Move(
                        cache_id,
                        Extent(victim, current[cache_id], nbytes),
                        Extent(target, dest, nbytes),
                    )
                )
                placed[target].append((dest, nbytes))
                placed[target].sort()
                movable_after[target].append((dest, nbytes, cache_id))
            placed[victim] = []
            movable_after[victim] = []
            emptied.append(victim)

    after = [tuple(h[1] for h in free_gaps(sizes[sid], placed[sid])) for sid in order]
    return Layout(
        moves=tuple(moves),
        segments_emptied=tuple(emptied),
        free_before=tuple(n for extents in before for n in extents),
        free_after=tuple(n for extents in after for n in extents),
        segment_free_before=tuple(before),
        segment_free_after=tuple(after),
    )


def plan_arenas(
    arenas: Iterable[Sequence[SegmentLayout]], token: int,
    plan: Callable[[Sequence[SegmentLayout]], Layout] = plan_layout,
) -> CompactionPlan:
    """One plan for several arenas (each a layout ``plan`` plans on its own: the full
    pack by default, ``targeted.opening`` for one extent; a cache never moves between
    arenas). ``token`` identifies the layout planned from."""
    moves: list[Move] = []
    emptied: list[int] = []
    before: list[tuple[int, ...]] = []
    after: list[tuple[int, ...]] = []
    for segments in arenas:
        layout = plan(segments)
        moves.extend(layout.moves)
        emptied.extend(layout.segments_emptied)
        before.extend(layout.segment_free_before)
        after.extend(layout.segment_free_after)
    figures_before, figures_after = fragmentation_of(before), fragmentation_of(after)
    return CompactionPlan(
        moves=tuple(moves),
        fragmentation_before=figures_before.ratio,
        fragmentation_after=figures_after.ratio,
        segments_emptied=tuple(emptied),
        largest_free_extent_after=figures_after.largest_free_extent,
        token=token,
        before=figures_before,
        after=figures_after,
    )
