"""The client's sans-IO core: every decision of ``BrokerClient`` and ``AsyncBrokerClient``,
and no I/O.

The core builds and validates requests, interprets responses and Watch events, and owns
the table of held caches (``Held`` records) and the session: its id, secret, lease, the
heartbeat and unmap schedule, and what a lost session means. The transports
(``kvbroker_client.sync``, ``kvbroker_client.aio``) only perform the calls it asks for,
so the two clients cannot drift apart and every rule is tested once.

How they talk: an operation is a *plan*, a generator that yields ``Call``s and receives
each response, or has the call's typed error thrown into it; it returns the result. The
stream is driven from outside: ``watch_call()``, ``on_event`` per event, then
``on_stream_end``; ``due(now)`` gives the heartbeat and ``ReportUnmapped`` calls. Time is
always passed in.

Sessions (issue 9.2): a session is over when its stream ends (``SESSION_ENDED``,
``SHUTTING_DOWN``, or the stream breaking), because the broker then drops its holds and
pins and frees its non-retained caches, whose bytes may go to another tenant at once.
The core marks every record held under it lost, so no new view of those bytes is ever
handed out (``SessionLost``), and moves to a new session id at once: the old id must not
be sent again (a call would re-open it as a lease-only session), and the client keeps
working. A retained record may have survived in the broker and is re-attached on next use.

Thread-safety: one lock guards the table and the session; no lock is held across a
yield, so a plan never blocks the watcher.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
from collections.abc import Callable
from typing import Any

from kvbroker import wire
from kvbroker.v1 import broker_pb2 as pb
from kvbroker_client.calls import Call, Plan, allocate_request, new_session_id
from kvbroker_client.held import Held, HeldState, Phase
from kvbroker_client.errors import (
    CacheEvicted,
    CacheNotFound,
    InvalidRequest,
    KvBrokerError,
    PreconditionFailed,
    SessionLost,
)

__all__ = ["ClientCore", "Held", "HeldState", "Phase"]

#: How often the transports ask ``due()`` (retired segments checked, heartbeats sent).
UNMAP_POLL_SECONDS = 0.2
#: Reconnection backoff while the broker is down: doubling from the first to the cap.
RECONNECT_FIRST_S, RECONNECT_MAX_S = 0.05, 2.0
#: A session that lived this long was healthy: its loss is retried at once.
STABLE_SESSION_S = 1.0


class ClientCore:
    """The state and rules of one client; see the module docstring.

    Args:
        target: the address, for messages (the transport dials it).
        timeout_s: deadline of each call; None for none.
        session_id: the first session's id; None generates one; ``""`` makes the client
            anonymous (no session, no Watch: the CLI). Later sessions get new ids.
        credentials: returns the metadata every call carries (``Credentials.metadata``).
    """

    def __init__(
        self, target: str, timeout_s: float | None, session_id: str | None,
        credentials: Callable[[], tuple[tuple[str, str], ...]] = tuple,
    ) -> None:
        if session_id and not wire.ID_PATTERN.fullmatch(session_id):
            raise InvalidRequest(f"session_id: {session_id!r} does not match {wire.ID_PATTERN.pattern}")
        self.target = target
        self.timeout_s = timeout_s
        self._credentials = credentials  # the metadata every call carries (tokens)
        self._lock = threading.RLock()
        self._phase_changed = threading.Condition(self._lock)
        self._base_id = session_id
        self._session_id = session_id if session_id is not None else new_session_id()
        self._phase = Phase.ANONYMOUS if session_id == "" else Phase.CONNECTING
        self._generation = 0 if session_id == "" else 1
        self._secret = ""
        self._held: dict[str, Held] = {}
        self._pending_unmaps: set[tuple[int, int]] = set()
        self._attempts = 0  # failed Watch attempts in a row: the reconnect backoff
        self._opened_at: float | None = None
        self._last_beat = 0.0
        self._client = (os.path.basename(sys.argv[0] or "python")[:128], os.getpid(), socket.gethostname()[:256])
        self._suspended = False
        self.lease_seconds = 10.0
        self.instance_id = ""
        #: Sessions this client lost so far, and why the last one ended.
        self.sessions_lost = 0
        self.last_loss = ""

    @property
    def session_id(self) -> str:
        """The current session's id; a new one after each lost session; "" if anonymous."""
        return self._session_id

    @property
    def generation(self) -> int:  # 1 for the first session, +1 per loss, 0 if anonymous
        return self._generation

    @property
    def phase(self) -> Phase:
        return self._phase

    @property
    def closed(self) -> bool:
        return self._phase is Phase.CLOSED

    def suspend_heartbeats(self, suspended: bool = True) -> None:
        """Test hook: stop (or, with False, restart) the schedule of ``due()``: no
        heartbeat, no report, so the lease lapses as if the process hung."""
        self._suspended = suspended

    def call(self, method: str, request: Any, extra_ms: int = 0) -> Call:
        """A call for the current session: its id, and its secret once the broker gave
        one (``wire.SESSION_SECRET_KEY``).

        Raises:
            RuntimeError: the client is closed.
        """
        with self._lock:
            if self._phase is Phase.CLOSED:
                raise RuntimeError(f"this client for {self.target} is closed")
            timeout = None if self.timeout_s is None else self.timeout_s + extra_ms / 1000
            return self._call(method, request, timeout)

    def metadata_when_open(self, call: Call, timeout: float | None) -> tuple[tuple[str, str], ...]:
        """The metadata to send ``call`` with, once its session is open: a session's
        secret exists only then, and the broker refuses its id without it. Blocks (up to
        ``timeout``) while the session is being opened; a call of an older session keeps
        its metadata (the broker refuses it: that session is gone)."""
        with self._lock:
            self._phase_changed.wait_for(lambda: self._phase is not Phase.CONNECTING, timeout)
            if call.generation != self._generation or not self._session_id:
                return call.metadata
            return self._call(call.method, call.request, call.timeout).metadata

    def _notify_phase(self) -> None:
        with self._phase_changed:  # the lock is re-entrant: callers may hold it already
            self._phase_changed.notify_all()

    def _call(self, method: str, request: Any, timeout: float | None) -> Call:
        metadata: tuple[tuple[str, str], ...] = self._credentials()
        if self._session_id:
            metadata += ((wire.SESSION_ID_KEY, self._session_id),)
            if self._secret:
                metadata += ((wire.SESSION_SECRET_KEY, self._secret),)
        return Call(method, request, metadata, timeout, self._generation)

    # -- plans: the client's calls ----------------------------------------------------

    def allocate(self, pool: str = "default", *, check: Callable[[pb.Handle], None] | None = None,
                 **arguments: Any) -> Plan[Held]:  # fmt: skip
        """Place a new cache and hold it (``allocate_request`` takes the arguments). When
        ``check(handle)`` raises (``handles.check_handle``: this process cannot reach the
        memory), the cache is released by force before the error propagates, so a failed
        call leaves no cache, retained or not (issue 10.1); a note on the error says how."""
        request = allocate_request(pool, **arguments)
        call = self.call("Allocate", request, request.wait_timeout_ms)
        response = yield call
        held = self._adopt(response.cache, response.handle, call.generation)
        try:
            check is None or check(response.handle)
        except Exception as err:
            try:
                yield from self.release(held, force=True)
                err.add_note(f"cache {held.cache_id!r} was allocated, then released again")
            except KvBrokerError as failed:
                err.add_note(f"cache {held.cache_id!r} could not be given back ({type(failed).__name__}: {failed})")
            raise
        return held

    def attach(self, cache_id: str) -> Plan[Held]:
        response = yield (call := self.call("Attach", pb.AttachRequest(cache_id=cache_id)))
        return self._adopt(response.cache, response.handle, call.generation)

    def release_id(self, cache_id: str, force: bool = False) -> Plan[bool]:
        """Release by id; a record of this id held under this session is released too
        (the hold it stood for is gone)."""
        response = yield self.call("Release", pb.ReleaseRequest(cache_id=cache_id, force=force))
        with self._lock:
            held = self._held.get(cache_id)
            if held is not None and held.generation == self._generation:
                self._forget(held)
        return response.freed

    def unary(self, method: str, request: Any) -> Plan[Any]:
        """A call whose response is the result (Stats, Defragment)."""
        return (yield self.call(method, request))

    def list_caches(self, request: pb.ListCachesRequest) -> Plan[list[pb.Cache]]:
        """Every page, one call each, until the broker's token is empty (or repeats)."""
        caches: list[pb.Cache] = []
        while True:
            response = yield self.call("ListCaches", request)
            caches.extend(response.caches)
            if not response.next_page_token or response.next_page_token == request.page_token:
                return caches
            request.page_token = response.next_page_token

    def close(self) -> Plan[None]:
        """Release every record still held (best effort: a refusal or an unreachable
        broker marks it released anyway, the session's end drops the hold), then refuse
        every later call."""
        if self._phase is Phase.CLOSED:
            return
        with self._lock:
            records = list(self._held.values())
            self._held.clear()
        try:
            for held in records:
                try:
                    yield from self.release(held)
                except KvBrokerError:
                    pass
                held.released = True
        finally:
            self._phase = Phase.CLOSED
            self._notify_phase()

    # -- plans: one held cache --------------------------------------------------------

    def state(self, held: Held) -> HeldState:
        if held.released:
            return HeldState.RELEASED
        if held.evicted or held.info.state == pb.CACHE_STATE_EVICTED:
            return HeldState.EVICTED
        if held.lost or held.generation != self._generation:
            return HeldState.LOST
        if held.moved_epoch > held.handle.epoch:
            return HeldState.STALE
        return HeldState.LIVE

    def view(self, held: Held) -> Plan[None]:
        """Make ``held.handle`` safe to build a view from, or raise. Cost: nothing for a
        live record; one Attach for a moved one, or for a retained one whose session was
        lost."""
        for _ in range(3):
            if not self._must_attach(held):
                return
            yield from self._reattach(held)
        raise PreconditionFailed(f"cache {held.cache_id!r} keeps moving: use `with cache.pinned()`")

    def ready(self, held: Held) -> None:
        """Raise unless a view may be built from ``held.handle`` now without any call (an
        asyncio ``tensor()``, which cannot await the Attach); the error says how."""
        if self._must_attach(held):
            raise self._attach_needed(held)

    def refresh(self, held: Held) -> Plan[None]:
        """Fetch the record and handle again (one Attach), re-attaching a retained cache
        whose session was lost."""
        self._must_attach(held)
        yield from self._reattach(held)

    def pin(self, held: Held) -> Plan[None]:
        """Pin: the answer carries a fresh handle, so a moved record needs no Attach; a
        retained one of a lost session is re-attached first."""
        if self._must_attach(held) and self.state(held) is HeldState.LOST:
            yield from self._reattach(held)
        call = self.call("Pin", pb.PinRequest(cache_id=held.cache_id))
        response = yield call
        self._update(held, response.cache, response.handle, call.generation)

    def unpin(self, held: Held) -> Plan[None]:
        state = self.state(held)
        if state is HeldState.RELEASED:
            raise PreconditionFailed(f"cache {held.cache_id!r} was released by this client")
        if state is HeldState.LOST:
            raise self._lost_error(held, "its pins went with it: the bytes may have been another tenant's since")
        call = self.call("Unpin", pb.UnpinRequest(cache_id=held.cache_id))
        response = yield call
        self._update(held, response.cache, None, call.generation)

    def release(self, held: Held, force: bool = False) -> Plan[bool]:
        """Drop the hold; True when that freed the memory. A released record, or one of a
        lost session (its hold went with it), needs no call unless ``force``; a lost one is
        forced only when retained, and only after an Attach proved the id still names the
        same cache: a force must never free a cache that took the id meanwhile."""
        state = self.state(held)
        if state is HeldState.LOST and force and held.info.retain:
            try:
                yield from self._reattach(held)
            except CacheEvicted:
                state = HeldState.LOST
            else:
                state = self.state(held)
        if state is HeldState.LOST or (state is HeldState.RELEASED and not force):
            with self._lock:
                self._forget(held)
            return False
        response = yield self.call("Release", pb.ReleaseRequest(cache_id=held.cache_id, force=force))
        with self._lock:
            self._forget(held)
        return response.freed

    def _must_attach(self, held: Held) -> bool:
        """Raise when ``held`` can give no view; True when an Attach must come first."""
        state = self.state(held)
        if state is HeldState.LIVE:
            return False
        if state is HeldState.RELEASED:
            raise PreconditionFailed(f"cache {held.cache_id!r} was released by this client")
        if state is HeldState.EVICTED:
            raise CacheEvicted(f"cache {held.cache_id!r} was evicted by the broker; its bytes are gone")
        if state is HeldState.LOST and not held.info.retain:
            raise self._lost_error(held, "its bytes may be another tenant's now: allocate or attach again")
        return True

    def _lost_error(self, held: Held, consequence: str) -> SessionLost:
        why = held.lost or self.last_loss or "the session ended"
        return SessionLost(f"cache {held.cache_id!r} was held by a broker session that is over ({why}); {consequence}")

    def _attach_needed(self, held: Held) -> KvBrokerError:
        if self.state(held) is HeldState.LOST:
            return self._lost_error(held, "retained: `await cache.refresh()` or `cache.pinned()` re-attaches it")
        return PreconditionFailed(
            f"cache {held.cache_id!r} was moved by the broker: `await cache.refresh()` (or use "
            "`async with cache.pinned()`) before building a view"
        )

    def _reattach(self, held: Held) -> Plan[None]:
        """One Attach for ``held``. A cache the broker no longer has, or whose id now names
        another cache (created at another time: ours was freed meanwhile, e.g. while the
        session was lost), is evicted for this client; a hold taken on the other cache by
        that Attach is released again."""
        call = self.call("Attach", pb.AttachRequest(cache_id=held.cache_id))
        try:
            response = yield call
        except (CacheNotFound, CacheEvicted) as err:
            held.evicted = True
            raise CacheEvicted(f"cache {held.cache_id!r} is gone from the broker: {err.message}", err.code) from err
        if held.info.HasField("created_at") and response.cache.created_at != held.info.created_at:
            try:
                yield self.call("Release", pb.ReleaseRequest(cache_id=held.cache_id))
            except KvBrokerError:
                pass
            held.evicted = True
            raise CacheEvicted(f"cache {held.cache_id!r} was freed; its id now names another cache")
        self._update(held, response.cache, response.handle, call.generation)

    def _adopt(self, info: pb.Cache, handle: pb.Handle, generation: int) -> Held:
        """Record a hold taken by a call of ``generation``; a record of the same id that
        still stands for a hold is updated, not duplicated."""
        with self._lock:
            held = self._held.get(info.cache_id)
            if held is not None and held.info.created_at != info.created_at:
                held.evicted = True  # the id names another cache now: ours was freed
            if held is None or held.released or held.evicted:
                held = Held(info, handle, generation)
            self._update(held, info, handle, generation)
            return held

    def _update(self, held: Held, info: pb.Cache, handle: pb.Handle | None, generation: int) -> None:
        with self._lock:  # re-entrant: _adopt holds it
            held.info = info
            if handle is not None:
                held.handle = handle
            held.generation = generation
            held.lost = "" if generation == self._generation else (self.last_loss or "the session ended")
            if not held.lost:
                self._held[info.cache_id] = held

    def _forget(self, held: Held) -> None:
        held.released = True
        if self._held.get(held.cache_id) is held:
            del self._held[held.cache_id]

    # -- the session --------------------------------------------------------------------

    def watch_call(self) -> Call | None:
        """The Watch call that opens the current session; None when there is none to open
        (anonymous, or closed)."""
        with self._lock:
            if self._phase in (Phase.ANONYMOUS, Phase.CLOSED):
                return None
            name, pid, host = self._client
            request = pb.WatchRequest(session_id=self._session_id, client_name=name, pid=pid, host=host)
            return self._call("Watch", request, None)

    def reconnect_delay(self) -> float:
        """Seconds to wait before the next Watch attempt: 0 after a healthy session's loss,
        then doubling to ``RECONNECT_MAX_S`` while attempts keep failing."""
        if self._attempts == 0:
            return 0.0
        return min(RECONNECT_MAX_S, RECONNECT_FIRST_S * 2 ** (self._attempts - 1))

    def on_event(self, event: pb.WatchEvent, generation: int, now: float) -> bool:
        """Apply one event of the stream opened for ``generation``. Returns False when
        that stream is over for this client (the transport stops reading it)."""
        with self._lock:
            if generation != self._generation or self._phase is Phase.CLOSED:
                return False
            kind = event.kind
            if kind == pb.EVENT_KIND_SESSION_OPENED:
                self._opened(event, now)
            elif kind in (pb.EVENT_KIND_EVICTED, pb.EVENT_KIND_MOVED) and not event.sequence_id:  # a sequence's: not the cache
                held = self._held.get(event.cache_id)
                if held is not None and held.generation == generation:
                    if kind == pb.EVENT_KIND_EVICTED:
                        held.evicted = True
                    held.moved_epoch = max(held.moved_epoch, event.epoch)
            elif kind == pb.EVENT_KIND_SEGMENT_RETIRED:
                mapper = _loaded_mapper()
                if mapper is not None:
                    mapper.retire((self.instance_id, event.segment_id, event.segment_generation))
                self._pending_unmaps.add((event.segment_id, event.segment_generation))
            elif kind in (pb.EVENT_KIND_SESSION_ENDED, pb.EVENT_KIND_SHUTTING_DOWN):
                ended = kind == pb.EVENT_KIND_SESSION_ENDED
                name = "the broker ended the session" if ended else "the broker is stopping"
                self._lose(f"{name}: {event.reason}" if event.reason else name, now)
                return False
            return True

    def _opened(self, event: pb.WatchEvent, now: float) -> None:
        self.lease_seconds = event.lease_seconds or self.lease_seconds
        self._secret = event.session_secret
        self._phase, self._opened_at, self._last_beat = Phase.OPEN, now, now
        self._notify_phase()
        if self.instance_id and event.instance_id != self.instance_id:
            # Another broker process: holds of this generation taken from the old one
            # (between its end and this stream) are gone, and so are its segments.
            for held in self._held.values():
                if held.handle.instance_id != event.instance_id and held.generation == self._generation:
                    held.lost = "the broker restarted"
            mapper = _loaded_mapper()
            if mapper is not None:
                mapper.drop_instance(self.instance_id)
        self.instance_id = event.instance_id

    def on_stream_end(self, generation: int, detail: str, now: float) -> str | None:
        """The stream opened for ``generation`` ended (``detail`` says how). Returns why the
        session was lost, or None when nothing was lost (a closed client, an old stream,
        or an attempt that never opened a session nor took a hold: retried, same id)."""
        with self._lock:
            if generation != self._generation or self._phase in (Phase.CLOSED, Phase.ANONYMOUS):
                return None
            if self._phase is Phase.OPEN or any(h.generation == generation for h in self._held.values()):
                reason = f"its Watch stream ended: {detail}"
                self._lose(reason, now)
                return reason
            self._attempts += 1
            return None

    def _lose(self, reason: str, now: float) -> None:
        """The current session is over: mark its records, and move to a new id. Caller
        holds the lock."""
        self.sessions_lost += 1
        self.last_loss = reason
        for cache_id, held in list(self._held.items()):
            if held.generation == self._generation:
                held.lost = reason
                if not held.info.retain:
                    del self._held[cache_id]  # never live again; a retained one may be
        healthy = self._opened_at is not None and now - self._opened_at >= STABLE_SESSION_S
        self._attempts = 0 if healthy else self._attempts + 1
        self._generation += 1
        self._session_id = f"{self._base_id[:100]}.{self._generation}" if self._base_id else new_session_id()
        self._secret = ""
        self._pending_unmaps.clear()
        self._phase, self._opened_at = Phase.CONNECTING, None

    def due(self, now: float, *, heartbeat: bool = True) -> list[Call]:
        """The calls the schedule wants now: a ``ReportUnmapped`` for each retired segment
        no tensor of this process uses any more (so the broker can give the memory back),
        and a Heartbeat every third of the lease. Nothing while the session is not open
        or the schedule is suspended. Cost: a weak-reference check per retired segment."""
        with self._lock:
            if self._phase is not Phase.OPEN or self._suspended:
                return []
            mapper = _loaded_mapper()
            done = [
                key for key in self._pending_unmaps
                if mapper is None or not mapper.still_mapped((self.instance_id, *key))
            ]  # fmt: skip
            self._pending_unmaps.difference_update(done)
            reports = [pb.ReportUnmappedRequest(segment_id=s, segment_generation=g) for s, g in done]
            calls = [self._call("ReportUnmapped", r, self.lease_seconds) for r in reports]
            if heartbeat and now - self._last_beat >= self.lease_seconds / 3:
                self._last_beat = now
                calls.append(self._call("Heartbeat", pb.HeartbeatRequest(), self.lease_seconds))
            return calls


def _loaded_mapper() -> Any:
    """The process's ``SegmentMapper`` if this process has mapped anything; None when
    ``kvbroker_client.mapping`` (and torch) was never imported: then nothing is mapped,
    and retiring a segment must not cost torch's import."""
    # A module still being imported (by another thread) has built no view yet either.
    get = getattr(sys.modules.get("kvbroker_client.mapping"), "process_mapper", None)
    return None if get is None else get()
