"""The queue of allocations waiting for room: highest priority first, then arrival.

Only the head of the queue retries, and only when woken (memory was freed: a release,
an unpin, a session's end, a retired segment, a reclamation, a finished compaction), so
a large request is never starved by a stream of small ones that would each fit. A
waiter that leaves (served, timed out, cancelled) wakes the next head, which may fit
where the leaver did not.

Waiting is bounded by the caller with ``asyncio.timeout()`` around ``wait``, never with
``asyncio.wait_for``: on Python 3.11 ``wait_for`` returns the inner result and swallows
the caller's cancellation when the wake-up and the cancel land in the same loop step,
and the allocation would then go on for a caller that is gone.

Cost: ``join`` and ``leave`` are O(log n) (a heap with lazy removal: a waiter that
leaves is only marked, and dropped when it reaches the top); ``is_head`` is amortized
O(1). Not thread-safe: it lives on the engine's event loop.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools


class Waiter:
    """One queued allocation. ``rank`` orders the queue: (-priority, arrival)."""

    __slots__ = ("rank", "wake", "active", "pool")

    def __init__(self, rank: tuple[int, int], pool: str = "") -> None:
        self.rank = rank
        self.wake = asyncio.Event()
        self.active = True
        self.pool = pool

    def __lt__(self, other: Waiter) -> bool:
        return self.rank < other.rank


class WaitQueue:
    def __init__(self) -> None:
        self._heap: list[Waiter] = []
        self._arrivals = itertools.count()
        self._active = 0
        #: pool -> waiters queued now, and every waiter that joined so far (operators'
        #: figures: Stats and the waiting-queue metric).
        self.depth: dict[str, int] = {}
        self.joined: dict[str, int] = {}

    def __len__(self) -> int:
        """Waiters still queued."""
        return self._active

    def join(self, priority: int, pool: str = "") -> Waiter:
        waiter = Waiter((-priority, next(self._arrivals)), pool)
        heapq.heappush(self._heap, waiter)
        self._active += 1
        self.depth[pool] = self.depth.get(pool, 0) + 1
        self.joined[pool] = self.joined.get(pool, 0) + 1
        return waiter

    def leave(self, waiter: Waiter) -> None:
        """Take ``waiter`` out (idempotent) and wake whoever is head now."""
        if waiter.active:
            waiter.active = False
            self._active -= 1
            self.depth[waiter.pool] -= 1
        self.wake_head()

    def is_head(self, waiter: Waiter) -> bool:
        self._trim()
        return bool(self._heap) and self._heap[0] is waiter

    def wake_head(self) -> None:
        """Let the head retry (memory was freed, or the previous head left)."""
        self._trim()
        if self._heap:
            self._heap[0].wake.set()

    @staticmethod
    async def wait(waiter: Waiter) -> None:
        """Until ``waiter`` is woken. Clear ``waiter.wake`` *before* each attempt to
        place, so a wake-up that arrives during the attempt is not lost."""
        await waiter.wake.wait()

    def _trim(self) -> None:
        heap = self._heap
        while heap and not heap[0].active:
            heapq.heappop(heap)
