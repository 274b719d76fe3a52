"""Free space of one arena (one pool on one device): a TLSF-style index of free extents.

Why TLSF (two-level segregated fit) and not best-fit over a sorted list: placement and
release must stay O(1) with 100k live caches in pure Python. A sorted list makes every
insert an O(n) memmove; a balanced tree is not in the standard library. TLSF keeps one
bucket per size class (8 linear sub-classes per power of two, so a class spans at most
1/8 of its size) and a bitmap of non-empty classes, so a search is one shift and one
lowest-set-bit. It is a good fit rather than a best fit: a request takes any extent
from the first class whose every member is large enough, wasting at most 1/8 of that
extent's size in the choice (not in the placement: the remainder stays free). When no
such class exists, the request's own class is scanned for a member that fits, so a
request is refused only when no free extent is large enough.

Extents are addressed by one integer, ``segment_id << 48 | offset``, which makes
coalescing two dict look-ups (by start and by end) and cannot merge across segments
because offsets stay below ``2**48`` (256 TiB). All sizes are in blocks' bytes: the
caller rounds to its block size; this index only sees the multiples it is given.

Invariants (checked by ``check``): free extents never overlap or touch (touching ones are
merged); every free extent lies inside its segment; per segment, free bytes equal the sum
of its free extents.

Not thread-safe: one owner (the broker) calls it.
"""

from __future__ import annotations

from collections.abc import Iterator

_OFFSET_BITS = 48
_OFFSET_MASK = (1 << _OFFSET_BITS) - 1
_SUBCLASS_LOG2 = 3
_SUBCLASSES = 1 << _SUBCLASS_LOG2


def _class_floor(units: int) -> int:
    """The class an extent of ``units`` belongs to (rounding down)."""
    if units < _SUBCLASSES:
        return units
    top = units.bit_length() - 1
    return _SUBCLASSES + (top - _SUBCLASS_LOG2) * _SUBCLASSES + (
        (units >> (top - _SUBCLASS_LOG2)) & (_SUBCLASSES - 1)
    )


def _class_ceil(units: int) -> int:
    """The first class whose every member holds at least ``units``."""
    if units < _SUBCLASSES:
        return units
    top = units.bit_length() - 1
    return _class_floor(units + (1 << (top - _SUBCLASS_LOG2)) - 1)


def address(segment_id: int, offset: int) -> int:
    """Pack a (segment, offset) pair into one integer key."""
    return (segment_id << _OFFSET_BITS) | offset


def split_address(addr: int) -> tuple[int, int]:
    """Unpack ``address``: returns (segment_id, offset)."""
    return addr >> _OFFSET_BITS, addr & _OFFSET_MASK


def segment_of(addr: int) -> int:
    """The segment id of an ``address``."""
    return addr >> _OFFSET_BITS


class FreeSpace:
    """Free extents of a set of segments, placed in O(1) and coalesced on release.

    Args:
        unit_bytes: the granule every size and offset is a multiple of (the pool's block
            size); size classes are computed in these units.
    """

    __slots__ = ("_unit_shift", "_bins", "_bitmap", "_by_start", "_by_end", "_segment_free",
                 "_segment_size", "free_bytes")

    def __init__(self, unit_bytes: int) -> None:
        if unit_bytes <= 0 or unit_bytes & (unit_bytes - 1):
            raise ValueError(f"unit_bytes must be a power of two, got {unit_bytes}")
        self._unit_shift = unit_bytes.bit_length() - 1
        self._bins: dict[int, dict[int, int]] = {}
        self._bitmap = 0
        self._by_start: dict[int, int] = {}  # address -> nbytes
        self._by_end: dict[int, int] = {}  # end address -> start address
        self._segment_free: dict[int, int] = {}
        self._segment_size: dict[int, int] = {}
        #: Total free bytes over all segments.
        self.free_bytes = 0

    # -- segments ---------------------------------------------------------------------

    def add_segment(self, segment_id: int, nbytes: int) -> None:
        """Add a wholly free segment."""
        if segment_id in self._segment_size:
            raise RuntimeError(f"segment {segment_id} is already in this free space")
        if not 0 < nbytes <= _OFFSET_MASK:
            raise ValueError(f"segment size {nbytes} out of range")
        self._segment_size[segment_id] = nbytes
        self._segment_free[segment_id] = nbytes
        self.free_bytes += nbytes
        self._insert(address(segment_id, 0), nbytes)

    def remove_segment(self, segment_id: int) -> None:
        """Remove a segment; it must be wholly free."""
        size = self._segment_size[segment_id]
        if self._segment_free[segment_id] != size:
            raise RuntimeError(f"segment {segment_id} still has allocated bytes")
        self._remove(address(segment_id, 0), size)
        del self._segment_size[segment_id], self._segment_free[segment_id]
        self.free_bytes -= size

    def segment_free_bytes(self, segment_id: int) -> int:
        return self._segment_free[segment_id]

    def segment_ids(self) -> list[int]:
        return list(self._segment_size)

    # -- placement --------------------------------------------------------------------

    def take(self, nbytes: int) -> int | None:
        """Carve ``nbytes`` out of a free extent; return its address, or None.

        Cost: O(1) plus, only when no class above the request's own has an extent, a
        scan of the request's class. The class arithmetic is inlined: this is half of
        every allocation's work.
        """
        units = nbytes >> self._unit_shift
        if units < _SUBCLASSES:
            first = units
        else:
            top = units.bit_length() - 1
            ceil = units + (1 << (top - _SUBCLASS_LOG2)) - 1
            top = ceil.bit_length() - 1
            first = _SUBCLASSES + (top - _SUBCLASS_LOG2) * _SUBCLASSES + (
                (ceil >> (top - _SUBCLASS_LOG2)) & (_SUBCLASSES - 1)
            )
        mask = self._bitmap >> first
        if mask:
            cls = first + (mask & -mask).bit_length() - 1
            bucket = self._bins[cls]
            # The newest extent of the class (LIFO): popitem() is O(1), whereas taking
            # the oldest walks the dict's deleted slots, which pile up at its front.
            addr, size = bucket.popitem()
            if not bucket:
                self._bitmap &= ~(1 << cls)
            del self._by_start[addr]
            del self._by_end[addr + size]
        else:
            bucket = self._bins.get(_class_floor(units))
            if not bucket:
                return None
            for addr, size in bucket.items():
                if size >= nbytes:
                    break
            else:
                return None
            self._remove(addr, size)
        if size > nbytes:
            self._insert(addr + nbytes, size - nbytes)
        self._segment_free[addr >> _OFFSET_BITS] -= nbytes
        self.free_bytes -= nbytes
        return addr

    def take_at(self, addr: int, nbytes: int) -> None:
        """Carve exactly ``[addr, addr + nbytes)``, which must lie inside one free extent
        (used when committing a compaction move). Cost: O(1) when ``addr`` starts a free
        extent (every destination the planner picks does), else O(free extents of the
        segment) to find the enclosing one."""
        segment_id = addr >> _OFFSET_BITS
        start, size = addr, self._by_start.get(addr, 0)
        if size < nbytes:
            # The planner's destinations start free extents; anything else is searched.
            for start, size in self.segment_extents(segment_id):
                if start <= addr and addr + nbytes <= start + size:
                    break
            else:
                raise RuntimeError(f"[{addr:#x}, +{nbytes}) is not free")
        self._remove(start, size)
        if addr > start:
            self._insert(start, addr - start)
        if start + size > addr + nbytes:
            self._insert(addr + nbytes, start + size - addr - nbytes)
        self._segment_free[segment_id] -= nbytes
        self.free_bytes -= nbytes

    def give(self, addr: int, nbytes: int) -> None:
        """Return ``[addr, addr + nbytes)`` and merge it with free neighbours. O(1)."""
        segment_id = addr >> _OFFSET_BITS
        self._segment_free[segment_id] += nbytes
        self.free_bytes += nbytes
        start, end = addr, addr + nbytes
        prev_start = self._by_end.get(start)
        if prev_start is not None:
            self._remove(prev_start, start - prev_start)
            start = prev_start
        next_size = self._by_start.get(end)
        if next_size is not None:
            self._remove(end, next_size)
            end += next_size
        self._insert(start, end - start)

    # -- queries ----------------------------------------------------------------------

    def largest_extent(self) -> int:
        """Size of the largest free extent (0 if none). Cost: one class scan."""
        if not self._bitmap:
            return 0
        return max(self._bins[self._bitmap.bit_length() - 1].values())

    def extents(self) -> Iterator[tuple[int, int]]:
        """All free extents as (address, nbytes), in no particular order."""
        return iter(self._by_start.items())

    def segment_extents(self, segment_id: int) -> list[tuple[int, int]]:
        """Free extents of one segment, sorted by address. Cost: O(free extents)."""
        lo, hi = address(segment_id, 0), address(segment_id + 1, 0)
        return sorted((a, n) for a, n in self._by_start.items() if lo <= a < hi)

    def check(self) -> None:
        """Assert the invariants (for tests; O(n log n))."""
        per_segment: dict[int, int] = dict.fromkeys(self._segment_size, 0)
        last_end: dict[int, int] = {}
        for addr, size in sorted(self._by_start.items()):
            segment_id, offset = split_address(addr)
            assert size > 0, (addr, size)
            assert offset + size <= self._segment_size[segment_id], (addr, size)
            assert last_end.get(segment_id, -1) < offset, f"free extents touch at {addr:#x}"
            last_end[segment_id] = offset + size
            assert self._by_end[addr + size] == addr
            assert self._bins[_class_floor(size >> self._unit_shift)][addr] == size
            per_segment[segment_id] += size
        assert per_segment == self._segment_free, (per_segment, self._segment_free)
        assert sum(per_segment.values()) == self.free_bytes
        assert len(self._by_end) == len(self._by_start)
        assert sum(len(b) for b in self._bins.values()) == len(self._by_start)

    # -- internals --------------------------------------------------------------------

    def _insert(self, addr: int, nbytes: int) -> None:
        self._by_start[addr] = nbytes
        self._by_end[addr + nbytes] = addr
        units = nbytes >> self._unit_shift
        if units < _SUBCLASSES:
            cls = units
        else:  # _class_floor, inlined: every allocation and release comes through here
            top = units.bit_length() - 1
            cls = _SUBCLASSES + (top - _SUBCLASS_LOG2) * _SUBCLASSES + (
                (units >> (top - _SUBCLASS_LOG2)) & (_SUBCLASSES - 1)
            )
        bucket = self._bins.get(cls)
        if bucket is None:
            bucket = self._bins[cls] = {}
        if not bucket:
            self._bitmap |= 1 << cls
        bucket[addr] = nbytes

    def _remove(self, addr: int, nbytes: int) -> None:
        del self._by_start[addr]
        del self._by_end[addr + nbytes]
        cls = _class_floor(nbytes >> self._unit_shift)
        bucket = self._bins[cls]
        del bucket[addr]
        if not bucket:
            self._bitmap &= ~(1 << cls)
