"""The allocators benchmarks/fragmentation.py compares: the kvbroker core (with and
without compaction) and a classic buddy allocator, the seeds' design."""

from __future__ import annotations

from benchmarks.frag.trace import BLOCK, BUDDY_MIN_BLOCK, POOL
from kvbroker.core import AllocationRequest, Broker, DeviceSpec, PoolSpec, ResourceExhausted


class CoreAllocator:
    """The kvbroker core on one device, one pool, one segment. ``targeted``: the pressure
    path opens one extent (the default); False packs the whole arena."""

    def __init__(
        self, capacity: int, *, compaction: bool, check: bool = False, block: int = BLOCK,
        targeted: bool = True,
    ) -> None:
        self.broker = Broker(
            [DeviceSpec("host", capacity)],
            [PoolSpec(POOL, ("host",), segment_bytes=capacity, block_bytes=block)],
            targeted_compaction=targeted,
        )
        self.capacity = capacity
        self.compaction = compaction
        self.check = check
        self.compactions = 0
        self.bytes_moved = 0
        self.caches_moved = 0
        self.last_refusal: tuple[int, int, int] | None = None  # (rounded, free, largest)
        self._reserved: dict[str, int] = {}

    def alloc(self, nbytes: int) -> str | None:
        request = AllocationRequest(pool=POOL, nbytes=nbytes)
        for _ in range(4):
            try:
                result = self.broker.allocate(
                    request, allow_eviction=False, allow_compaction=self.compaction
                )
            except ResourceExhausted as err:
                self.last_refusal = (
                    err.requested_bytes, err.free_bytes, err.largest_free_extent_bytes
                )
                return None
            if result.compaction is None:
                assert result.cache is not None
                # What the engine does once the bytes are backed (no device here).
                if result.new_segment is not None:
                    self.broker.segment_created(result.new_segment.segment_id)
                self.broker.cache_ready(result.cache.cache_id)
                if self.check:
                    self._reserved[result.cache.cache_id] = result.cache.reserved_bytes
                    self._check()
                return result.cache.cache_id
            plan = result.compaction
            self.compactions += 1
            self.bytes_moved += plan.bytes_moved
            self.caches_moved += plan.caches_moved
            self.broker.commit(plan)
            if self.check:
                self._check()
        raise RuntimeError("allocate returned a compaction plan four times in a row")

    def free(self, handle: str) -> None:
        if not self.broker.release(handle):
            raise RuntimeError(f"release({handle!r}) did not free the cache")
        if self.check:
            del self._reserved[handle]
            self._check()

    def _check(self) -> None:
        """Cross-check the core's accounting against the benchmark's own (``--check``)."""
        arena = self.broker._pools[POOL].arenas["host"]  # noqa: SLF001 - a check only
        arena.free.check()
        total = self.broker.stats().total
        reserved = sum(self._reserved.values())
        assert total.allocated_bytes == reserved, (total.allocated_bytes, reserved)
        assert total.active_caches == len(self._reserved), total
        if self.broker.segments():
            assert total.free_bytes == self.capacity - reserved, (total.free_bytes, reserved)


class BuddyAllocator:
    """A classic binary buddy allocator: free lists per power-of-two order, split on
    allocate, merge with the buddy (``offset ^ size``) on release."""

    def __init__(self, capacity: int, min_block: int = BUDDY_MIN_BLOCK) -> None:
        if capacity & (capacity - 1) or min_block & (min_block - 1):
            raise ValueError("capacity and min_block must be powers of two")
        self.min_order = min_block.bit_length() - 1
        self.max_order = capacity.bit_length() - 1
        self.free_lists: dict[int, set[int]] = {
            order: set() for order in range(self.min_order, self.max_order + 1)
        }
        self.free_lists[self.max_order].add(0)
        self.allocated: dict[int, int] = {}  # offset -> order
        self.capacity = capacity
        self.reserved_bytes = 0
        self.last_refusal: tuple[int, int, int] | None = None  # (rounded, free, largest)

    def alloc(self, nbytes: int) -> int | None:
        order = max(self.min_order, (nbytes - 1).bit_length())
        current = order
        while current <= self.max_order and not self.free_lists[current]:
            current += 1
        if current > self.max_order:
            largest = max((o for o, f in self.free_lists.items() if f), default=None)
            self.last_refusal = (
                1 << order, self.capacity - self.reserved_bytes, 0 if largest is None else 1 << largest
            )
            return None
        free = self.free_lists[current]
        offset = min(free)
        free.remove(offset)
        while current > order:
            current -= 1
            self.free_lists[current].add(offset + (1 << current))
        self.allocated[offset] = order
        self.reserved_bytes += 1 << order
        return offset

    def free(self, offset: int) -> None:
        order = self.allocated.pop(offset)
        self.reserved_bytes -= 1 << order
        while order < self.max_order:
            buddy = offset ^ (1 << order)
            siblings = self.free_lists[order]
            if buddy not in siblings:
                break
            siblings.remove(buddy)
            offset = min(offset, buddy)
            order += 1
        self.free_lists[order].add(offset)

