"""plan_layout: slides, pinned caches, hole filling, evacuation, fragmentation figures."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvbroker.core.compaction import (
    Layout,
    Occupant,
    SegmentLayout,
    fragmentation,
    fragmentation_of,
    plan_layout,
)
from kvbroker.core.types import Extent, Fragmentation


def seg(segment_id: int, nbytes: int, *occupants: tuple) -> SegmentLayout:
    """occupants: (cache_id, offset, nbytes[, movable])"""
    return SegmentLayout(
        segment_id, nbytes, tuple(Occupant(o[0], o[1], o[2], o[3] if len(o) > 3 else True) for o in occupants)
    )


def apply(segments: list[SegmentLayout], layout: Layout) -> dict[str, tuple[int, int, int]]:
    """Replay the moves on byte arrays (memmove semantics), checking that every
    destination is free when its move runs and that every cache's bytes arrive whole.
    Returns cache_id -> (segment, offset, nbytes) after the plan."""
    data = {s.segment_id: bytearray(s.nbytes) for s in segments}
    sizes = {s.segment_id: s.nbytes for s in segments}
    where: dict[str, tuple[int, int, int]] = {}
    pattern: dict[str, bytes] = {}
    for i, s in enumerate(segments):
        for j, o in enumerate(s.occupants):
            pat = bytes([(i * 37 + j * 11 + k) % 251 + 1 for k in range(o.nbytes)])
            data[s.segment_id][o.offset:o.offset + o.nbytes] = pat
            where[o.cache_id] = (s.segment_id, o.offset, o.nbytes)
            pattern[o.cache_id] = pat

    def occupied_by_others(cache_id: str, segment_id: int, offset: int, nbytes: int) -> bool:
        return any(
            sid == segment_id and off < offset + nbytes and offset < off + n
            for cid, (sid, off, n) in where.items() if cid != cache_id
        )

    for move in layout.moves:
        assert where[move.cache_id] == (move.source.segment_id, move.source.offset, move.source.nbytes)
        assert move.source.nbytes == move.destination.nbytes
        d = move.destination
        assert 0 <= d.offset and d.offset + d.nbytes <= sizes[d.segment_id]
        assert not occupied_by_others(move.cache_id, d.segment_id, d.offset, d.nbytes), move
        src = move.source
        chunk = bytes(data[src.segment_id][src.offset:src.offset + src.nbytes])
        data[d.segment_id][d.offset:d.offset + d.nbytes] = chunk
        where[move.cache_id] = (d.segment_id, d.offset, d.nbytes)
    for cid, (sid, off, n) in where.items():
        assert bytes(data[sid][off:off + n]) == pattern[cid], cid
    return where


def free_extents(segments: list[SegmentLayout], where: dict[str, tuple[int, int, int]]) -> list[int]:
    out = []
    for s in segments:
        spans = sorted((off, n) for sid, off, n in where.values() if sid == s.segment_id)
        pos = 0
        for off, n in spans:
            if off > pos:
                out.append(off - pos)
            pos = off + n
        if s.nbytes > pos:
            out.append(s.nbytes - pos)
    return out


# --- fragmentation ----------------------------------------------------------------------


def test_fragmentation_figure() -> None:
    assert fragmentation([]) == 0.0
    assert fragmentation([0]) == 0.0
    assert fragmentation([100]) == 0.0
    assert fragmentation([50, 50]) == pytest.approx(0.5)
    assert fragmentation([10, 30]) == pytest.approx(0.25)


def test_fragmentation_within_and_across_segments() -> None:
    """Issue 10.5: holes between caches (compaction merges them) apart from free space
    split across segments (only giving segments back does)."""
    assert fragmentation_of([]) == fragmentation_of([(), ()]) == Fragmentation()
    one = fragmentation_of([(16, 16)])  # one segment, two holes: all of it within
    assert (one.free_bytes, one.largest_free_extent, one.within_segments, one.across_segments) == (32, 16, 0.5, 0.0)
    two = fragmentation_of([(16, 16), (48,)])  # and a second segment's free tail
    assert (two.free_bytes, two.largest_free_extent) == (80, 48)
    assert (two.within_segments, two.across_segments) == (pytest.approx(0.2), pytest.approx(0.2))
    packed = fragmentation_of([(32,), (48,)])  # what compaction makes of it: only across left
    assert (packed.within_segments, packed.across_segments) == (0.0, pytest.approx(0.4))
    for figures, extents in ((one, [16, 16]), (two, [16, 16, 48]), (packed, [32, 48])):
        assert figures.ratio == pytest.approx(fragmentation(extents))
        assert figures.ratio == pytest.approx(figures.within_segments + figures.across_segments)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(st.integers(0, 1000), max_size=5), max_size=6))
def test_the_two_shares_add_up_to_the_classic_figure(segments) -> None:
    figures = fragmentation_of(segments)
    assert figures.free_bytes == sum(map(sum, segments))
    assert 0.0 <= figures.within_segments <= 1.0 and 0.0 <= figures.across_segments <= 1.0
    assert figures.ratio == pytest.approx(fragmentation([n for s in segments for n in s]))
    assert figures.within_segments + figures.across_segments == pytest.approx(figures.ratio)


# --- phase 1: within a segment ----------------------------------------------------------


def test_packed_segment_needs_no_moves() -> None:
    segs = [seg(1, 100, ("a", 0, 10), ("b", 10, 20))]
    layout = plan_layout(segs)
    assert layout.moves == ()
    assert layout.free_before == layout.free_after == (70,)
    assert layout.segments_emptied == ()


def test_empty_input_and_empty_segment() -> None:
    assert plan_layout([]) == Layout((), (), (), ())
    layout = plan_layout([seg(1, 64)])
    assert layout.moves == () and layout.free_after == (64,)


def test_slide_down_leaves_one_free_extent_at_the_end() -> None:
    segs = [seg(1, 100, ("a", 10, 10), ("b", 30, 20), ("c", 60, 5))]
    layout = plan_layout(segs)
    where = apply(segs, layout)
    assert where == {"a": (1, 0, 10), "b": (1, 10, 20), "c": (1, 30, 5)}
    assert layout.free_before == (10, 10, 10, 35)
    assert layout.free_after == (65,)
    assert fragmentation(layout.free_before) > 0 and fragmentation(layout.free_after) == 0


def test_slide_into_a_smaller_gap_overlaps_its_source() -> None:
    # The gap below "a" (1 byte) is smaller than "a" (2 bytes): only a memmove-style
    # slide, whose destination overlaps its source, packs the segment.
    segs = [seg(1, 10, ("a", 1, 2))]
    layout = plan_layout(segs)
    assert [(m.source, m.destination) for m in layout.moves] == [
        (Extent(1, 1, 2), Extent(1, 0, 2))
    ]
    assert apply(segs, layout) == {"a": (1, 0, 2)}
    assert layout.free_after == (8,)


def test_gaps_left_by_moved_caches_merge_with_the_next_gap() -> None:
    segs = [seg(1, 10, ("a", 1, 1), ("b", 3, 3))]
    layout = plan_layout(segs)
    assert apply(segs, layout) == {"a": (1, 0, 1), "b": (1, 1, 3)}
    assert layout.free_after == (6,)


def test_pinned_cache_stays_and_later_caches_fill_the_hole_before_it() -> None:
    segs = [seg(1, 100, ("a", 0, 10), ("p", 40, 10, False), ("b", 60, 20), ("c", 85, 15))]
    layout = plan_layout(segs)
    assert all(m.cache_id != "p" for m in layout.moves)
    where = apply(segs, layout)
    assert where["p"] == (1, 40, 10)
    assert where["a"] == (1, 0, 10)
    # b (20) fits the 30-byte hole [10, 40); c (15) then no longer fits below p,
    # so it slides down to just after p.
    assert where["b"] == (1, 10, 20)
    assert where["c"] == (1, 50, 15)
    assert sorted(layout.free_after) == sorted(free_extents(segs, where)) == [10, 35]


def test_cache_too_big_for_any_hole_before_a_pinned_one_stays_or_slides() -> None:
    segs = [seg(1, 100, ("p", 5, 5, False), ("big", 20, 30))]
    layout = plan_layout(segs)
    where = apply(segs, layout)
    assert where["p"] == (1, 5, 5)
    assert where["big"] == (1, 10, 30)  # slid to the pinned cache's end
    assert sorted(layout.free_after) == [5, 60]


def test_all_pinned_means_no_moves() -> None:
    segs = [seg(1, 100, ("p", 10, 10, False), ("q", 50, 10, False))]
    layout = plan_layout(segs)
    assert layout.moves == () and layout.segments_emptied == ()
    assert layout.free_before == layout.free_after


# --- phase 2: evacuation ----------------------------------------------------------------


def test_later_segment_is_evacuated_into_earlier_holes() -> None:
    segs = [
        seg(1, 100, ("a", 0, 40), ("p", 60, 10, False)),
        seg(2, 100, ("x", 30, 15), ("y", 70, 5)),
    ]
    layout = plan_layout(segs)
    assert layout.segments_emptied == (2,)
    where = apply(segs, layout)
    assert where["p"] == (1, 60, 10) and where["a"] == (1, 0, 40)
    assert {where["x"][0], where["y"][0]} == {1}
    # segment 2 is whole and free after the plan (the broker retires it on commit)
    assert 100 in layout.free_after
    assert sorted(layout.free_after) == sorted(free_extents(segs, where))


def test_segment_that_cannot_be_emptied_whole_is_left_alone() -> None:
    segs = [
        seg(1, 100, ("a", 0, 90)),
        seg(2, 100, ("x", 0, 5), ("y", 50, 20)),
    ]
    layout = plan_layout(segs)
    assert layout.segments_emptied == ()
    where = apply(segs, layout)
    # phase 1 still packs segment 2; nothing crosses segments for a half-empty one
    assert where["x"] == (2, 0, 5) and where["y"] == (2, 5, 20)
    assert where["a"] == (1, 0, 90)


def test_nothing_is_evacuated_into_a_wholly_empty_segment() -> None:
    # Copying segment 2 into the empty segment 1 would only swap them.
    segs = [seg(1, 100), seg(2, 100, ("a", 0, 50), ("b", 50, 50))]
    layout = plan_layout(segs)
    assert layout.moves == () and layout.segments_emptied == ()


def test_segment_with_a_pinned_cache_is_never_evacuated() -> None:
    segs = [seg(1, 100), seg(2, 100, ("p", 50, 10, False))]
    layout = plan_layout(segs)
    assert layout.moves == () and layout.segments_emptied == ()


def test_evacuation_largest_first_first_fit_and_chained() -> None:
    segs = [
        seg(1, 100, ("a", 0, 50)),
        seg(2, 100, ("b", 0, 30)),
        seg(3, 100, ("c", 0, 10), ("d", 20, 25)),
    ]
    layout = plan_layout(segs)
    where = apply(segs, layout)
    # Segment 3's caches go to segment 1 (d: 25 first, then c: 10); then segment 2's
    # b (30) no longer fits segment 1's 15 bytes, so segment 2 stays.
    assert layout.segments_emptied == (3,)
    assert where["d"] == (1, 50, 25) and where["c"] == (1, 75, 10)
    assert where["b"] == (2, 0, 30)
    assert sorted(layout.free_after) == sorted(free_extents(segs, where)) == [15, 70, 100]


def test_a_segment_emptied_after_receiving_caches_moves_them_again() -> None:
    segs = [
        seg(1, 100, ("a", 0, 20)),
        seg(2, 100, ("b", 0, 20)),
        seg(3, 100, ("c", 0, 20)),
    ]
    layout = plan_layout(segs)
    where = apply(segs, layout)  # checks every source is where the cache is by then
    assert set(layout.segments_emptied) == {2, 3}
    assert {w[0] for w in where.values()} == {1}


def test_fragmentation_figures_before_and_after() -> None:
    segs = [seg(1, 100, ("a", 10, 10), ("b", 50, 10))]
    layout = plan_layout(segs)
    assert layout.free_before == (10, 30, 40)
    assert fragmentation(layout.free_before) == pytest.approx(1 - 40 / 80)
    assert layout.free_after == (80,)
    assert fragmentation(layout.free_after) == 0.0


# --- property ---------------------------------------------------------------------------


@st.composite
def layouts(draw) -> list[SegmentLayout]:
    out = []
    n_segments = draw(st.integers(1, 4))
    cid = 0
    for sid in range(1, n_segments + 1):
        size = draw(st.integers(1, 40)) * 4
        occupants = []
        pos = 0
        while pos < size and draw(st.booleans()):
            gap = draw(st.integers(0, 3)) * 4
            n = draw(st.integers(1, 6)) * 4
            if pos + gap + n > size:
                break
            occupants.append(Occupant(f"c{cid}", pos + gap, n, draw(st.integers(0, 4)) > 0))
            cid += 1
            pos += gap + n
        out.append(SegmentLayout(sid * 3, size, tuple(draw(st.permutations(occupants)))))
    return out


@settings(max_examples=300, deadline=None)
@given(layouts())
def test_any_plan_preserves_bytes_and_pins_and_never_hurts(segs: list[SegmentLayout]) -> None:
    layout = plan_layout(segs)
    where = apply(segs, layout)
    pinned = {o.cache_id: (s.segment_id, o.offset, o.nbytes) for s in segs for o in s.occupants if not o.movable}
    assert all(m.cache_id not in pinned for m in layout.moves)
    for cid, w in pinned.items():
        assert where[cid] == w
    assert sorted(layout.free_after) == sorted(free_extents(segs, where))
    assert sum(layout.free_before) == sum(layout.free_after)
    if not pinned and not layout.segments_emptied:
        assert max(layout.free_after, default=0) >= max(layout.free_before, default=0)
    # Nothing is moved into a segment that held nothing.
    empty = {s.segment_id for s in segs if not s.occupants}
    assert all(m.destination.segment_id not in empty for m in layout.moves)
    for sid in layout.segments_emptied:
        assert all(w[0] != sid for w in where.values())
    # With nothing pinned, each segment that keeps caches is packed from offset 0.
    if not pinned:
        for s in segs:
            spans = sorted((off, n) for sid, off, n in where.values() if sid == s.segment_id)
            pos = 0
            for off, n in spans:
                assert off == pos, (s.segment_id, spans)
                pos += n
    # A cache only ever moves down its own segment or to an earlier one.
    order = [s.segment_id for s in segs]
    for m in layout.moves:
        src, dst = order.index(m.source.segment_id), order.index(m.destination.segment_id)
        assert dst < src or (dst == src and m.destination.offset < m.source.offset)
