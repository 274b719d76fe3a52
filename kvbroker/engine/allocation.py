"""Allocation: place in the core, back and zero in threads, hand out; or wait for room.

The path of one Allocate (the core's in-flight protocol, ``kvbroker/core/broker.py``):

1. **Place** (a synchronous core call): ``Broker.allocate`` puts the cache in PENDING,
   perhaps in a new CREATING segment, or answers with a compaction plan (run by
   ``Compactions``, then placement is asked again). A pool with a compaction in flight
   is waited for first (the core places nothing in a frozen arena).
2. **Back** (in threads, off the loop): create the new segment; zero the extent when the
   core says the bytes were used before (``needs_zeroing``) and the pool scrubs
   (``PoolSpec.scrub``): bytes one tenant released never reach the next tenant.
3. **Hand out** (synchronous): ``segment_created``, ``cache_ready``, the handle.

When the request does not fit and may wait (``wait_timeout_s``), it joins the
``WaitQueue`` and the head retries whenever memory is freed. A request the pressure
ladder answered by offloading caches (``kvbroker.core.offload``) retries when their
copy-outs end, waiting or not: that room is on its way. ``restore`` places an offloaded
cache the same way (its backing step copies its bytes back in).

Cancellation: a caller can vanish at any await (an RPC's deadline, a client gone).
Before placement nothing is held. Between placement and hand-out the device work runs in its own task, awaited
shielded: a thread cannot be stopped, so a cancelled caller leaves it running and the
allocation is aborted when it ends (``Broker.abort_allocation``, and the segment it
created is freed). The hand-out runs in the caller's own step right after the await, so
either the caller gets the cache or the cache is aborted; never a cache without a
caller. The wait is bounded with ``asyncio.timeout()`` (see ``waitqueue``).

Cost: a request that fits at once and needs no device work never suspends. Zeroing an
extent of at most ``INLINE_ZERO_BYTES`` runs on the loop, because the hop to a worker
thread costs more than the memset itself: on the 2-core development VM, allocate of
1 MiB in a reused place took 240 us at P50 with the zeroing in a thread and 13-23 us
without zeroing, while a 1 MiB memset takes about 16 us (``tests/memory/measure_zero.py``).
Larger extents are zeroed in a thread (1 GiB: about 20-26 ms), so the loop is never held
longer than a small memset.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence

from kvbroker.core import AllocateResult, AllocationRequest, Broker, CacheInfo, SegmentInfo
from kvbroker.core.errors import DeadlineExceeded, FailedPrecondition, ResourceExhausted
from kvbroker.engine.compaction import Compactions
from kvbroker.engine.devicework import DeviceWork
from kvbroker.engine.handles import CacheHandle, HandleCache
from kvbroker.engine.ports import Observer
from kvbroker.engine.waitqueue import WaitQueue

#: Compactions one allocation may run before giving up (each frees fragmented room).
MAX_COMPACTIONS = 8
#: Extents up to this size are zeroed on the loop, larger ones in a thread (see above).
INLINE_ZERO_BYTES = 2 << 20

Settle = Callable[[Sequence[SegmentInfo], bool], None]


class Allocator:
    """Allocations, their wait queue and their in-flight device work.

    Args:
        broker, device, handles, compactions, observer: the engine's parts.
        settle: the engine's "after a core mutation" step (deliver events, free the
            given segments, wake the queue's head when memory was freed).
    """

    def __init__(
        self, broker: Broker, device: DeviceWork, handles: HandleCache,
        compactions: Compactions, observer: Observer, settle: Settle,
    ) -> None:  # fmt: skip
        self._broker = broker
        self._device = device
        self._handles = handles
        self._compactions = compactions
        self._observer = observer
        self._settle = settle
        self.queue = WaitQueue()
        self._pending: dict[str, asyncio.Event] = {}  # cache id -> set when handed out or aborted
        #: pool -> the ``_pending`` events of its allocations that create a segment: the
        #: rest of such a segment becomes placeable when the event is set.
        self._creating: dict[str, set[asyncio.Event]] = {}
        #: pool -> the ``_pending`` events of all its allocations being backed: a restore
        #: (which cannot wait on its caller's behalf) retries after one ends, for a cache
        #: being backed cannot be pushed out but may be once it is ready.
        self._backing: dict[str, set[asyncio.Event]] = {}
        self._priority = {p.name: p.priority for p in broker.pools}
        self._scrub = {p.name: p.scrub for p in broker.pools}
        #: pool -> an event set when one of its copy-outs ends (``Offloader.in_flight``).
        self.offloading: Callable[[str], asyncio.Event | None] = lambda pool: None

    def pool_priority_changed(self, pool: str, priority: int) -> None:
        """An operator changed the pool's priority: waiters queued from now on rank by it."""
        self._priority[pool] = priority

    def pending(self, cache_id: str) -> asyncio.Event | None:
        """The event set when a PENDING cache is handed out or aborted (None: not pending)."""
        return self._pending.get(cache_id) if self._pending else None

    async def allocate(
        self, request: AllocationRequest, wait_timeout_s: float, fill: Callable[[CacheInfo], Awaitable[None]] | None = None
    ) -> tuple[CacheInfo, CacheHandle]:
        """Place, back and hand out one cache; wait up to ``wait_timeout_s`` for room.
        With ``fill`` (a checkpoint's restore), the backing step fills the new extent
        whole instead of zeroing it.

        Raises the core's errors, ``DeadlineExceeded`` when the wait runs out, and
        ``FailedPrecondition`` when the holder's session ended while the cache was being
        backed."""
        try:
            result = await self._place_after_creations(request)
        except ResourceExhausted as err:
            if not err.satisfiable or wait_timeout_s <= 0:
                raise
            result = await self._wait_and_place(request, wait_timeout_s, err)
        if fill is not None:
            result = result._replace(needs_zeroing=False)
        return await self._back(result, request.holder, fill)

    async def restore(
        self, cache_id: str, request: AllocationRequest, fill: Callable[[CacheInfo], Awaitable[None]],
        wait_timeout_s: float = 0.0,
    ) -> tuple[CacheInfo, CacheHandle]:
        """Place the OFFLOADED ``cache_id`` again (``request`` names its pool, size and
        holder), ``fill`` its new extent in the backing step, hand it out. Waits for room
        and raises as ``allocate``; a failed fill leaves it OFFLOADED, and a cache that
        stopped being OFFLOADED while this waited raises ``FailedPrecondition``."""
        place = lambda: self._broker.offload.place_restore(cache_id, request.holder)  # noqa: E731
        try:
            result = await self._place_after_creations(request, place)
        except ResourceExhausted as err:
            if not err.satisfiable or wait_timeout_s <= 0:
                raise
            result = await self._wait_and_place(request, wait_timeout_s, err, place)
        return await self._back(result._replace(needs_zeroing=False), request.holder, fill)

    async def _place_after_creations(
        self, request: AllocationRequest, place: Callable[[], AllocateResult] | None = None
    ) -> AllocateResult:
        """``_place``, retried after each segment of the pool that is being created: its
        free bytes are withheld until it exists, and a request that would fit in them
        must not fail (or make a segment of its own) because it arrived a moment early.
        A restore (``place``) also retries after each allocation of the pool being backed,
        and any request after each copy-out of the pool. Bounded: each retry follows one
        such end."""
        while True:
            try:
                return await self._place(request, place)
            except ResourceExhausted as err:
                self._settle((), False)  # start the copy-outs the ladder chose (and tell its evictions)
                creating = self._creating.get(request.pool) or (place is not None and self._backing.get(request.pool))
                busy = next(iter(creating)) if creating else self.offloading(request.pool)
                if not err.satisfiable or busy is None:
                    raise
                await busy.wait()

    # -- placing --------------------------------------------------------------------------

    async def _place(self, request: AllocationRequest, place: Callable[[], AllocateResult] | None = None) -> AllocateResult:
        """The core's placement, running the compactions it asks for. Raises
        ``ResourceExhausted`` when there is no room."""
        for _ in range(MAX_COMPACTIONS):
            if self._compactions:
                await self._compactions.quiet(request.pool)
            attributes = {"kvbroker.pool": request.pool, "kvbroker.nbytes": request.nbytes}
            with self._observer.span("placement", attributes) as span:
                result = self._broker.allocate(request) if place is None else place()
                span.set_attribute("kvbroker.outcome", _outcome(result))
                if result.cache is not None:
                    span.set_attribute("kvbroker.device", result.cache.device_id)
            if result.evicted:
                attributes = {"kvbroker.pool": request.pool, "kvbroker.caches": len(result.evicted)}
                with self._observer.span("eviction", attributes):
                    pass  # the core evicted while placing; this span records what it took
            self._settle(result.retired_segments, False)
            if result.compaction is None:
                return result
            outcome = await self._compactions.run(result.compaction)
            if outcome.error is not None:
                raise outcome.error
        raise RuntimeError(f"allocation did not settle after {MAX_COMPACTIONS} compactions")

    async def _wait_and_place(
        self, request: AllocationRequest, wait_timeout_s: float, error: ResourceExhausted,
        place: Callable[[], AllocateResult] | None = None,
    ) -> AllocateResult:
        priority = self._priority.get(request.pool, 0) if request.priority is None else request.priority
        waiter = self.queue.join(priority, request.pool)
        started = time.monotonic()
        scope = asyncio.timeout(wait_timeout_s)
        try:
            async with scope:
                while True:
                    waiter.wake.clear()  # before the attempt: a wake-up during it counts
                    if self.queue.is_head(waiter):
                        try:
                            return await self._place_after_creations(request, place)
                        except ResourceExhausted as err:
                            if not err.satisfiable:
                                raise
                            error = err
                    await self.queue.wait(waiter)
        except TimeoutError:
            if not scope.expired():
                raise
            raise DeadlineExceeded(
                f"no room within wait_timeout_ms={int(wait_timeout_s * 1000)}: {error}"
            ) from None
        finally:
            self.queue.leave(waiter)
            self._observer.allocation_waited(request.pool, time.monotonic() - started)

    # -- backing and handing out ----------------------------------------------------------

    async def _back(
        self, result: AllocateResult, holder: str, fill: Callable[[CacheInfo], Awaitable[None]] | None = None
    ) -> tuple[CacheInfo, CacheHandle]:
        cache = result.cache
        zero = result.needs_zeroing and self._scrub.get(cache.pool, True)
        if result.new_segment is None and zero and cache.extents[0].nbytes <= INLINE_ZERO_BYTES:
            try:
                self._device.zero_now(cache.device_id, cache.extents[0])
            except BaseException:
                self._abort(result, False, None)
                raise
            zero = False
        if result.new_segment is None and not zero and fill is None:
            return self._hand_out(result, holder, None)
        done = self._pending[cache.cache_id] = asyncio.Event()
        if result.new_segment is not None:
            self._creating.setdefault(cache.pool, set()).add(done)
        self._backing.setdefault(cache.pool, set()).add(done)
        work = asyncio.get_running_loop().create_task(self._device_work(result, zero, fill))
        self._device.track(work)
        try:
            await asyncio.shield(work)
        except asyncio.CancelledError:
            if work.done():
                self._abandon(result, work, done)
            else:
                work.add_done_callback(lambda w: self._abandon(result, w, done))
            raise
        except BaseException:
            self._abort(result, False, done)  # the work left nothing on the device
            raise
        return self._hand_out(result, holder, done)

    async def _device_work(
        self, result: AllocateResult, zero: bool, fill: Callable[[CacheInfo], Awaitable[None]] | None = None
    ) -> None:
        """Create the new segment and/or zero (or ``fill``) the extent; on failure leave
        nothing. A segment made for a ``fill`` is not prefaulted: the fill writes it."""
        segment = result.new_segment
        if segment is not None:
            attributes = {"kvbroker.device": segment.device_id, "kvbroker.nbytes": segment.nbytes}
            with self._observer.span("segment_create", attributes):
                await self._device.create(segment, prefault=fill is None)
        if zero or fill is not None:
            try:
                if fill is not None:
                    await fill(result.cache)
                else:
                    await self._device.zero(result.cache.device_id, result.cache.extents[0])
            except BaseException:
                if segment is not None:
                    self._device.free_soon((segment,))
                raise

    def _hand_out(self, result: AllocateResult, holder: str, done: asyncio.Event | None) -> tuple[CacheInfo, CacheHandle]:
        """The cache is backed: make it RESIDENT and build the caller's handle."""
        cache_id = result.cache.cache_id
        if result.new_segment is not None:
            self._broker.segment_created(result.new_segment.segment_id)
        ready = self._broker.cache_ready(cache_id)
        self._finish(cache_id, done)
        if not ready:
            self._settle((), True)
            raise FailedPrecondition("the session ended while the cache was being created")
        info = self._broker.get(cache_id)
        handle = self._handles.for_cache(info, holder)
        # A new segment's free bytes became placeable: the queue's head may now fit.
        self._settle((), result.new_segment is not None)
        return info, handle

    def _abandon(self, result: AllocateResult, work: asyncio.Task, done: asyncio.Event) -> None:
        """The caller was cancelled: undo the allocation once its device work ended (and
        free the segment it created, which nobody else could use yet)."""
        created = not work.cancelled() and work.exception() is None and result.new_segment is not None
        self._abort(result, created, done)

    def _abort(self, result: AllocateResult, created: bool, done: asyncio.Event | None) -> None:
        retired = tuple(self._broker.abort_allocation(result))
        if created:
            retired += (result.new_segment,)
        self._finish(result.cache.cache_id, done)
        self._settle(retired, True)

    def _finish(self, cache_id: str, done: asyncio.Event | None) -> None:
        if done is not None:
            if self._pending.get(cache_id) is done:
                del self._pending[cache_id]
            for index in (self._creating, self._backing):
                for pool, events in list(index.items()):
                    if done in events:
                        events.discard(done)
                        if not events:
                            del index[pool]
            done.set()


def _outcome(result: AllocateResult) -> str:
    """How the core answered one placement: ``placed``, ``new_segment`` or ``compaction``."""
    if result.compaction is not None:
        return "compaction"
    return "new_segment" if result.new_segment is not None else "placed"
