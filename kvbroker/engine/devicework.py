"""Device work: every blocking backend call, run in a worker thread off the event loop.

Why: creating a segment touches every page (about 0.6 s per GiB on the host, see
``kvbroker/memory/host.py``), zeroing and compaction copies run at memory bandwidth, and
a CUDA free may synchronize the device. None of it may run on the loop, and none of it
runs while the engine is inside a core mutation: the core marks what is in flight
(pending caches, creating segments, compacting arenas: ``kvbroker/core/broker.py``) so
other calls stay correct meanwhile, and the engine commits or aborts when the thread is
done.

Frees are fire-and-forget for the caller: ``free_soon`` forgets the handles at once and
frees in a background thread; ``idle`` waits for every such task (``Engine.close`` and
tests use it). A thread cannot be cancelled, so a cancelled caller never stops a
create, zero, copy or free half-way: the engine shields them and cleans up after.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence

from kvbroker.core import Extent, Move, SegmentInfo
from kvbroker.engine.handles import HandleCache
from kvbroker.memory.backend import SegmentHandle, SegmentMemory

log = logging.getLogger(__name__)


class DeviceWork:
    def __init__(self, memories: Mapping[str, SegmentMemory], handles: HandleCache) -> None:
        self._memories = dict(memories)
        self._handles = handles
        self._tasks: set[asyncio.Task] = set()

    def memory(self, device_id: str) -> SegmentMemory:
        return self._memories[device_id]

    async def create(self, segment: SegmentInfo, *, prefault: bool = True) -> None:
        """Create a segment (``prefault``: see ``SegmentMemory.create``) and remember its
        handle. On failure the backend left nothing behind (its ``create`` contract) and
        the error propagates."""
        handle = await asyncio.to_thread(self._create, segment, prefault)
        self._handles.remember(segment, handle)

    def _create(self, segment: SegmentInfo, prefault: bool) -> SegmentHandle:
        memory = self._memories[segment.device_id]
        memory.create(segment, prefault=prefault)
        try:
            return memory.handle(segment.segment_id)
        except BaseException:
            memory.free(segment.segment_id)
            raise

    def zero_now(self, device_id: str, extent: Extent) -> None:
        """Zero one small extent on the calling thread (the loop): for extents up to
        ``kvbroker.engine.allocation.INLINE_ZERO_BYTES`` the memset is cheaper than the
        hop to a worker thread (measured there)."""
        self._memories[device_id].zero(extent.segment_id, extent.offset, extent.nbytes)

    async def zero(self, device_id: str, extent: Extent) -> None:
        """Zero one extent (the bytes a new tenant is about to get)."""
        await asyncio.to_thread(self._memories[device_id].zero, extent.segment_id, extent.offset, extent.nbytes)

    async def copy(self, device_id: str, moves: Sequence[Move]) -> None:
        """Apply moves in order (``SegmentMemory.copy``; raises its ``CopyError``)."""
        await asyncio.to_thread(self._memories[device_id].copy, moves)

    def free_soon(self, segments: Sequence[SegmentInfo]) -> None:
        """Forget the segments' handles now and free them in one background thread."""
        if not segments:
            return
        for segment in segments:
            self._handles.forget(segment.segment_id)
        self.track(asyncio.get_running_loop().create_task(asyncio.to_thread(self._free, tuple(segments))))

    def _free(self, segments: tuple[SegmentInfo, ...]) -> None:
        for segment in segments:
            try:
                self._memories[segment.device_id].free(segment.segment_id)
            except Exception:
                log.exception("freeing segment %d on %s failed", segment.segment_id, segment.device_id)

    def track(self, task: asyncio.Task) -> None:
        """Keep a background task alive until it is done (``idle`` waits for it)."""
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def idle(self) -> None:
        """Until no device work is in flight (work started meanwhile included)."""
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def close(self) -> None:
        """Wait for in-flight work, then free every backend's memory. Idempotent."""
        await self.idle()
        for memory in self._memories.values():
            await asyncio.to_thread(memory.close)
