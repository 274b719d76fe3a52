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

Restarts (issue 13): a new session that opens on another broker instance means the
broker restarted. Every record of an earlier session may then have survived (a
persistent pool brings its caches back with the same ids), so it is re-attached by id,
whatever its retain flag, at once, in the background, when the new session opens (the
transports drive ``view`` on each of ``stranded()``, so a restored cache is held again
before anything evicts it; a use meanwhile re-attaches it itself); one the broker does
not have raises ``CacheLost`` on its next use.
A non-retained record whose session ended on a broker that is still the same instance
was freed: ``CacheLost`` at once, without a call. While no session is open after a loss
that may be a restart (the broker stopped, or the stream broke), which it is cannot be
known yet: a use raises ``SessionLost`` without waiting, and the first use once the new
session is open re-attaches the cache or raises ``CacheLost``.

Views already built (issue 13): whenever this client stops holding a cache (its session
is lost, the broker evicted or moved it, the client released it), the pages of the views
it built are re-mapped to private memory (``SegmentMapper.revoke``), so no write through
an old view reaches bytes the broker may have handed to someone else.

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
from kvbroker_client.session import RECONNECT_MAX_S, UNMAP_POLL_SECONDS, SessionRules, loaded_mapper
from kvbroker_client.errors import (
    BrokerUnavailable,
    CacheEvicted,
    CacheLost,
    CacheNotFound,
    InvalidRequest,
    KvBrokerError,
    PreconditionFailed,
    SessionLost,
)

__all__ = ["RECONNECT_MAX_S", "UNMAP_POLL_SECONDS", "ClientCore", "Held", "HeldState", "Phase"]



class ClientCore(SessionRules):
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
        self._watch_attempted = False  # the first Watch fails fast; later ones wait for the broker
        self._stranded: dict[str, Held] = {}  # records of ended sessions not re-attached yet
        self._maybe_restarted = False  # the last loss may be a restart (not ended by a live broker)
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
        its metadata (the broker refuses it: that session is gone).

        Raises:
            BrokerUnavailable: the session did not open in time. The call is not sent:
                sent with the id alone it would open a lease-only session under that id,
                which no Watch could then open (it has no secret), and whose lease would
                lapse, freeing what the call allocated while this client used it.
        """
        with self._lock:
            self._phase_changed.wait_for(lambda: self._phase is not Phase.CONNECTING, timeout)
            if call.generation != self._generation or not self._session_id:
                return call.metadata
            if self._phase is Phase.CONNECTING:
                raise BrokerUnavailable(
                    f"cannot reach kvbroker at {self.target}: no session opened within {timeout:g} s "
                    f"({self.last_loss or 'the broker is not up yet'})"
                )
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

    def attach(self, cache_id: str, wait_timeout_ms: int = 0) -> Plan[Held]:
        if isinstance(wait_timeout_ms, bool) or not isinstance(wait_timeout_ms, int) or wait_timeout_ms < 0:
            raise InvalidRequest(f"wait_timeout_ms: must be a non-negative integer, got {wait_timeout_ms!r}")
        request = pb.AttachRequest(cache_id=cache_id, wait_timeout_ms=wait_timeout_ms)
        response = yield (call := self.call("Attach", request, wait_timeout_ms))
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
        live record; one Attach for a moved one, or for one of a lost session that may
        have survived (retained, or the broker restarted), after waiting for the new
        session when none is open yet."""
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
        """Fetch the record and handle again (one Attach), re-attaching a cache of a
        lost session that may have survived."""
        self._must_attach(held)
        yield from self._reattach(held)

    def pin(self, held: Held) -> Plan[None]:
        """Pin: the answer carries a fresh handle, so a moved record needs no Attach; one
        of a lost session is re-attached first (or raises ``CacheLost``)."""
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
        """Raise when ``held`` can give no view; True when an Attach (or the new session,
        first) must come first."""
        state = self.state(held)
        if state is HeldState.LIVE:
            return False
        if state is HeldState.RELEASED:
            raise PreconditionFailed(f"cache {held.cache_id!r} was released by this client")
        if state is HeldState.EVICTED:
            if held.gone:
                raise CacheLost(held.gone)
            raise CacheEvicted(f"cache {held.cache_id!r} was evicted by the broker; its bytes are gone")
        if state is HeldState.LOST and not (held.info.retain or self._restarted_since(held)):
            if self._awaits_session(held):
                raise self._lost_error(held, "no new session is open yet: once the broker is back, its next use "
                                       "re-attaches it if it survived (a persistent pool), else raises CacheLost")
            raise self._lost_error(held, "its bytes may be another tenant's now: allocate or attach again", CacheLost)
        return True

    def _restarted_since(self, held: Held) -> bool:
        """The open session is on another broker instance than the one ``held`` was
        taken from: the broker restarted, and may have brought the cache back."""
        return self._phase is Phase.OPEN and bool(self.instance_id) and held.handle.instance_id != self.instance_id

    def _awaits_session(self, held: Held) -> bool:
        """No session is open yet after a loss that may be a restart: whether ``held``
        survived is known only once the new session says which broker it is on (a
        retained record's Attach waits for it in the transport)."""
        return self._phase is Phase.CONNECTING and self._maybe_restarted and held.handle.instance_id == self.instance_id

    def _lost_error(self, held: Held, consequence: str, kind: type[SessionLost] = SessionLost) -> SessionLost:
        why = held.lost or self.last_loss or "the session ended"
        return kind(f"cache {held.cache_id!r} was held by a broker session that is over ({why}); {consequence}")

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
            why = "the broker restarted without it" if self._restarted_since(held) else err.message
            held.gone = f"cache {held.cache_id!r} is gone from the broker: {why}"
            raise CacheLost(held.gone, err.code) from err
        restarted = response.handle.instance_id != held.handle.instance_id  # the transport waited for the session
        if not _same_cache(held.info, response.cache, restarted):
            try:
                yield self.call("Release", pb.ReleaseRequest(cache_id=held.cache_id))
            except KvBrokerError:
                pass
            held.evicted = True
            held.gone = f"cache {held.cache_id!r} was freed; its id now names another cache"
            raise CacheLost(held.gone)
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
        self._revoke(held)
        if self._held.get(held.cache_id) is held:
            del self._held[held.cache_id]

    def _revoke(self, held: Held) -> None:
        """This client no longer holds the bytes at ``held.handle``: the views it built
        of them stop reaching them (``SegmentMapper.revoke``)."""
        mapper = loaded_mapper()
        if mapper is not None and held.handle.WhichOneof("segment") is not None:
            mapper.revoke(held.handle, self, held.info.reserved_bytes)

def _same_cache(known: pb.Cache, found: pb.Cache, restarted: bool) -> bool:
    """Whether ``found`` (an Attach's answer) is the cache ``known`` was. On the same
    broker instance, its creation time says so. Across a restart the broker restored it
    from a checkpoint, which keeps what the cache is (pool, size, model, dtype, shape),
    so those must match; its creation time too, when the broker kept it."""
    if not restarted:
        return not known.HasField("created_at") or found.created_at == known.created_at
    return (known.pool, known.nbytes, known.model_name, known.dtype, list(known.shape)) == (
        found.pool, found.nbytes, found.model_name, found.dtype, list(found.shape)
    )
