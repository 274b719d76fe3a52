"""The targeted planner (``kvbroker.core.targeted``) on random layouts, against brute force.

Layouts are drawn in whole units (a cache is 1 to 6 units, a segment 4 to 24); each
segment's caches are laid out with random gaps, some pinned. For every drawn request:

* a plan is valid: replayed in order, each move takes a movable cache from where it is
  to bytes free at that moment (a run's slide may overlap its own source); after the
  moves a free extent of the requested size exists, as the plan's figures say;
* the plan moves no fewer bytes than the brute-force lower bound (every window start of
  every segment: the bytes of the caches it intersects, no pinned one), and exactly that
  many when free space outside is ample (a large empty segment: the cheapest window is
  always feasible, so the planner must find it);
* a request that fits already moves nothing; one larger than every segment gets None.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from kvbroker.core.compaction import Occupant, SegmentLayout, free_gaps, plan_layout
from kvbroker.core.targeted import opening, plan_target

UNIT = 4096


@st.composite
def layouts(draw, *, max_segments: int = 3) -> list[SegmentLayout]:
    segments = []
    serial = 0
    for sid in range(1, draw(st.integers(1, max_segments)) + 1):
        size = draw(st.integers(4, 24))
        occupants, pos = [], 0
        while True:
            pos += draw(st.integers(0, 3))
            nbytes = draw(st.integers(1, 6))
            if pos + nbytes > size or draw(st.integers(0, 9)) == 0:
                break
            serial += 1
            occupants.append(Occupant(f"c{serial}", pos * UNIT, nbytes * UNIT, draw(st.integers(0, 4)) > 0))
            pos += nbytes
        segments.append(SegmentLayout(sid, size * UNIT, tuple(occupants)))
    return segments


def lower_bound(segments: list[SegmentLayout], need: int) -> int | None:
    """The fewest bytes of caches any window of ``need`` bytes intersects (every start
    offset in units), skipping windows with a pinned cache; None when none exists."""
    best = None
    for seg in segments:
        for start in range(0, seg.nbytes - need + 1, UNIT):
            inside = [o for o in seg.occupants if o.offset < start + need and start < o.offset + o.nbytes]
            if all(o.movable for o in inside):
                cost = sum(o.nbytes for o in inside)
                best = cost if best is None else min(best, cost)
    return best


def check_valid(segments: list[SegmentLayout], layout, need: int) -> None:
    """Replay the moves in order: each takes a movable cache from where it is (once) to
    bytes that are free at that moment (its own source excepted: a slide); at the end a
    free extent of ``need`` bytes exists and the plan's figures match."""
    by_id = {o.cache_id: (seg.segment_id, o) for seg in segments for o in seg.occupants}
    where = {o.cache_id: (sid, o.offset, o.nbytes) for sid, o in by_id.values()}
    sizes = {seg.segment_id: seg.nbytes for seg in segments}
    moved = set()
    for move in layout.moves:
        sid, occ = by_id[move.cache_id]
        assert occ.movable, f"pinned {occ.cache_id} moved"
        assert move.cache_id not in moved
        moved.add(move.cache_id)
        assert (move.source.segment_id, move.source.offset, move.source.nbytes) == where[move.cache_id]
        dst = move.destination
        assert dst.nbytes == occ.nbytes and dst.end <= sizes[dst.segment_id]
        for other, (osid, offset, nbytes) in where.items():
            if other != move.cache_id and osid == dst.segment_id:
                assert offset + nbytes <= dst.offset or dst.end <= offset, f"{move} lands on {other}"
        where[move.cache_id] = (dst.segment_id, dst.offset, dst.nbytes)
    occupied = {sid: sorted((o, n) for s, o, n in where.values() if s == sid) for sid in sizes}
    after = [n for sid in sizes for _, n in free_gaps(sizes[sid], occupied[sid])]
    assert max(after, default=0) >= need, "the plan does not open the extent it promised"
    assert sorted(after) == sorted(layout.free_after)


@settings(max_examples=400, deadline=None)
@given(segments=layouts(), need_units=st.integers(1, 24))
def test_a_targeted_plan_is_valid_and_never_beats_the_lower_bound(segments, need_units) -> None:
    need = need_units * UNIT
    layout = plan_target(segments, need)
    bound = lower_bound(segments, need)
    if bound is None:
        assert layout is None
        return
    if layout is None:
        # No window's caches fit the free space outside it, and every run holds a pinned
        # cache or too few free bytes.
        return
    check_valid(segments, layout, need)
    moved = sum(m.destination.nbytes for m in layout.moves)
    assert moved >= bound
    if bound == 0:
        assert moved == 0 and layout.moves == ()


@settings(max_examples=400, deadline=None)
@given(segments=layouts(max_segments=2), need_units=st.integers(7, 24))
def test_with_ample_free_space_the_plan_meets_the_lower_bound(segments, need_units) -> None:
    """Twenty empty 6-unit segments (too small for the request, large enough for any
    cache) hold any window's caches, so the cheapest window is feasible: the plan's
    bytes equal the brute-force minimum."""
    spare = [SegmentLayout(100 + i, 6 * UNIT, ()) for i in range(20)]
    need = need_units * UNIT
    layout = plan_target([*segments, *spare], need)
    bound = lower_bound(segments, need)
    if bound is None:
        assert layout is None
        return
    assert layout is not None
    check_valid([*segments, *spare], layout, need)
    assert sum(m.destination.nbytes for m in layout.moves) == bound


@settings(max_examples=200, deadline=None)
@given(segments=layouts(), need_units=st.integers(1, 24))
def test_opening_falls_back_to_the_full_pack_only_when_it_opens_the_extent(segments, need_units) -> None:
    need = need_units * UNIT
    layout = opening(need)(segments)
    targeted = plan_target(segments, need)
    if targeted is not None:
        assert layout == targeted
    elif any(n >= need for n in plan_layout(segments).free_after):
        assert layout == plan_layout(segments)
    else:
        assert layout.moves == () and layout.free_after == layout.free_before


def test_the_cheapest_window_moves_one_unit_where_the_full_pack_moves_five() -> None:
    """[a 1][free 1][b 1][free 1][c 4][free 1] + need 3: sliding b off costs one unit."""
    seg = SegmentLayout(1, 9 * UNIT, (
        Occupant("a", 0, UNIT, True), Occupant("b", 2 * UNIT, UNIT, True), Occupant("c", 4 * UNIT, 4 * UNIT, True),
    ))
    layout = plan_target([seg], 3 * UNIT)
    assert [(m.cache_id, m.destination.offset) for m in layout.moves] == [("b", 8 * UNIT)]
    assert sum(m.destination.nbytes for m in plan_layout([seg]).moves) == 5 * UNIT  # b, then c slides


def test_a_window_never_holds_a_pinned_cache() -> None:
    seg = SegmentLayout(1, 8 * UNIT, (
        Occupant("a", UNIT, UNIT, True), Occupant("p", 4 * UNIT, UNIT, False), Occupant("b", 6 * UNIT, UNIT, True),
    ))
    layout = plan_target([seg], 4 * UNIT)
    assert [(m.cache_id, m.destination.offset) for m in layout.moves] == [("a", 5 * UNIT)]
    assert plan_target([seg], 5 * UNIT) is None  # every 5-unit window holds p


def test_nothing_moves_when_the_extent_exists_and_none_for_an_oversized_request() -> None:
    seg = SegmentLayout(1, 8 * UNIT, (Occupant("a", 0, UNIT, True),))
    assert plan_target([seg], 7 * UNIT).moves == ()
    assert plan_target([seg], 9 * UNIT) is None


def test_plan_compaction_target_bytes_must_be_a_positive_int() -> None:
    import pytest

    from kvbroker.core import Broker, DeviceSpec, InvalidArgument, PoolSpec

    b = Broker([DeviceSpec("d0", 64 * UNIT)], [PoolSpec("p", ("d0",), block_bytes=UNIT, segment_bytes=64 * UNIT)])
    for bad in (0, -1, 1.5, "1"):
        with pytest.raises(InvalidArgument) as caught:
            b.plan_compaction(target_bytes=bad)
        assert caught.value.field == "target_bytes"
    assert b.plan_compaction(target_bytes=10**30).moves == ()  # larger than any segment: nothing to move



def test_a_target_that_is_not_a_whole_number_of_blocks_keeps_every_cache_aligned(monkeypatch) -> None:
    """The state machine's failing example, replayed: Defragment with target_bytes 16385
    in a pool of 4 KiB blocks slid a cache to offset 24577, and the next allocation
    landed there. The target is now rounded up to the pool's block size first."""
    from tests.core import test_state_machine
    from tests.core.test_state_machine import BrokerMachine

    monkeypatch.setattr(test_state_machine, "event", lambda *args: None)  # outside a Hypothesis run
    machine = BrokerMachine()
    try:
        machine.compact_targeted(device="d1", fragment=2, pool="c", size=4097, want=16385)
        machine.accounting()
        machine.check_bytes()
        machine.session_allocate(backend=0, index=0, pinned=0, pool="c", retain=False, size=1)
        machine.accounting()
    finally:
        machine.teardown()
