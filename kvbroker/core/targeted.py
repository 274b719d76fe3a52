"""Targeted compaction: the fewest bytes moved to open one free extent of a given size.

Pure, like ``kvbroker.core.compaction`` (whose ``Layout`` and ``SegmentLayout`` it
shares): it reads one arena's layout and returns moves. The pressure ladder uses it to
make room for one request (packing the whole arena to open one extent moved, on the
fragmentation trace, about ten times the bytes the request needed); ``Defragment`` uses
it with ``target_bytes``.

Algorithm (a sliding window over each segment's extents):

1. A *window* is a range ``[s, s + need)`` inside one segment. Opening it means moving
   every cache that intersects it out of it; its cost is those caches' bytes. A window
   that intersects a pinned (or PENDING) cache is never chosen.
2. Only windows that start at the segment's start or at the end of a cache are
   candidates. Why that loses nothing: slide any window left; while its start is in
   free space or inside a cache it already pays for, no cache enters it and caches can
   only leave it at the right, so its cost never grows, and it stops at the segment's
   start or at a cache's end. So the cheapest window is among the n + 1 candidates,
   whose costs two pointers compute in one pass over the sorted caches.
3. Candidates are tried cheapest first (then fewest caches, then lowest address): the
   window's caches, largest first, go to the smallest free extent outside the window
   that holds them (best fit decreasing, over the free extents of every segment of the
   arena, the parts of extents the window cuts included). The first window whose
   caches all fit is the plan, unless a run (4.) is cheaper.
4. When the arena is nearly full, the free space outside a window is about as large as
   the window's caches and scattered, so they rarely fit. A *run* gathers free space
   instead: a range of one segment from a free extent's start to a free extent's end,
   holding ``need`` free bytes and no pinned cache; its caches slide down to its start
   (in address order, memmove semantics), which opens its free bytes at its end. Its
   cost is its caches' bytes; two pointers over the free extents find the cheapest run
   per segment. The full pack of a segment without pins is one such run (from the
   first free extent to the end), so a run never costs more than packing that segment.

Why it is optimal, and where it is not: any plan that ends with ``[s, s + need)`` free
must move every cache intersecting it, so the cheapest window's cost is a lower bound
on the bytes moved; the plan meets it whenever the cheapest window's caches fit the
free space outside it directly. Otherwise it moves the cheaper of the cheapest window
that does fit and the cheapest run, which may be more than the optimum: chains of moves
other than a run's slide (move a cache outside the window to make room for one
inside) are not searched, and best fit decreasing is a heuristic for a bin-packing
question (it can miss a packing that exists). When neither exists (pinned caches in
every run and window), the caller falls back to the full pack (``plan_layout``), so the
pressure path's utilization is unchanged. On the fragmentation trace (4 GiB, nearly
full at every compaction) this moves about a quarter of the full pack's bytes per
compaction (``benchmarks/compaction.py``).

A window's destinations are free before the first move and lie outside the window,
where no source lies, and never overlap each other; a run's slides go in address order
into bytes the earlier slides vacated. Either way each destination is free when its
move runs, so every prefix of the plan is a consistent layout (a copy that fails
half-way commits the moves before it).

Cost: O(n log n) to sort the n caches of the arena and rank the windows, O(n) for the
runs, plus O(F + k log F) per window tried (F free extents, k caches in the window, the
sorted free list rebuilt per window); at most ``MAX_WINDOWS`` windows are tried.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from collections.abc import Callable, Sequence

from kvbroker.core.compaction import Layout, SegmentLayout, free_gaps, plan_layout
from kvbroker.core.errors import InvalidArgument
from kvbroker.core.types import Extent, Move

#: Windows tried before giving up (then the caller packs the arena). Each try is
#: O(free extents); the cheapest windows are tried first, so a plan exists within the
#: first few unless free space outside is too scattered for the window's caches.
MAX_WINDOWS = 64


def _windows(seg: SegmentLayout, order: int, need: int) -> list[tuple[int, int, int, int, int, int]]:
    """The segment's candidate windows without a pinned cache, as (cost, caches, order,
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


def _fit(
    free: list[tuple[int, int, int]], caches: list[tuple[int, str, int]]
) -> list[tuple[str, int, int, int]] | None:
    """Best fit decreasing of ``caches`` (nbytes, id, offset) into ``free`` (nbytes,
    segment order, offset; sorted, consumed). Returns (id, offset, order, dest offset)
    per cache, or None when one does not fit."""
    placed = []
    for nbytes, cache_id, offset in sorted(caches, reverse=True):
        index = bisect_left(free, (nbytes, -1, -1))
        if index == len(free):
            return None
        size, order, start = free.pop(index)
        placed.append((cache_id, offset, order, start))
        if size > nbytes:
            insort(free, (size - nbytes, order, start + nbytes))
    return placed


def plan_target(segments: Sequence[SegmentLayout], need: int) -> Layout | None:
    """The cheapest moves that leave a free extent of at least ``need`` bytes in one of
    ``segments`` (one arena), or None when neither a window nor a run opens one (see
    the module doc). Moves nothing when such an extent exists already. Pinned
    (immovable) occupants never move: no window or run contains one."""
    before = [tuple(h[1] for h in free_gaps(s.nbytes, sorted((o.offset, o.nbytes) for o in s.occupants)))
              for s in segments]
    flat = tuple(n for extents in before for n in extents)
    if any(n >= need for n in flat):
        return Layout((), (), flat, flat, tuple(before), tuple(before))
    holes = [
        (hole[1], order, hole[0])
        for order, seg in enumerate(segments)
        for hole in free_gaps(seg.nbytes, sorted((o.offset, o.nbytes) for o in seg.occupants))
    ]
    run = _best_run(segments, need)
    candidates = sorted(w for order, seg in enumerate(segments) for w in _windows(seg, order, need))
    for cost, _, order, start, first, end in candidates[:MAX_WINDOWS]:
        if run is not None and cost > run[0]:
            break
        stop = start + need
        free: list[tuple[int, int, int]] = []
        for size, hole_order, offset in holes:
            if hole_order != order or offset + size <= start or offset >= stop:
                free.append((size, hole_order, offset))
                continue
            if offset < start:
                free.append((start - offset, order, offset))
            if offset + size > stop:
                free.append((offset + size - stop, order, stop))
        free.sort()
        inside = sorted(segments[order].occupants, key=lambda o: o.offset)[first:end]
        placed = _fit(free, [(o.nbytes, o.cache_id, o.offset) for o in inside])
        if placed is not None:
            return _layout(segments, before, order, placed)
    if run is None:
        return None
    _, order, start, stop = run
    placed, dest = [], start
    for occ in sorted(segments[order].occupants, key=lambda o: o.offset):
        if start <= occ.offset < stop:
            placed.append((occ.cache_id, occ.offset, order, dest))
            dest += occ.nbytes
    return _layout(segments, before, order, placed)


def _best_run(segments: Sequence[SegmentLayout], need: int) -> tuple[int, int, int, int] | None:
    """The cheapest run to pack: (cost, segment order, start, stop) where ``[start,
    stop)`` begins at a free extent's start, ends at one's end, holds ``need`` free
    bytes or more and no pinned cache; packing its caches to its start opens ``need``
    bytes at its end, at the cost of its caches' bytes. Two pointers over each
    segment's free extents: O(caches + extents)."""
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


def _layout(
    segments: Sequence[SegmentLayout], before: list[tuple[int, ...]], order: int,
    placed: list[tuple[str, int, int, int]],
) -> Layout:
    """The ``Layout`` of moving each (id, offset) cache of segment ``order`` to (dest
    order, dest offset), in the order given; free extents recomputed."""
    source = segments[order].segment_id
    occupied = {i: [(o.offset, o.nbytes) for o in seg.occupants] for i, seg in enumerate(segments)}
    moves = []
    sizes = {o.cache_id: o.nbytes for o in segments[order].occupants}
    for cache_id, offset, dest_order, dest in placed:
        nbytes = sizes[cache_id]
        occupied[order].remove((offset, nbytes))
        occupied[dest_order].append((dest, nbytes))
        moves.append(Move(cache_id, Extent(source, offset, nbytes),
                          Extent(segments[dest_order].segment_id, dest, nbytes)))
    after = [tuple(h[1] for h in free_gaps(seg.nbytes, sorted(occupied[i]))) for i, seg in enumerate(segments)]
    return Layout(
        moves=tuple(moves), segments_emptied=(),
        free_before=tuple(n for e in before for n in e), free_after=tuple(n for e in after for n in e),
        segment_free_before=tuple(before), segment_free_after=tuple(after),
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
