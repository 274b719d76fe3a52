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

Sessions (``kvbroker.sessions``) are the holders: every handle handed to a session is
recorded as a mapping of its segment; a session that ends (its Watch stream breaks, or
its lease runs out) loses its holds and pins and its mappings, and the core's events
(EVICTED, MOVED, SEGMENT_RETIRED) are queued for the sessions they concern after every
mutation.

Waiting allocations (``wait_timeout_s``) queue in priority order, first come first
served within a priority: only the head of the queue retries, whenever memory is freed
(a release, an unpin, a session's end, a segment retired, a reclamation), so a large
request is not starved by a stream of small ones. A request that fits on arrival is
served at once.

A background task renews nothing and decides nothing of its own: every
``tick_seconds`` it ends expired sessions, retires segments idle for
``segment_idle_seconds`` (draining mapped ones), and runs reclamation above
``gc_threshold``, each bounded so the loop is never held for long.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from contextlib import AbstractContextManager
from typing import Any, NamedTuple, Protocol

from kvbroker.core import (
    AllocateResult,
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
from kvbroker.core.types import ANONYMOUS_HOLDER, Event, EventKind
from kvbroker.memory.backend import SegmentHandle, SegmentMemory
from kvbroker.sessions import Session, SessionRegistry

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


class MethodStats(NamedTuple):
    """Latency and errors of one RPC method over ``RpcStats.window_seconds``."""

    method: str
    calls: int
    errors_by_code: tuple[tuple[str, int], ...]  # (status code name, calls), non-OK only
    p50_seconds: float
    p95_seconds: float
    p99_seconds: float


class RpcStats(NamedTuple):
    window_seconds: float
    methods: tuple[MethodStats, ...]


class Span(Protocol):
    def set_attribute(self, key: str, value: Any) -> None: ...


class Observer(Protocol):
    """What the engine tells telemetry (``kvbroker.telemetry`` implements it).

    Called on the event loop; every method returns in about a microsecond and never
    raises. ``span`` opens a tracing span that is the current one inside the ``with``
    block (attribute keys ``kvbroker.pool``, ``kvbroker.device``, ``kvbroker.nbytes``,
    ``kvbroker.outcome``...); an exception leaving the block is recorded on it.
    """

    def span(self, name: str, attributes: Mapping[str, Any]) -> AbstractContextManager[Span]: ...
    def allocation_finished(self, pool: str, error: BaseException | None) -> None: ...
    def allocation_waited(self, pool: str, seconds: float) -> None: ...
    def compaction_copied(self, device: str, nbytes: int, seconds: float) -> None: ...
    def session_opened(self) -> None: ...
    def session_reclaimed(self, reason: str) -> None: ...
    def rpc_stats(self) -> RpcStats | None: ...


class _NullSpan:
    def set_attribute(self, key: str, value: Any) -> None:
        pass

    def __enter__(self) -> _NullSpan:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


class NullObserver:
    """Telemetry off: every hook does nothing (one method call each)."""

    _span = _NullSpan()

    def span(self, name: str, attributes: Mapping[str, Any]) -> _NullSpan:
        return self._span

    def allocation_finished(self, pool: str, error: BaseException | None) -> None:
        pass

    def allocation_waited(self, pool: str, seconds: float) -> None:
        pass

    def compaction_copied(self, device: str, nbytes: int, seconds: float) -> None:
        pass

    def session_opened(self) -> None:
        pass

    def session_reclaimed(self, reason: str) -> None:
        pass

    def rpc_stats(self) -> RpcStats | None:
        return None


@dataclass(order=True)
class _Waiter:
    """A queued allocation: ordered by priority (highest first), then arrival."""

    rank: tuple[int, int]
    wake: asyncio.Event = field(compare=False, default_factory=asyncio.Event)


@dataclass(frozen=True)
class EngineSettings:
    """Timing of the engine's background work (see the module docstring)."""

    lease_seconds: float = 10.0
    segment_idle_seconds: float = 30.0
    tick_seconds: float = 0.25
    reclaim_batch: int = 64


class Engine:
    """The broker with bytes behind it.

    Args:
        broker: the core; the engine becomes its only caller.
        memories: one backend per device id of the broker.
        instance_id: identifies this daemon run in handles and shm names.
        settings: leases, idle-segment retirement and the background tick.
        observer: telemetry's hooks (``NullObserver`` when None).
    """

    def __init__(
        self,
        broker: Broker,
        memories: Mapping[str, SegmentMemory],
        instance_id: str,
        settings: EngineSettings | None = None,
        observer: Observer | None = None,
    ) -> None:
        missing = {d.device_id for d in broker.devices} - set(memories)
        if missing:
            raise ValueError(f"no memory backend for devices {sorted(missing)}")
        self.broker = broker
        self.instance_id = instance_id
        self.settings = settings or EngineSettings()
        self.observer: Observer = observer or NullObserver()
        self.sessions = SessionRegistry(self.settings.lease_seconds)
        self.started_at = time.time()
        self._memories = dict(memories)
        self._lock = asyncio.Lock()
        self._pid = os.getpid()
        self._closed = False
        # segment id -> (segment, backend handle): both are fixed for a segment's life,
        # and every allocate, attach and pin needs them.
        self._segment_handles: dict[int, tuple[SegmentInfo, SegmentHandle]] = {}
        self._waiters: list[_Waiter] = []
        self._arrivals = itertools.count()
        self._pool_priority = {p.name: p.priority for p in broker.pools}
        self._ticker: asyncio.Task | None = None

    # -- lifecycle --------------------------------------------------------------------

    def start(self) -> None:
        """Start the background tick (call from the running loop)."""
        if self._ticker is None:
            self._ticker = asyncio.get_running_loop().create_task(self._tick_forever())

    async def shutting_down(self) -> None:
        """Tell every watching session that the broker stops, and end their streams."""
        self.sessions.broadcast(Event(EventKind.SHUTTING_DOWN, frozenset(), reason="broker stopping"))
        for session in self.sessions.sessions():
            if session.watching:
                session.events.put_nowait(None)

    async def close(self) -> None:
        """Stop the tick and free every backend's memory (unlinking host shm objects).
        Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._ticker is not None:
            self._ticker.cancel()
            try:
                await self._ticker
            except asyncio.CancelledError:
                pass
        async with self._lock:
            for memory in self._memories.values():
                await asyncio.to_thread(memory.close)

    # -- allocation -------------------------------------------------------------------

    async def allocate(self, request: AllocationRequest, *, wait_timeout_s: float = 0.0) -> tuple[CacheInfo, CacheHandle]:
        """Place a cache and back it; wait up to ``wait_timeout_s`` for room.

        Raises the core's errors, and ``DeadlineExceeded`` when the wait times out. A
        cancelled call leaves the queue at once.
        """
        try:
            placed = await self._allocate(request, wait_timeout_s)
        except BaseException as err:
            self.observer.allocation_finished(request.pool, err)
            raise
        self.observer.allocation_finished(request.pool, None)
        return placed

    async def _allocate(self, request: AllocationRequest, wait_timeout_s: float) -> tuple[CacheInfo, CacheHandle]:
        self._touch(request.holder)
        try:
            return await self._allocate_once(request)
        except ResourceExhausted as err:
            if not err.satisfiable or wait_timeout_s <= 0:
                raise
            last_error = err
        priority = self._pool_priority.get(request.pool, 0) if request.priority is None else request.priority
        waiter = _Waiter((-priority, next(self._arrivals)))
        heapq.heappush(self._waiters, waiter)
        deadline = time.monotonic() + wait_timeout_s
        try:
            while True:
                if self._waiters[0] is waiter:
                    try:
                        return await self._allocate_once(request)
                    except ResourceExhausted as err:
                        if not err.satisfiable:
                            raise
                        last_error = err
                waiter.wake.clear()
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise DeadlineExceeded(
                        f"no room within wait_timeout_ms={int(wait_timeout_s * 1000)}: {last_error}"
                    )
                try:
                    await asyncio.wait_for(waiter.wake.wait(), remaining)
                except TimeoutError:
                    pass
        finally:
            self.observer.allocation_waited(request.pool, time.monotonic() - deadline + wait_timeout_s)
            self._waiters.remove(waiter)
            heapq.heapify(self._waiters)
            self._wake_head()

    async def _allocate_once(self, request: AllocationRequest) -> tuple[CacheInfo, CacheHandle]:
        async with self._lock:
            info = await self._allocate_locked(request)
            return info, self._handle(info, request.holder)

    async def _allocate_locked(self, request: AllocationRequest) -> CacheInfo:
        for _ in range(8):
            attributes = {"kvbroker.pool": request.pool, "kvbroker.nbytes": request.nbytes}
            with self.observer.span("placement", attributes) as span:
                result = self.broker.allocate(request)
                span.set_attribute("kvbroker.outcome", _placement_outcome(result))
                if result.cache is not None:
                    span.set_attribute("kvbroker.device", result.cache.device_id)
            if result.evicted:
                attributes = {"kvbroker.pool": request.pool, "kvbroker.caches": len(result.evicted)}
                with self.observer.span("eviction", attributes):
                    pass  # the core evicted while placing; this span records what it took
            await self._free_segments(result.retired_segments)
            if result.compaction is not None:
                await self._apply(result.compaction)
                continue
            if result.new_segment is not None:
                try:
                    segment = result.new_segment
                    attributes = {"kvbroker.device": segment.device_id, "kvbroker.nbytes": segment.nbytes}
                    with self.observer.span("segment_create", attributes):
                        await asyncio.to_thread(self._memory(segment).create, segment)
                except BaseException:
                    self.broker.abort_allocation(result)
                    raise
            self._dispatch()
            assert result.cache is not None
            return result.cache
        raise RuntimeError("allocation did not settle after repeated compactions")

    # -- holders and pins -------------------------------------------------------------

    async def release(self, cache_id: str, holder: str, *, force: bool = False) -> bool:
        self._touch(holder)
        async with self._lock:
            freed = self.broker.release(cache_id, holder, force=force)
            self._dispatch()
        if freed:
            self._wake_head()
        return freed

    async def attach(self, cache_id: str, holder: str) -> tuple[CacheInfo, CacheHandle]:
        self._touch(holder)
        async with self._lock:
            info = self.broker.attach(cache_id, holder)
            return info, self._handle(info, holder)

    async def pin(self, cache_id: str, holder: str) -> tuple[CacheInfo, CacheHandle]:
        self._touch(holder)
        async with self._lock:
            info = self.broker.pin(cache_id, holder)
            return info, self._handle(info, holder)

    async def unpin(self, cache_id: str, holder: str) -> CacheInfo:
        self._touch(holder)
        async with self._lock:
            info = self.broker.unpin(cache_id, holder)
        self._wake_head()
        return info

    # -- sessions ---------------------------------------------------------------------

    def watch(self, session_id: str, *, client_name: str, pid: int, host: str) -> Session:
        """Open (or attach a stream to) a session. Raises ``AlreadyExists`` when another
        stream watches it."""
        session, opened = self.sessions.watch(session_id, client_name=client_name, pid=pid, host=host)
        if opened:
            self.observer.session_opened()
            log.info("session %s opened (%s pid %d on %s)", session_id, client_name or "?", pid, host or "?")
        return session

    def heartbeat(self, session_id: str) -> float:
        """Renew a session's lease; returns the lease in seconds."""
        self._touch(session_id)
        return self.sessions.lease_seconds

    async def end_session(self, session_id: str, reason: str) -> list[str]:
        """End a session: its holds, pins and mappings go, its non-retained caches are
        freed, segments only it mapped are returned to the device. Idempotent. Returns
        the freed cache ids."""
        session = self.sessions.close(session_id)
        if session is None:
            return []
        self.observer.session_reclaimed(reason)
        async with self._lock:
            freed, retired = self.broker.end_session(session_id)
            self._dispatch()
            await self._free_segments(tuple(retired))
        log.info("session %s ended (%s): %d caches freed, %d segments retired",
                 session_id, reason, len(freed), len(retired))
        self._wake_head()
        return freed

    async def report_unmapped(self, segment_id: int, generation: int, holder: str) -> None:
        """A session no longer maps a segment; a draining segment whose last mapper this
        was goes back to the device."""
        self._touch(holder)
        async with self._lock:
            segment = self._segment_handles.get(segment_id)
            if segment is not None and segment[0].generation != generation:
                return  # a stale report about an older segment with a reused id
            retired = self.broker.note_unmapped(segment_id, holder)
            if retired is not None:
                await self._free_segments((retired,))
        if retired is not None:
            self._wake_head()

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
            self._wake_head()
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
        attributes = {"kvbroker.caches": plan.caches_moved, "kvbroker.nbytes": plan.bytes_moved}
        with self.observer.span("compaction", attributes):
            for device_id, moves in by_device.items():
                nbytes = sum(m.destination.nbytes for m in moves)
                with self.observer.span("copy", {"kvbroker.device": device_id, "kvbroker.nbytes": nbytes}):
                    started = time.perf_counter()
                    await asyncio.to_thread(self._memories[device_id].copy, moves)
                    self.observer.compaction_copied(device_id, nbytes, time.perf_counter() - started)
            retired = self.broker.commit(plan)
        self._dispatch()
        await self._free_segments(retired)
        return len(retired)

    # -- background work --------------------------------------------------------------

    async def tick(self) -> None:
        """One round of background work: expired sessions end, idle segments are given
        back, reclamation runs above gc_threshold (bounded batches)."""
        for session_id in self.sessions.expired():
            await self.end_session(session_id, "lease expired")
        async with self._lock:
            retired = self.broker.retire_idle_segments(self.settings.segment_idle_seconds)
            evicted = self.broker.reclaim(max_victims=self.settings.reclaim_batch)
            self._dispatch()
            await self._free_segments(tuple(retired))
        if retired or evicted:
            self._wake_head()

    async def _tick_forever(self) -> None:
        while True:
            await asyncio.sleep(self.settings.tick_seconds)
            try:
                await self.tick()
            except Exception:
                log.exception("background tick failed")

    # -- internals --------------------------------------------------------------------

    def _touch(self, holder: str) -> None:
        if holder != ANONYMOUS_HOLDER:
            self.sessions.touch(holder)

    def _dispatch(self) -> None:
        """Queue the core's pending events for the sessions they concern."""
        events = self.broker.drain_events()
        if events:
            self.sessions.deliver(events)

    def _wake_head(self) -> None:
        """Let the first waiting allocation try again (memory was freed)."""
        if self._waiters:
            self._waiters[0].wake.set()

    def _memory(self, segment: SegmentInfo) -> SegmentMemory:
        return self._memories[segment.device_id]

    def _handle(self, info: CacheInfo, holder: str) -> CacheHandle:
        if info.state is not CacheState.RESIDENT or not info.extents:
            raise FailedPrecondition(f"cache {info.cache_id!r} was evicted")
        extent = info.extents[0]
        cached = self._segment_handles.get(extent.segment_id)
        if cached is None:
            segment = self.broker.segment(extent.segment_id)
            cached = (segment, self._memories[segment.device_id].handle(segment.segment_id))
            self._segment_handles[extent.segment_id] = cached
        self.broker.note_mapped(extent.segment_id, holder)
        segment, backend = cached
        return CacheHandle(
            self.instance_id, self._pid, segment, backend, extent.offset, info.nbytes, info.epoch
        )

    async def _free_segments(self, segments: tuple[SegmentInfo, ...]) -> None:
        for segment in segments:
            self._segment_handles.pop(segment.segment_id, None)
            await asyncio.to_thread(self._memory(segment).free, segment.segment_id)


def _placement_outcome(result: AllocateResult) -> str:
    """How the core answered one placement: ``placed``, ``new_segment`` or ``compaction``."""
    if result.compaction is not None:
        return "compaction"
    return "new_segment" if result.new_segment is not None else "placed"
