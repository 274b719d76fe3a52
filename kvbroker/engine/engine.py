"""The engine: the pure core plus the device memory, driven from one asyncio event loop.

The core decides; backends hold bytes; the engine makes the two agree. This module is
the facade the server and the daemon call; the work is done by its parts:
``allocation`` (place, back, hand out, wait), ``compaction`` (copy and commit),
``devicework`` (every blocking backend call, in threads), ``handles``, ``sessions``
and ``background`` (the tick).

Concurrency invariant: **the core is mutated only in synchronous sections on the event
loop, and device work never runs inside one.** Each core call, and the bookkeeping that
depends on its result, runs without an ``await`` in between; that is the engine's lock
(the one loop thread serializes them, so an ``asyncio.Lock`` around code that never
awaits would never be contended). Device work (creating and zeroing segments,
compaction copies, frees) runs in threads between two such sections, and the core's
in-flight states (PENDING caches, CREATING segments, compacting arenas, MOVING caches;
see ``Broker.allocate``, ``begin_compaction`` and ``commit`` in ``kvbroker/core/broker.py``)
keep every other call correct meanwhile: an attach or pin of a PENDING, MOVING or
offloading cache waits for the work to end, then retries (and restores an OFFLOADED one,
``offload``); an allocation of a pool being compacted waits for the compaction. Reads
run between mutations and see a consistent state.

Sessions are the holders: every handle handed to a session is recorded as a mapping of
its segment; a session that ends (its Watch stream breaks, its lease runs out) loses
its holds, pins and mappings, and the core's events (EVICTED, MOVED, SEGMENT_RETIRED)
are queued for the sessions they concern after every mutation (``_settle``), and every
eviction the core made is logged there (INFO: cache, pool, device, bytes, cause, reason),
whichever path made it: the pressure ladder, background reclamation, a taken segment.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Collection, Mapping, Sequence

from kvbroker import __version__
from kvbroker.core import (
    is_sessionless,
    AllocationRequest,
    Broker,
    BrokerStats,
    CacheInfo,
    CacheState,
    Evicted,
    Event,
    EventKind,
    LimitsChange,
    SegmentInfo,
)
from kvbroker.engine.allocation import Allocator
from kvbroker.engine.background import Background, EngineSettings
from kvbroker.engine.compaction import Compactions
from kvbroker.engine.devicework import DeviceWork
from kvbroker.engine.handles import CacheHandle, HandleCache
from kvbroker.engine.offload import Offloader
from kvbroker.engine.persistence import Persistence, PersistenceObserver
from kvbroker.engine.ports import LiveFigures, NullObserver, Observer, RpcStats
from kvbroker.engine.sessions import SessionEvent, SessionOpened, SessionRegistry
from kvbroker.engine.views import MAX_LISTED_MOVES, CachePage, DefragmentResult, EngineStatus, MoveView, SessionView
from kvbroker.security import PeerIdentity
from kvbroker.memory.backend import SegmentMemory
from kvbroker.persistence import Store
from kvbroker.wire import SessionEndReason

log = logging.getLogger(__name__)


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
        self._observer: Observer = observer or NullObserver()
        self._sessions = SessionRegistry(self.settings.lease_seconds)
        self._started_at = time.time()
        self._handles = HandleCache(broker, memories, instance_id)
        self._device = DeviceWork(memories, self._handles)
        self._compactions = Compactions(broker, self._device, self._observer, self._settle)
        self._allocator = Allocator(broker, self._device, self._handles, self._compactions, self._observer, self._settle)
        self._background = Background(broker, self._sessions, self.settings, self._end_session_now, self._settle)
        self.offload = Offloader(broker, self._device, self._compactions, self._observer, self._settle,
                                 self._allocator.restore)  # the offload tier's copies (``offload``)
        self._allocator.offloading = self.offload.in_flight
        self._closed = False
        self.checkpoints: Persistence | None = None  # set by ``persist``
        #: Called with a session's id when it ends (paged pools drop its sequences).
        self.session_end_hooks: list[Callable[[str], None]] = []
        #: Per paged pool, its block and token figures (set by ``kvbroker.engine.paged``).
        self.paged_figures: Callable[[], dict] = dict

    # -- lifecycle --------------------------------------------------------------------

    def start(self) -> None:
        """Start the background tick (call from the running loop)."""
        self._background.start()

    async def shutting_down(self) -> None:
        """Tell every watching session that the broker stops, and end their sessions
        (reason ``BROKER_STOPPING``; their streams end after ``SHUTTING_DOWN``)."""
        event = Event(EventKind.SHUTTING_DOWN, frozenset(), reason="broker stopping")
        for session_id in self._sessions.broadcast(event):
            self._end_session_now(session_id, SessionEndReason.BROKER_STOPPING)

    async def close(self) -> None:
        """Stop the tick, wait for device work in flight, free every backend's memory
        (unlinking host shm objects). Idempotent."""
        if self._closed:
            return
        self._closed = True
        await self._background.stop()
        await self._device.close()

    async def idle(self) -> None:
        """Until no device work (creation, zeroing, copy, offload, free) is in flight."""
        await self._device.idle()

    def persist(self, store: Store, pools: frozenset[str], *, restore_grace_seconds: float,
                observer: PersistenceObserver | None = None) -> Persistence:  # fmt: skip
        """Checkpoint and restore ``pools``' caches in ``store`` (``kvbroker.engine.persistence``)."""
        self.checkpoints = Persistence(
            self.broker, self._device, self._allocator.allocate, self._settle, self._until_settled, store, pools,
            restore_grace_seconds=restore_grace_seconds, observer=observer, read_offloaded=self.offload.read_copy,
        )  # fmt: skip
        return self.checkpoints

    # -- allocation, holders and pins -------------------------------------------------

    async def allocate(self, request: AllocationRequest, *, wait_timeout_s: float = 0.0) -> tuple[CacheInfo, CacheHandle]:
        """Place a cache, back it and hand it out; wait up to ``wait_timeout_s`` for
        room (see ``kvbroker.engine.allocation``). A cancelled call holds nothing."""
        self._touch(request.holder)
        try:
            placed = await self._allocator.allocate(request, wait_timeout_s)
        except BaseException as err:
            self._observer.allocation_finished(request.pool, err)
            raise
        self._observer.allocation_finished(request.pool, None)
        return placed

    async def release(self, cache_id: str, holder: str, *, force: bool = False) -> bool:  # True: freed
        self._touch(holder)
        freed = self.broker.release(cache_id, holder, force=force)
        self._settle((), True)  # freed bytes, or a dropped pin that makes eviction possible
        return freed

    async def attach(self, cache_id: str, holder: str, *, wait_timeout_s: float = 0.0) -> tuple[CacheInfo, CacheHandle]:
        """Hold an existing cache; waits while it is being created, moved or offloaded,
        restores an offloaded one (waiting up to ``wait_timeout_s`` for room, as an
        allocation does)."""
        self._touch(holder)
        await self._until_settled(cache_id, holder, wait_timeout_s)
        info = self.broker.attach(cache_id, holder)
        return info, self._handles.for_cache(info, holder)

    async def pin(self, cache_id: str, holder: str) -> tuple[CacheInfo, CacheHandle]:
        """Pin (and hold) a cache; waits and restores as ``attach``."""
        self._touch(holder)
        await self._until_settled(cache_id, holder)
        info = self.broker.pin(cache_id, holder)
        return info, self._handles.for_cache(info, holder)

    async def unpin(self, cache_id: str, holder: str) -> CacheInfo:
        self._touch(holder)
        info = self.broker.unpin(cache_id, holder)
        self._settle((), not info.pinned)
        return info

    async def _until_settled(self, cache_id: str, holder: str | None = None, wait_timeout_s: float = 0.0) -> None:
        """Wait (outside any core section) while ``cache_id`` is PENDING, MOVING or being
        offloaded; then, for a ``holder``, restore it if OFFLOADED (and settle again if
        another holder's restore got there first)."""
        while True:
            busy = self._allocator.pending(cache_id) or self._compactions.moving(cache_id) or self.offload.pending(cache_id)
            if busy is not None:
                await busy.wait()
            elif holder is None or not await self.offload.restore_if_offloaded(cache_id, holder, wait_timeout_s):
                return

    # -- sessions ---------------------------------------------------------------------

    async def session_events(
        self, session_id: str, secret: str | None = None, *, client_name: str, pid: int, host: str,
        principal: str = "", peer: PeerIdentity | None = None,
    ) -> AsyncIterator[SessionEvent]:
        """Open (or attach a stream to) a session and yield its events: first
        ``SessionOpened`` (with the session's secret), then the core's events, and
        ``SessionEnded`` last when the broker ended the session. Leaving the iteration
        (the stream broke) ends the session (``STREAM_CLOSED``). Raises, on the first
        step, ``Unauthenticated`` when the session exists and ``secret`` is not its own,
        and ``AlreadyExists`` when another stream watches it."""
        session, opened = self._sessions.watch(
            session_id, secret, client_name=client_name, pid=pid, host=host, principal=principal, peer=peer
        )
        if opened:
            self._observer.session_opened()
            log.info("session %s opened (%s pid %d on %s%s%s)", session_id, client_name or "?", pid, host or "?",
                     f", principal {principal}" if principal else "",
                     f", peer uid {peer.uid} pid {peer.pid}" if peer else "")  # fmt: skip
        try:
            yield SessionOpened(session_id, self._sessions.lease_seconds, self.instance_id, session.secret)
            async with contextlib.aclosing(self._sessions.stream(session)) as events:
                async for event in events:
                    yield event
        finally:
            # Synchronous, so it completes even while the stream's task is cancelled.
            self._end_session_now(session_id, SessionEndReason.STREAM_CLOSED, only=session)

    def identify(
        self, session_id: str, secret: str | None, *, principal: str = "", peer: PeerIdentity | None = None
    ) -> str | None:
        """Check that a call may act for ``session_id`` (its secret, its principal) and
        renew the session's lease. An unknown id opens a lease-only session: its new
        secret is returned, for the caller to learn; None otherwise. Raises
        ``Unauthenticated``."""
        session, opened = self._sessions.identify(session_id, secret, principal=principal, peer=peer)
        if opened:
            self._observer.session_opened()
            return session.secret
        return None

    def heartbeat(self, session_id: str) -> float:  # renews the lease; returns its seconds
        self._touch(session_id)
        return self._sessions.lease_seconds

    async def end_session(self, session_id: str, reason: SessionEndReason) -> list[str]:
        """End a session: its holds, pins and mappings go, its non-retained caches are
        freed, segments only it mapped go back to the device. Idempotent. Returns the
        freed cache ids."""
        return self._end_session_now(session_id, reason)

    def _end_session_now(self, session_id: str, reason: SessionEndReason, *, only: object = None) -> list[str]:
        session = self._sessions.close(session_id, reason, only=only)
        if session is None:
            return []
        self._observer.session_reclaimed(reason)
        freed, retired = self.broker.end_session(session_id)
        for hook in self.session_end_hooks:
            hook(session_id)
        self._settle(retired, True)
        log.info("session %s ended (%s): %d caches freed, %d segments retired",
                 session_id, reason.value, len(freed), len(retired))  # fmt: skip
        return freed

    async def report_unmapped(self, segment_id: int, generation: int, holder: str) -> None:
        """A session no longer maps a segment; a draining segment whose last mapper this
        was goes back to the device. A report about an older segment that had the same
        id (another generation) is ignored."""
        self._touch(holder)
        known = self._handles.generation(segment_id)
        if known is not None and known != generation:
            return
        retired = self.broker.note_unmapped(segment_id, holder)
        if retired is not None:
            self._settle((retired,), True)

    # -- queries ----------------------------------------------------------------------

    def sessions(self, principal: str | None = None) -> list[SessionView]:
        """Live sessions (of ``principal`` only, when given) with what each holds.
        Cost: O(sessions + the caches they hold): an operator's query."""
        now = self._sessions.now()
        out = []
        for s in self._sessions.sessions():
            if principal is not None and s.principal != principal:
                continue
            held = self.broker.holder_summary(s.session_id)
            out.append(SessionView(
                s.session_id, s.principal, s.client_name, s.pid, s.host, s.peer, now - s.opened_at,
                max(0.0, s.expires_at - now), s.watching, held.holds, held.pins, held.mapped_segments,
            ))  # fmt: skip
        return out

    def end_sessions(self, older_than_seconds: float, session_ids: Collection[str], dry_run: bool
                     ) -> tuple[list[SessionView], int]:  # fmt: skip
        """End (unless ``dry_run``) every session at least ``older_than_seconds`` old and,
        when ``session_ids`` is given, among those; as a lapsed lease would (seed 004's
        ``cleanup_sessions(max_age)``). Returns them as they were and the caches freed."""
        chosen = [v for v in self.sessions() if v.age_seconds >= older_than_seconds
                  and (not session_ids or v.session_id in session_ids)]  # fmt: skip
        if dry_run:
            return chosen, 0
        return chosen, sum(len(self._end_session_now(v.session_id, SessionEndReason.ENDED_BY_OPERATOR)) for v in chosen)

    def cache(self, cache_id: str) -> CacheInfo:
        """The cache's current view (its pool and holders, for authorization). Raises
        ``NotFound``, or ``FailedPrecondition`` for an evicted cache nobody holds."""
        return self.broker.get(cache_id)

    def stats(self) -> BrokerStats:
        return self.broker.stats()

    def status(self) -> EngineStatus:
        return EngineStatus(
            __version__, self.instance_id, time.time() - self._started_at,
            self._sessions.lease_seconds, self._observer.rpc_stats(), self.live(),
        )  # fmt: skip

    def live(self) -> LiveFigures:  # live sessions; per pool, allocations waiting now and waited so far
        queue = self._allocator.queue
        return LiveFigures(len(self._sessions), dict(queue.depth), dict(queue.joined), paged=self.paged_figures(),
                           offloaded=dict(self.broker.offload.by_pool))  # fmt: skip

    def list_caches(
        self, *, pool: str | None, model_name: str | None, state: CacheState | None, after: str, limit: int
    ) -> CachePage:
        """Caches ordered by id, after ``after``, at most ``limit`` (the core's paged
        index: O(limit log n) per page)."""
        caches, token = self.broker.list_caches(pool=pool, model_name=model_name, state=state, after=after, limit=limit)
        return CachePage(caches, token)

    @property
    def waiting(self) -> int:  # allocations waiting for room
        return len(self._allocator.queue)

    def memory(self, device_id: str) -> SegmentMemory:
        return self._device.memory(device_id)

    # -- compaction and background ----------------------------------------------------

    async def defragment(
        self, *, device: str | None, pool: str | None, dry_run: bool, target_bytes: int | None = None,
    ) -> DefragmentResult:
        """Compact now: plan (the full pack, or with ``target_bytes`` the fewest moves that
        open a free extent that large per arena), copy in threads, commit, free emptied
        segments; waits for compactions in flight first. Raises the copy's error after
        committing the completed moves (a result always describes the whole plan)."""
        started = time.perf_counter()
        await self._compactions.quiet()
        plan = self.broker.plan_compaction(device=device, pool=pool, target_bytes=target_bytes)
        # Read at plan time: the moves' segments exist now, emptied ones may not later.
        segment = self.broker.segment
        listed = []
        for move in plan.moves[:MAX_LISTED_MOVES]:
            info = segment(move.source.segment_id)
            listed.append(MoveView(move.cache_id, info.pool, info.device_id, move.source, move.destination))
        freed_bytes = sum(segment(sid).nbytes for sid in plan.segments_emptied)
        moved, nbytes = plan.caches_moved, plan.bytes_moved
        if not dry_run and plan.moves:
            outcome = await self._compactions.run(plan)
            if outcome.error is not None:
                raise outcome.error
            moved, nbytes = outcome.completed, outcome.bytes_moved
        return DefragmentResult(
            caches_moved=moved, bytes_moved=nbytes,
            fragmentation_before=plan.fragmentation_before, fragmentation_after=plan.fragmentation_after,
            segments_freed=len(plan.segments_emptied), duration_seconds=time.perf_counter() - started,
            dry_run=dry_run, before=plan.before, after=plan.after, segments_freed_bytes=freed_bytes,
            moves=tuple(listed), moves_total=len(plan.moves),
        )  # fmt: skip

    # -- operators --------------------------------------------------------------------

    async def evict(self, pool: str, *, idle_only: bool, device: str | None = None, by: str = "") -> Evicted:
        """Evict the pool's unpinned caches now, or only its idle retained ones
        (``PoolAdmin.evict``), once no compaction of the pool is in flight. ``by`` (the
        principal) goes to the INFO line that records it."""
        await self._compactions.quiet(pool)
        result = self.broker.admin.evict(pool, idle_only=idle_only, device=device)
        self._settle((), bool(result.cache_ids))
        log.info("pool %s: %s evicted %d %scaches (%d bytes)%s; %d kept", pool, by or "an operator",
                 len(result.cache_ids), "idle retained " if idle_only else "", result.nbytes,
                 f" on {device}" if device else "", result.kept)  # fmt: skip
        return result

    async def set_pool_limits(
        self, pool: str, *, max_bytes: int | None, min_bytes: int | None, priority: int | None,
        dry_run: bool = False, by: str = "",
    ) -> LimitsChange:  # fmt: skip
        """Change a pool's limits at run time (``PoolAdmin.set_limits``: a lower maximum
        gives segments back or is refused), once no compaction of the pool is in flight.
        Logged at INFO (never persisted: a restart reads the configuration again)."""
        await self._compactions.quiet(pool)
        change = self.broker.admin.set_limits(
            pool, max_bytes=max_bytes, min_bytes=min_bytes, priority=priority, dry_run=dry_run
        )
        if dry_run:
            return change
        self._allocator.pool_priority_changed(pool, change.after.priority)
        self._settle(change.retired, True)  # freed segments; a higher max may serve waiters
        b, a = change.before, change.after
        log.info("pool %s limits set by %s: max_bytes %d -> %d, min_bytes %d -> %d, priority %d -> %d; "
                 "%d caches evicted (%d bytes), %d segments retired, %d draining (not persisted)",
                 pool, by or "an operator", b.max_bytes, a.max_bytes, b.min_bytes, a.min_bytes, b.priority,
                 a.priority, len(change.evicted), change.evicted_bytes, len(change.retired),
                 len(change.draining))  # fmt: skip
        return change

    async def tick(self) -> None:
        """One round of background work (see ``kvbroker.engine.background``)."""
        self._background.tick()

    # -- internals --------------------------------------------------------------------

    def deliver(self, events: Sequence[Event]) -> None:
        """Queue events that another part made (a paged pool's) for their sessions."""
        self._sessions.deliver(events)

    def _touch(self, holder: str) -> None:
        if not is_sessionless(holder):
            self._sessions.touch(holder)

    def _settle(self, retired: Sequence[SegmentInfo], memory_freed: bool) -> None:
        """After a core mutation: start the offload tier's copies, queue the core's events
        for the sessions they concern, free retired segments (in a thread), and let the
        first waiting allocation retry when memory was freed."""
        self.offload.dispatch(self.broker.offload.drain_jobs())
        events = self.broker.drain_events()
        if events:
            self._sessions.deliver(events)
        evictions, dropped = self.broker.drain_evictions()
        for e in evictions:
            log.info("evicted cache %s (pool %s, device %s, %s = %d bytes, cause %s%s): %s",
                     e.cache_id, e.pool, e.device_id, _human_bytes(e.nbytes), e.nbytes, e.cause,
                     "" if e.held else ", no holder", e.reason)  # fmt: skip
        if dropped:
            log.warning("%d more evictions were not logged one by one (more than the core keeps)", dropped)
        if retired:
            self._device.free_soon(retired)
        if memory_freed or retired:
            self._allocator.queue.wake_head()


def _human_bytes(nbytes: int) -> str:
    """``1.37 GiB``: the eviction log's size for people (the exact count follows it)."""
    size, unit = float(nbytes), "B"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            break
        size /= 1024
    return f"{nbytes} B" if unit == "B" else f"{size:.2f} {unit}"
