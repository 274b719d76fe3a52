"""Targeted compaction: the fewest bytes moved to open one free extent of a given size.

Pure, like ``kvbroker.core.compaction`` (whose ``Layout`` and ``SegmentLayout`` it
shares): it reads one arena's layout and returns moves. The pressure ladder uses it to
make room for one request (packing the whole arena to open one extent moved, on the
fragmentation trace, about 3.5 GiB per compaction for requests of 150 MiB on average);
``Defragment`` uses it with ``target_bytes``.

Algorithm (a sliding window over each segment's extents, searched with branch and bound):

1. A *window* is a range ``[s, s + need)`` inside one segment. Opening it means moving
   every cache that intersects it out of it; the bytes of those caches are its *lower
   bound*. A window that intersects a pinned (or PENDING) cache is never chosen.
2. Only windows that start at the segment's start or at the end of a cache are
   candidates. Why that loses nothing: slide any window left; while its start is in
   free space or inside a cache it already pays for, no cache enters it and caches can
   only leave it at the right, so its bound never grows, and it stops at the segment's
   start or at a cache's end. So the n + 1 candidates hold the cheapest window, and two
   pointers compute their bounds in one pass over the sorted caches.
3. A window's caches, largest first, go to the smallest free extent outside it that
   holds them (best fit, over every segment of the arena). A cache that fits nowhere
   gets an extent of its size opened for it by the same search (windows and runs), one
   level down (a *chain*: caches elsewhere move to make room for it), at most
   ``MAX_DEPTH`` levels.
   The window with the whole of every cache it cuts, and every destination taken, are
   reserved while the search goes on (nothing lands on bytes a cache still holds), and
   a cache moves at most once. A window's cost is the bytes of all those moves.
4. Windows are tried in order of their lower bound; the search stops when the next
   bound is no less than the cheapest plan found (branch and bound), or when its
   budgets run out (``MAX_TRIES`` windows in all levels, ``WORK_BUDGET`` cache
   visits), so a plan costs bounded time.
5. A *run* is the other candidate: a range of one segment from a free extent's start to
   a free extent's end, holding ``need`` free bytes and no pinned cache, whose caches
   slide down to its start (in address order, memmove semantics), opening its free
   bytes at its end. Its cost is its caches' bytes; two pointers over the free extents
   find the cheapest. Packing a segment without pins is one such run, so a run never
   costs more than packing that segment. At every level the cheaper of the best window
   and the best run is the plan.

Optimality: any plan that ends with ``[s, s + need)`` free moves every cache that
intersects it, so the cheapest window's bound is a lower bound on every plan's bytes.
The plan meets it whenever that window's caches fit the free space outside it (the
common case with room to spare); otherwise it is the cheapest among the chained plans
and runs explored, which is not always the optimum (best fit is a heuristic for a
bin-packing question, chains are depth-limited, the search budget caps the windows).
``benchmarks/compaction.py`` measures it on the fragmentation trace against the full
pack: 45 % of the compactions there meet the bound, and most of the bytes moved come from
the few where the request takes nearly all the free bytes left (3.6 MiB asked with 4.2
MiB free in 4 GiB), where opening it means gathering nearly all the free space. When neither a window nor a run opens the extent, the caller falls back to the
full pack (``plan_layout``), so the pressure path's utilization is unchanged.

Every prefix of a plan is a consistent layout: a chain's moves come before the move
they make room for, each destination is free when its move runs (holes outside every
reservation, or an extent the moves before it opened), and a run's slides go in address
order into bytes the earlier slides vacated (a copy that fails half-way commits the
moves before it).

Cost: O(n log n) to sort the layout and rank the windows and O(n) for the runs (n
caches), then about n + k per window tried (k caches in it; a copy and a scan of the
layout) and per level of chain, within ``WORK_BUDGET`` in all: on the fragmentation
trace (50 caches) about 7 ms per plan; in an arena of 100k caches the search stops
after its first ranking and the plan costs about what the full pack does.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from collections.abc import Callable, Sequence

from kvbroker.core.compaction import Layout, Occupant, SegmentLayout, free_gaps, plan_layout
from kvbroker.core.errors import InvalidArgument
from kvbroker.core.types import Extent, Move

#: Windows tried per plan, over all levels of chains: a try is O(n log n), so this keeps
#: a plan within a few hundred layout sorts.
MAX_TRIES = 256
#: Cache visits per plan (see ``_Search``): all ``MAX_TRIES`` windows in an arena of
#: 50 caches (the fragmentation trace), a handful of layout scans at 10k caches (0.1 to
#: 0.4 s here), none beyond the first ranking at 100k (the run then: about the full
#: pack's time, 2 s here).
WORK_BUDGET = 50_000
#: Levels of chains: a cache moved out of a window may have an extent opened for it,
#: whose caches may have extents opened for them, and no deeper.
MAX_DEPTH = 2
_RESERVED = ""  # the cache id of a reservation (a window being opened, a destination)


def _windows(seg: SegmentLayout, order: int, need: int) -> list[tuple[int, int, int, int, int, int]]:
    """The segment's candidate windows without a pinned cache, as (bound, caches, order,
    start, first, end) with ``occupants[first:end]`` (sorted by offset) inside. O(n)."""
    if need > seg.nbytes:
        return []
    occupants = sorted(seg.occupants, key=lambda o: o.offset)
    prefix, pinned = [0], [0]
    for occ in occupants:
        prefix.append(prefix[-1] + occ.nbytes)
        pinned.append(pinned[-1] + (not occ.movable))
    out = []
    first = end = 0
    for start in [0, *(o.offset + o.nbytes for o in occupants)]:
        if start + need > seg.nbytes:
            break
        while first < len(occupants) and occupants[first].offset + occupants[first].nbytes <= start:
            first += 1
        end = max(end, first)
        while end < len(occupants) and occupants[end].offset < start + need:
            end += 1
        if pinned[end] == pinned[first]:
            out.append((prefix[end] - prefix[first], end - first, order, start, first, end))
    return out


def _holes_by_size(segments: list[SegmentLayout]) -> list[tuple[int, int, int]]:
    """Every free extent as (size, segment order, offset), sorted: best fit is a bisect.
    Occupants are kept sorted by offset (``_with``), so this is O(n + F log F)."""
    return sorted(
        (size, order, start)
        for order, seg in enumerate(segments)
        for start, size in free_gaps(seg.nbytes, [(o.offset, o.nbytes) for o in seg.occupants])
    )


def _with(segments: list[SegmentLayout], order: int, add: Sequence[Occupant] = (),
          drop: Sequence[Occupant] = ()) -> list[SegmentLayout]:
    """``segments`` with occupants added to and dropped from segment ``order``, kept
    sorted by offset (a sort of an almost sorted tuple: O(n))."""
    seg = segments[order]
    dropped = set(drop)
    occupants = tuple(sorted([*(o for o in seg.occupants if o not in dropped), *add], key=_offset))
    return [*segments[:order], SegmentLayout(seg.segment_id, seg.nbytes, occupants), *segments[order + 1:]]


def _offset(occ: Occupant) -> int:
    return occ.offset


class _Search:
    """The branch-and-bound search over windows, with its budgets: ``MAX_TRIES``
    windows, and ``WORK_BUDGET`` cache visits (ranking the windows and each window
    try scan the layout once, n caches), so that a plan in a large arena stays within
    a few layout scans."""

    def __init__(self, caches: int) -> None:
        self.tries = MAX_TRIES
        self.work = WORK_BUDGET
        self.caches = max(1, caches)

    def open(
        self, segments: list[SegmentLayout], need: int, depth: int,
    ) -> tuple[int, list[Move], list[SegmentLayout], tuple[int, int]] | None:
        """The cheapest plan found that frees ``need`` bytes: (cost, moves, the layout
        after them, (segment order, start) of the extent). Moved caches and
        reservations are immovable in the layout returned."""
        if self.work <= 0 or self.tries <= 0:
            return None
        self.work -= self.caches  # ranking the windows
        candidates = sorted(w for order, seg in enumerate(segments) for w in _windows(seg, order, need))
        best = None
        for bound, _, order, start, first, end in candidates:
            if (best is not None and bound >= best[0]) or self.tries <= 0 or self.work <= 0:
                break
            self.tries -= 1
            self.work -= self.caches + (end - first)
            found = self._evacuate(segments, need, depth, order, start, first, end)
            if found is not None and (best is None or found[0] < best[0]):
                best = (found[0], found[1], found[2], (order, start))
        self.work -= self.caches  # the runs
        run = _best_run(segments, need)
        if run is not None and (best is None or run[0] < best[0]):
            return _run_plan(segments, run)
        return best

    def _evacuate(
        self, segments: list[SegmentLayout], need: int, depth: int, order: int, start: int, first: int, end: int,
    ) -> tuple[int, list[Move], list[SegmentLayout]] | None:
        """Move the caches of window ``[start, start + need)`` of segment ``order`` out
        (best fit into holes, else to extents opened one level down). Returns (cost,
        moves, layout with the window free) or None."""
        seg = segments[order]
        inside = seg.occupants[first:end]
        # Reserved: the window and the whole of every cache it cuts, whose bytes stay
        # where they are until it moves (no chain may land on them before that).
        low = min(start, inside[0].offset) if inside else start
        high = max(start + need, inside[-1].offset + inside[-1].nbytes) if inside else start + need
        window = Occupant(_RESERVED, low, high - low, False)
        layout = _with(segments, order, add=(window,), drop=inside)
        holes = _holes_by_size(layout)
        placed: list[tuple[int, Occupant]] = []
        moves: list[Move] = []
        cost = 0
        for occ in sorted(inside, key=lambda o: -o.nbytes):
            index = bisect_left(holes, (occ.nbytes, -1, -1))
            if index < len(holes):
                size, dest_order, dest = holes.pop(index)
                if size > occ.nbytes:
                    insort(holes, (size - occ.nbytes, dest_order, dest + occ.nbytes))
                placed.append((dest_order, Occupant(occ.cache_id, dest, occ.nbytes, False)))
            else:
                if depth == 0:
                    return None
                layout = _place(layout, placed)
                placed = []
                sub = self.open(layout, occ.nbytes, depth - 1)
                if sub is None:
                    return None
                cost += sub[0]
                moves.extend(sub[1])
                layout, (dest_order, dest) = sub[2], sub[3]
                layout = _with(layout, dest_order, add=(Occupant(occ.cache_id, dest, occ.nbytes, False),))
                holes = _holes_by_size(layout)
            moves.append(Move(occ.cache_id, Extent(seg.segment_id, occ.offset, occ.nbytes),
                              Extent(layout[dest_order].segment_id, dest, occ.nbytes)))
            cost += occ.nbytes
        layout = _place(layout, placed)
        return cost, moves, _with(layout, order, drop=(window,))


def _place(layout: list[SegmentLayout], placed: list[tuple[int, Occupant]]) -> list[SegmentLayout]:
    """``layout`` with the ``(segment order, occupant)`` placements added."""
    for order in sorted({order for order, _ in placed}):
        layout = _with(layout, order, add=[occ for o, occ in placed if o == order])
    return layout


def _best_run(segments: Sequence[SegmentLayout], need: int) -> tuple[int, int, int, int] | None:
    """The cheapest run to pack: (cost, segment order, start, stop) where ``[start,
    stop)`` begins at a free extent's start, ends at one's end, holds ``need`` free
    bytes or more and no pinned cache. Two pointers over each segment's free extents:
    O(caches + extents)."""
    best = None
    for order, seg in enumerate(segments):
        occupants = sorted(seg.occupants, key=lambda o: o.offset)
        holes = free_gaps(seg.nbytes, [(o.offset, o.nbytes) for o in occupants])
        blocked = [False] * len(holes)  # a pinned cache between hole k and hole k + 1
        k = 0
        for occ in occupants:
            while k < len(holes) and holes[k][0] + holes[k][1] <= occ.offset:
                k += 1
            if not occ.movable and k > 0:
                blocked[k - 1] = True
        j = total = 0
        for i in range(len(holes)):
            if j <= i:
                j, total = i, 0
            while j < len(holes) and total < need and (j == i or not blocked[j - 1]):
                total += holes[j][1]
                j += 1
            if total >= need:
                start, stop = holes[i][0], holes[j - 1][0] + holes[j - 1][1]
                cost = stop - start - total
                if best is None or cost < best[0]:
                    best = (cost, order, start, stop)
            if j > i:
                total -= holes[i][1]
    return best


def _run_plan(
    segments: list[SegmentLayout], run: tuple[int, int, int, int],
) -> tuple[int, list[Move], list[SegmentLayout], tuple[int, int]]:
    """Pack the run's caches to its start, in address order: (cost, moves, the layout
    after them, (segment order, start) of the free bytes opened at its end)."""
    cost, order, start, stop = run
    seg, moves, moved, dest = segments[order], [], [], start
    inside = [o for o in seg.occupants if start <= o.offset < stop]
    for occ in inside:
        moves.append(Move(occ.cache_id, Extent(seg.segment_id, occ.offset, occ.nbytes),
                          Extent(seg.segment_id, dest, occ.nbytes)))
        moved.append(Occupant(occ.cache_id, dest, occ.nbytes, False))
        dest += occ.nbytes
    return cost, moves, _with(segments, order, add=moved, drop=inside), (order, dest)


def _free(segments: Sequence[SegmentLayout]) -> list[tuple[int, ...]]:
    return [tuple(h[1] for h in free_gaps(s.nbytes, sorted((o.offset, o.nbytes) for o in s.occupants)))
            for s in segments]


def plan_target(arena: Sequence[SegmentLayout], need: int) -> Layout | None:
    """The cheapest moves found that leave a free extent of at least ``need`` bytes in
    one of the segments of ``arena``, or None when neither a window nor a run opens one
    (see the module doc). Moves nothing when such an extent exists already. Pinned
    (immovable) occupants never move: no window or run contains one."""
    segments = [SegmentLayout(s.segment_id, s.nbytes, tuple(sorted(s.occupants, key=_offset))) for s in arena]
    before = _free(segments)
    flat = tuple(n for extents in before for n in extents)
    if any(n >= need for n in flat):
        return Layout((), (), flat, flat, tuple(before), tuple(before))
    found = _Search(sum(len(s.occupants) for s in segments)).open(segments, need, MAX_DEPTH)
    if found is None:
        return None
    moves, after = found[1], found[2]
    free_after = _free(after)
    return Layout(
        moves=tuple(moves), segments_emptied=(),
        free_before=flat, free_after=tuple(n for e in free_after for n in e),
        segment_free_before=tuple(before), segment_free_after=tuple(free_after),
    )


def opening(need: int) -> Callable[[Sequence[SegmentLayout]], Layout]:
    """A planner for ``compaction.plan_arenas`` that opens ``need`` bytes per arena:
    the targeted plan, else the full pack when that opens them, else no moves (moving
    bytes that open nothing would only cost). Raises ``InvalidArgument`` unless ``need``
    is a positive int."""
    if type(need) is not int or need <= 0:
        raise InvalidArgument("target_bytes", f"must be a positive number of bytes, got {need!r}")

    def plan(segments: Sequence[SegmentLayout]) -> Layout:
        layout = plan_target(segments, need)
        if layout is not None:
            return layout
        full = plan_layout(segments)
        if any(n >= need for n in full.free_after):
            return full
        return Layout((), (), full.free_before, full.free_before, full.segment_free_before,
                      full.segment_free_before)

    return plan
