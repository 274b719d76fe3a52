"""FreeSpace: take/give/coalesce, take_at, size classes, largest extent, and a model test."""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from kvbroker.core.freespace import (
    FreeSpace,
    _class_ceil,
    _class_floor,
    address,
    split_address,
)

U = 4096  # unit (block) bytes used by most tests


def extents(fs: FreeSpace) -> list[tuple[int, int, int]]:
    """Free extents as sorted (segment, offset, nbytes)."""
    return sorted((*split_address(a), n) for a, n in fs.extents())


def fresh(*sizes_in_units: int, unit: int = U) -> FreeSpace:
    fs = FreeSpace(unit)
    for i, units in enumerate(sizes_in_units, start=1):
        fs.add_segment(i, units * unit)
    return fs


# --- addresses and size classes ---------------------------------------------------------


def test_address_round_trip() -> None:
    for seg, off in [(0, 0), (1, 0), (7, 4096), (123456, (1 << 48) - 1)]:
        assert split_address(address(seg, off)) == (seg, off)
    assert address(2, 0) > address(1, (1 << 48) - 1)


def test_size_classes_are_monotone_and_ceil_is_exact() -> None:
    previous = -1
    for units in range(0, 5000):
        cls = _class_floor(units)
        assert cls >= previous
        previous = cls
    # _class_ceil(u) is the first class whose every member is >= u.
    members: dict[int, list[int]] = {}
    for units in range(1, 5000):
        members.setdefault(_class_floor(units), []).append(units)
    for units in range(1, 4000):
        ceil = _class_ceil(units)
        assert min(members[ceil]) >= units
        assert ceil == _class_floor(units) or min(members[_class_floor(units)]) < units
        # and it is the first such class
        assert ceil - 1 < 0 or ceil - 1 not in members or min(members[ceil - 1]) < units


def test_class_spans_at_most_an_eighth() -> None:
    members: dict[int, list[int]] = {}
    for units in range(1, 1 << 14):
        members.setdefault(_class_floor(units), []).append(units)
    for cls, us in members.items():
        assert max(us) - min(us) + 1 <= max(1, min(us) // 8), (cls, min(us), max(us))


def test_rejects_bad_unit() -> None:
    for unit in (0, -4, 3, 4097):
        with pytest.raises(ValueError):
            FreeSpace(unit)


# --- take / give / coalesce -------------------------------------------------------------


def test_take_from_fresh_segment_then_give_back_coalesces() -> None:
    fs = fresh(16)
    a = fs.take(4 * U)
    b = fs.take(4 * U)
    c = fs.take(4 * U)
    assert [split_address(x) for x in (a, b, c)] == [(1, 0), (1, 4 * U), (1, 8 * U)]
    assert fs.free_bytes == 4 * U and fs.segment_free_bytes(1) == 4 * U
    assert extents(fs) == [(1, 12 * U, 4 * U)]
    fs.check()
    fs.give(b, 4 * U)  # hole in the middle: no neighbour is free
    assert extents(fs) == [(1, 4 * U, 4 * U), (1, 12 * U, 4 * U)]
    fs.check()
    fs.give(c, 4 * U)  # merges with both neighbours
    assert extents(fs) == [(1, 4 * U, 12 * U)]
    fs.check()
    fs.give(a, 4 * U)  # merges with the next one
    assert extents(fs) == [(1, 0, 16 * U)]
    assert fs.free_bytes == 16 * U == fs.segment_free_bytes(1)
    fs.check()


def test_give_merges_with_previous_only() -> None:
    fs = fresh(8)
    a, b = fs.take(4 * U), fs.take(4 * U)
    fs.give(a, 4 * U)
    fs.give(b, 4 * U)
    assert extents(fs) == [(1, 0, 8 * U)]
    fs.check()


def test_never_coalesces_across_segments() -> None:
    fs = fresh(4, 4)
    a = fs.take(4 * U)
    b = fs.take(4 * U)
    assert {split_address(a)[0], split_address(b)[0]} == {1, 2}
    fs.give(a, 4 * U)
    fs.give(b, 4 * U)
    assert extents(fs) == [(1, 0, 4 * U), (2, 0, 4 * U)]
    assert fs.largest_extent() == 4 * U
    assert fs.take(8 * U) is None  # 8 units free in total, but never contiguous
    fs.check()


def test_take_refuses_only_when_no_extent_fits() -> None:
    # Extents whose sizes sit in one size class: a request in the middle of the class
    # must still find the member that fits.
    fs = FreeSpace(1)
    fs.add_segment(1, 1000)
    a = fs.take(104)
    fs.take(1)
    b = fs.take(111)
    fs.take(1)
    assert (split_address(a), split_address(b)) == ((1, 0), (1, 105))
    fs.give(a, 104)
    fs.give(b, 111)
    assert fs.take(1000 - 217) is not None  # the tail, so only the two holes remain
    # 104 and 111 share a size class; 108 lies inside it, so the class above is empty
    # and the request's own class must be scanned for the member that fits.
    assert _class_floor(104) == _class_floor(111) == _class_floor(108) != _class_ceil(108)
    got = fs.take(108)
    assert got is not None and split_address(got) == (1, 105)
    assert fs.take(105) is None  # only 104 and 3 bytes left
    assert fs.take(104) is not None
    assert fs.free_bytes == 3
    fs.check()


def test_take_exact_fit_and_last_byte() -> None:
    fs = fresh(3)
    assert fs.take(3 * U) is not None
    assert fs.free_bytes == 0 and fs.largest_extent() == 0
    assert fs.take(U) is None
    assert extents(fs) == []
    fs.check()


def test_largest_extent_tracks_the_biggest() -> None:
    fs = fresh(64, 10)
    assert fs.largest_extent() == 64 * U
    x = fs.take(60 * U)
    assert split_address(x)[0] == 1
    assert fs.largest_extent() == 10 * U
    fs.give(x, 60 * U)
    assert fs.largest_extent() == 64 * U
    fs.check()


def test_take_at_carves_exact_range() -> None:
    fs = fresh(16)
    fs.take_at(address(1, 4 * U), 2 * U)
    assert extents(fs) == [(1, 0, 4 * U), (1, 6 * U, 10 * U)]
    fs.take_at(address(1, 0), 4 * U)  # whole extent
    fs.take_at(address(1, 14 * U), 2 * U)  # end of an extent
    assert extents(fs) == [(1, 6 * U, 8 * U)]
    assert fs.free_bytes == 8 * U == fs.segment_free_bytes(1)
    fs.check()
    with pytest.raises(RuntimeError, match="not free"):
        fs.take_at(address(1, 5 * U), 2 * U)  # straddles allocated bytes
    with pytest.raises(RuntimeError, match="not free"):
        fs.take_at(address(1, 12 * U), 4 * U)  # runs past the free extent
    fs.check()


def test_segments_add_and_remove() -> None:
    fs = fresh(4)
    fs.add_segment(9, 8 * U)
    assert sorted(fs.segment_ids()) == [1, 9]
    assert fs.free_bytes == 12 * U
    with pytest.raises(RuntimeError):
        fs.add_segment(9, U)
    a = fs.take(8 * U)
    assert split_address(a)[0] == 9
    with pytest.raises(RuntimeError, match="allocated"):
        fs.remove_segment(9)
    fs.give(a, 8 * U)
    fs.remove_segment(9)
    assert fs.segment_ids() == [1] and fs.free_bytes == 4 * U
    assert extents(fs) == [(1, 0, 4 * U)]
    fs.check()
    with pytest.raises(ValueError):
        fs.add_segment(10, 0)


def test_segment_extents_sorted_and_scoped() -> None:
    fs = fresh(8, 8)
    a = fs.take(2 * U)
    b = fs.take(2 * U)
    seg_a = split_address(a)[0]
    assert split_address(b)[0] == seg_a
    fs.give(a, 2 * U)
    got = fs.segment_extents(seg_a)
    assert got == [(address(seg_a, 0), 2 * U), (address(seg_a, 4 * U), 4 * U)]
    other = 2 if seg_a == 1 else 1
    assert fs.segment_extents(other) == [(address(other, 0), 8 * U)]


def test_check_catches_corruption() -> None:
    fs = fresh(8)
    fs.check()
    fs.free_bytes += U
    with pytest.raises(AssertionError):
        fs.check()


# --- model-based test -------------------------------------------------------------------


class FreeSpaceModel(RuleBasedStateMachine):
    """FreeSpace against a list of free (segment, offset, nbytes) ranges."""

    UNIT = 512

    def __init__(self) -> None:
        super().__init__()
        self.fs = FreeSpace(self.UNIT)
        self.sizes: dict[int, int] = {}
        self.free: list[tuple[int, int, int]] = []  # merged, sorted
        self.taken: list[tuple[int, int, int]] = []
        self.next_segment = 1

    def _merge(self) -> None:
        merged: list[tuple[int, int, int]] = []
        for seg, off, n in sorted(self.free):
            if merged and merged[-1][0] == seg and merged[-1][1] + merged[-1][2] == off:
                merged[-1] = (seg, merged[-1][1], merged[-1][2] + n)
            else:
                merged.append((seg, off, n))
        self.free = merged

    def _carve(self, seg: int, off: int, n: int) -> None:
        for i, (s, o, size) in enumerate(self.free):
            if s == seg and o <= off and off + n <= o + size:
                del self.free[i]
                if off > o:
                    self.free.append((s, o, off - o))
                if o + size > off + n:
                    self.free.append((s, off + n, o + size - off - n))
                self._merge()
                return
        raise AssertionError(f"model: {(seg, off, n)} is not free")

    @rule(units=st.integers(1, 600))
    def add_segment(self, units: int) -> None:
        seg = self.next_segment
        self.next_segment += 1
        self.fs.add_segment(seg, units * self.UNIT)
        self.sizes[seg] = units * self.UNIT
        self.free.append((seg, 0, units * self.UNIT))
        self._merge()

    @rule(units=st.one_of(st.integers(1, 16), st.integers(1, 700)))
    def take(self, units: int) -> None:
        n = units * self.UNIT
        fits = any(size >= n for _, _, size in self.free)
        addr = self.fs.take(n)
        assert (addr is not None) == fits, (n, self.free)
        if addr is not None:
            seg, off = split_address(addr)
            # TLSF carves from the start of a free extent.
            assert any(s == seg and o == off and size >= n for s, o, size in self.free)
            self._carve(seg, off, n)
            self.taken.append((seg, off, n))

    @precondition(lambda self: self.taken)
    @rule(data=st.data())
    def give(self, data: st.DataObject) -> None:
        i = data.draw(st.integers(0, len(self.taken) - 1))
        seg, off, n = self.taken.pop(i)
        # give back a random sub-piece sometimes (the caller may free any run it owns)
        split = data.draw(st.integers(0, n // self.UNIT - 1)) * self.UNIT
        if split:
            self.taken.append((seg, off, split))
            off, n = off + split, n - split
        self.fs.give(address(seg, off), n)
        self.free.append((seg, off, n))
        self._merge()

    @precondition(lambda self: self.free)
    @rule(data=st.data())
    def take_at(self, data: st.DataObject) -> None:
        seg, off, size = data.draw(st.sampled_from(self.free))
        start = data.draw(st.integers(0, size // self.UNIT - 1)) * self.UNIT
        n = data.draw(st.integers(1, (size - start) // self.UNIT)) * self.UNIT
        self.fs.take_at(address(seg, off + start), n)
        self._carve(seg, off + start, n)
        self.taken.append((seg, off + start, n))

    @precondition(lambda self: any(
        (s, 0, n) in self.free for s, n in self.sizes.items()))
    @rule(data=st.data())
    def remove_segment(self, data: st.DataObject) -> None:
        empty = [s for s, n in self.sizes.items() if (s, 0, n) in self.free]
        seg = data.draw(st.sampled_from(empty))
        self.fs.remove_segment(seg)
        self.free.remove((seg, 0, self.sizes.pop(seg)))

    @precondition(lambda self: any(s in self.sizes and (s, 0, self.sizes[s]) not in self.free
                                   for s in self.sizes))
    @rule(data=st.data())
    def remove_busy_segment_refused(self, data: st.DataObject) -> None:
        busy = [s for s, n in self.sizes.items() if (s, 0, n) not in self.free]
        with pytest.raises(RuntimeError):
            self.fs.remove_segment(data.draw(st.sampled_from(busy)))

    @invariant()
    def matches_model(self) -> None:
        self.fs.check()
        assert extents(self.fs) == sorted(self.free)
        assert self.fs.free_bytes == sum(n for _, _, n in self.free)
        assert self.fs.largest_extent() == max((n for _, _, n in self.free), default=0)
        for seg, size in self.sizes.items():
            free = sum(n for s, _, n in self.free if s == seg)
            used = sum(n for s, _, n in self.taken if s == seg)
            assert self.fs.segment_free_bytes(seg) == free
            assert free + used == size


FreeSpaceModel.TestCase.settings = settings(max_examples=80, stateful_step_count=50, deadline=None)
TestFreeSpaceModel = FreeSpaceModel.TestCase
