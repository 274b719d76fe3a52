"""The engine: the pure core plus the device memory, driven from one asyncio event loop.

The core decides; backends hold bytes; the engine makes the two agree. It is the one
place that turns a core result into device work (create a segment, copy a compaction's
bytes, free retired segments) and it owns the only lock:

- Every mutation of the core runs on the event loop, under ``_lock``. Calls that need
  device work (a new segment, a compaction) keep the lock while the blocking work runs
  in a thread, so no other call can see a segment that is not backed yet or a cache
  whose bytes are still being copied. Calls without device work hold the lock for
  microseconds.
- Reads (``stats``, ``get``, ``caches``) take no lock: the core is only touched from the
  loop, so a read between two awaits sees a consistent state.

Waiting allocations (``wait_timeout_s``) sleep on a condition that every release, unpin
and retirement notifies, in arrival order.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple

from kvbroker.core import (
    AllocationRequest,
    Broker,
    BrokerStats,
    CacheInfo,
    CacheState,
    CompactionPlan,
    ResourceExhausted,
    SegmentInfo,
)
from kvbroker.core.errors import DeadlineExceeded, FailedPrecondition
from kvbroker.memory.backend import SegmentHandle, SegmentMemory

log = logging.getLogger(__name__)


class CacheHandle(NamedTuple):
    """Everything a client needs to map one cache: the segment and the range in it.
    (A NamedTuple: one is built per allocate, attach and pin.)"""

    instance_id: str
    server_pid: int
    segment: SegmentInfo
    backend: SegmentHandle
    byte_offset: int
    nbytes: int
    epoch: int


@dataclass(frozen=True, slots=True)
class DefragmentResult:
    caches_moved: int
    bytes_moved: int
    fragmentation_before: float
    fragmentation_after: float
    segments_freed: int
    duration_seconds: float
    dry_run: bool


class Engine:
    """The broker with bytes behind it.

    Args:
        broker: the core; the engine becomes its only caller.
        memories: one backend per device id of the broker.
        instance_id: identifies this daemon run in handles and shm names.
    """

    def __init__(self, broker: Broker, memories: Mapping[str, SegmentMemory], instance_id: str) -> None:
        missing = {d.device_id for d in broker.devices} - set(memories)
        if missing:
            raise ValueError(f"no memory backend for devices {sorted(missing)}")
        self.broker = broker
        self.instance_id = instance_id
        self.started_at = time.time()
        self._memories = dict(memories)
        self._lock = asyncio.Lock()
        self._freed = asyncio.Condition()
        self._pid = os.getpid()
        self._closed = False
        # segment id -> (segment, backend handle): both are fixed for a segment's life,
        # and every allocate, attach and pin needs them.
        self._segment_handles: dict[int, tuple[SegmentInfo, SegmentHandle]] = {}

    # -- allocation -------------------------------------------------------------------

    async def allocate(self, request: AllocationRequest, *, wait_timeout_s: float = 0.0) -> tuple[CacheInfo, CacheHandle]:
        """Place a cache and back it; wait up to ``wait_timeout_s`` for room.

        Raises the core's errors, and ``DeadlineExceeded`` when the wait times out.
        """
        deadline = time.monotonic() + wait_timeout_s
        while True:
            try:
                async with self._lock:
                    info = await self._allocate_locked(request)
                    return info, self._handle(info)
            except ResourceExhausted as err:
                remaining = deadline - time.monotonic()
                if not err.satisfiable or remaining <= 0:
                    if wait_timeout_s > 0 and err.satisfiable:
                        raise DeadlineExceeded(
                            f"no room within wait_timeout_ms={int(wait_timeout_s * 1000)}: {err}"
                        ) from None
                    raise
                async with self._freed:
                    try:
                        await asyncio.wait_for(self._freed.wait(), remaining)
                    except TimeoutError:
                        pass

    async def _allocate_locked(self, request: AllocationRequest) -> CacheInfo:
        for _ in range(8):
            result = self.broker.allocate(request)
            await self._free_segments(result.retired_segments)
            if result.compaction is not None:
                await self._apply(result.compaction)
                continue
            if result.new_segment is not None:
                try:
                    await asyncio.to_thread(self._memory(result.new_segment).create, result.new_segment)
                except BaseException:
                    self.broker.abort_allocation(result)
                    raise
            self.broker.drain_events()
            assert result.cache is not None
            return result.cache
        raise RuntimeError("allocation did not settle after repeated compactions")

    # -- holders and pins -------------------------------------------------------------

    async def release(self, cache_id: str, holder: str, *, force: bool = False) -> bool:
        async with self._lock:
            freed = self.broker.release(cache_id, holder, force=force)
            self.broker.drain_events()
        if freed:
            await self._notify_freed()
        return freed

    async def attach(self, cache_id: str, holder: str) -> tuple[CacheInfo, CacheHandle]:
        async with self._lock:
            info = self.broker.attach(cache_id, holder)
            return info, self._handle(info)

    async def pin(self, cache_id: str, holder: str) -> tuple[CacheInfo, CacheHandle]:
        async with self._lock:
            info = self.broker.pin(cache_id, holder)
            return info, self._handle(info)

    async def unpin(self, cache_id: str, holder: str) -> CacheInfo:
        async with self._lock:
            info = self.broker.unpin(cache_id, holder)
        await self._notify_freed()
        return info

    # -- queries ----------------------------------------------------------------------

    def stats(self) -> BrokerStats:
        return self.broker.stats()

    def caches(self, *, pool: str | None, model_name: str | None, state: CacheState | None) -> list[CacheInfo]:
        return self.broker.caches(pool=pool, model_name=model_name, state=state)

    def memory(self, device_id: str) -> SegmentMemory:
        return self._memories[device_id]

    # -- compaction -------------------------------------------------------------------

    async def defragment(self, *, device: str | None, pool: str | None, dry_run: bool) -> DefragmentResult:
        """Compact now: plan, copy the bytes off the loop, commit, free emptied segments."""
        started = time.perf_counter()
        async with self._lock:
            plan = self.broker.plan_compaction(device=device, pool=pool)
            freed = 0
            if not dry_run and plan.moves:
                freed = await self._apply(plan)
        if freed:
            await self._notify_freed()
        return DefragmentResult(
            caches_moved=plan.caches_moved,
            bytes_moved=plan.bytes_moved,
            fragmentation_before=plan.fragmentation_before,
            fragmentation_after=plan.fragmentation_after,
            segments_freed=len(plan.segments_emptied) if dry_run else freed,
            duration_seconds=time.perf_counter() - started,
            dry_run=dry_run,
        )

    async def _apply(self, plan: CompactionPlan) -> int:
        """Copy a plan's bytes (per device, in plan order) and commit it. Caller holds
        the lock. Returns the number of segments freed."""
        by_device: dict[str, list] = {}
        for move in plan.moves:
            device_id = self.broker.segment(move.source.segment_id).device_id
            by_device.setdefault(device_id, []).append(move)
        for device_id, moves in by_device.items():
            await asyncio.to_thread(self._memories[device_id].copy, moves)
        retired = self.broker.commit(plan)
        self.broker.drain_events()
        await self._free_segments(retired)
        return len(retired)

    # -- lifecycle --------------------------------------------------------------------

    async def close(self) -> None:
        """Free every backend's memory (unlinking host shm objects). Idempotent."""
        if self._closed:
            return
        self._closed = True
        async with self._lock:
            for memory in self._memories.values():
                await asyncio.to_thread(memory.close)

    # -- internals --------------------------------------------------------------------

    def _memory(self, segment: SegmentInfo) -> SegmentMemory:
        return self._memories[segment.device_id]

    def _handle(self, info: CacheInfo) -> CacheHandle:
        if info.state is not CacheState.RESIDENT or not info.extents:
            raise FailedPrecondition(f"cache {info.cache_id!r} was evicted")
        extent = info.extents[0]
        cached = self._segment_handles.get(extent.segment_id)
        if cached is None:
            segment = self.broker.segment(extent.segment_id)
            cached = (segment, self._memories[segment.device_id].handle(segment.segment_id))
            self._segment_handles[extent.segment_id] = cached
        segment, backend = cached
        return CacheHandle(
            self.instance_id, self._pid, segment, backend, extent.offset, info.nbytes, info.epoch
        )

    async def _free_segments(self, segments: tuple[SegmentInfo, ...]) -> None:
        for segment in segments:
            self._segment_handles.pop(segment.segment_id, None)
            await asyncio.to_thread(self._memory(segment).free, segment.segment_id)

    async def _notify_freed(self) -> None:
        async with self._freed:
            self._freed.notify_all()
