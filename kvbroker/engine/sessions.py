"""Sessions: who is connected, whether they are alive, and the stream of their events.

A session is one client process, named by the id it sends in the ``kvbroker-session-id``
metadata (``kvbroker.wire.SESSION_ID_KEY``). The id is chosen by the client but proves
nothing: when a session opens, the broker issues it a secret (``Session.secret``, 256
random bits, returned in SESSION_OPENED or in a call's initial metadata), and every later
call that names the session must carry it (``wire.SESSION_SECRET_KEY``); the session also
belongs to the principal that opened it. Another session's id alone grants nothing. A
session records the caller's Unix peer uid and pid when it came through the peer
handshake (``kvbroker/security/peercred.py``). It is alive while its lease runs: every
call it makes, and every Heartbeat, renews the lease; a ``Watch`` stream also ends the
session the moment it breaks (a killed process closes its socket, so a crash is noticed
in milliseconds, not after the lease). A hung process (stream open, no heartbeat) is
caught by the lease, and its stream is told why (``SessionEnded``) before it ends.

The registry only keeps time and queues; what a session's end means for its caches is
the core's ``Broker.end_session``, driven by the engine. Events reach a stream through
``SessionRegistry.stream``, an async iterator that ends when the session does: the
queue and its end marker never leave this module. Not thread-safe: it lives on the
engine's event loop.
"""

from __future__ import annotations

import asyncio
import heapq
import hmac
import secrets
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from typing import NamedTuple, TypeAlias

from kvbroker.core.errors import AlreadyExists
from kvbroker.core.types import Event
from kvbroker.security import PeerIdentity, Unauthenticated
from kvbroker.wire import SessionEndReason


class SessionOpened(NamedTuple):
    """The first item of every stream: the session is open, with this lease."""

    session_id: str
    lease_seconds: float
    instance_id: str
    #: The session's secret, for the client to send with every later call.
    secret: str = ""


class SessionEnded(NamedTuple):
    """The last item of a stream whose session the broker ended (its lease ran out)."""

    reason: SessionEndReason


#: What a Watch stream carries: the core's events, framed by the two above.
SessionEvent: TypeAlias = Event | SessionOpened | SessionEnded

#: Marks the end of a session's queue (never yielded).
_END = object()


@dataclass(eq=False)
class Session:
    """One connected client. ``stream_end`` is set when the broker ended the session
    (the Watch stream then ends with that reason, not ``STREAM_CLOSED``)."""

    session_id: str
    expires_at: float
    secret: str = ""
    #: The principal that opened the session (``kvbroker.security``); only it may use it.
    principal: str = ""
    #: The caller's Unix uid and pid, when it came through the peer handshake.
    peer: PeerIdentity | None = None
    client_name: str = ""
    pid: int = 0
    host: str = ""
    watching: bool = False
    stream_end: SessionEndReason | None = None
    opened_at: float = 0.0  # the registry's clock
    _queue: asyncio.Queue = field(default_factory=asyncio.Queue, repr=False)


class SessionRegistry:
    """Live sessions and their leases.

    Args:
        lease_seconds: how long a session lives without a call or heartbeat.
        clock: monotonic seconds (injectable for tests).
    """

    def __init__(self, lease_seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        if lease_seconds <= 0:
            raise ValueError(f"lease_seconds must be positive, got {lease_seconds}")
        self.lease_seconds = lease_seconds
        self._clock = clock
        self._sessions: dict[str, Session] = {}
        #: (expires_at, session id) for every lease set; stale entries (renewed or ended
        #: sessions) are skipped when popped, and the heap is rebuilt when it holds more
        #: than ``_HEAP_SLACK`` times the live sessions.
        self._deadlines: list[tuple[float, str]] = []

    def __len__(self) -> int:
        return len(self._sessions)

    def __contains__(self, session_id: object) -> bool:
        return session_id in self._sessions

    def get(self, session_id: str) -> Session | None:
        return self._sessions.get(session_id)

    def now(self) -> float:
        return self._clock()

    def sessions(self) -> list[Session]:
        """Every live session, by id. Cost: O(sessions log sessions): operators only."""
        return [self._sessions[sid] for sid in sorted(self._sessions)]

    def identify(
        self, session_id: str, secret: str | None, *, principal: str = "", peer: PeerIdentity | None = None
    ) -> tuple[Session, bool]:
        """The session a call names, proven by its secret, and whether it was opened by
        this call (an unknown id opens a session: its secret is new and must reach the
        caller). Renews the lease.

        Raises:
            Unauthenticated: the session exists and the call's secret is missing or
                wrong, or it belongs to another principal.
        """
        session = self._sessions.get(session_id)
        if session is None:
            if secret:
                # A secret names a session that existed: it ended (lease, stream, restart)
                # and took its holds with it. Quietly opening a new one under the same id
                # would hide that from the caller.
                raise Unauthenticated(
                    f"session {session_id[:64]!r} has ended (its lease ran out, its stream "
                    "closed, or the broker restarted): open a new session"
                )
            session = self._sessions[session_id] = Session(
                session_id, 0.0, secrets.token_urlsafe(32), principal, peer, opened_at=self._clock()
            )
            self._renew(session)
            return session, True
        if secret is None or not hmac.compare_digest(secret.encode(), session.secret.encode()):
            raise Unauthenticated(
                f"session {session_id[:64]!r} is open and this call does not carry its secret "
                "(the kvbroker-session-secret metadata the broker issued when it opened)"
            )
        if principal != session.principal:
            raise Unauthenticated(f"session {session_id[:64]!r} belongs to another principal")
        self._renew(session)
        return session, False

    def watch(
        self, session_id: str, secret: str | None = None, *, client_name: str, pid: int, host: str,
        principal: str = "", peer: PeerIdentity | None = None,
    ) -> tuple[Session, bool]:
        """Attach a Watch stream to the session (opening it if new; an existing one needs
        its secret). Returns the session and whether it is new.

        Raises:
            Unauthenticated: see ``identify``.
            AlreadyExists: another live stream watches this session.
        """
        session, opened = self.identify(session_id, secret, principal=principal, peer=peer)
        if session.watching:
            raise AlreadyExists(f"session {session_id!r} is already watched by another stream")
        session.watching = True
        session.client_name, session.pid, session.host = client_name, pid, host
        return session, opened

    def touch(self, session_id: str) -> bool:
        """Renew a session's lease, opening a lease-only session for an unknown id (the
        engine's own callers; calls from the network are identified by ``identify``
        first). Returns True when the session is new."""
        session = self._sessions.get(session_id)
        if session is None:
            session = self._sessions[session_id] = Session(
                session_id, 0.0, secrets.token_urlsafe(32), opened_at=self._clock()
            )
            self._renew(session)
            return True
        self._renew(session)
        return False

    def expired(self) -> list[str]:
        """Ids of the sessions whose lease ran out (until they are closed). Cost: O(log n)
        per lease set since the last call plus the expired ones, not O(sessions): a tick
        with 20,000 live idle sessions pops nothing."""
        now = self._clock()
        heap, out = self._deadlines, []
        while heap and heap[0][0] <= now:
            deadline, session_id = heapq.heappop(heap)
            session = self._sessions.get(session_id)
            if session is not None and session.expires_at == deadline and session_id not in out:
                out.append(session_id)
        for session_id in out:  # still live until closed: found again next time
            heapq.heappush(heap, (self._sessions[session_id].expires_at, session_id))
        return out

    def close(self, session_id: str, reason: SessionEndReason, *, only: Session | None = None) -> Session | None:
        """Forget a session and end its Watch stream. Returns the session, or None when
        it was not live (so a second close does nothing).

        ``only``: close only if this very object is the live session; a stream that
        closes late must not end a newer session that reused the id.

        The stream ends after ``SessionEnded(reason)`` when the lease expired or an
        operator ended it (the client must learn that every hold, pin and mapping is gone); at ``BROKER_STOPPING`` it
        already got SHUTTING_DOWN, and at ``STREAM_CLOSED`` nobody reads it.
        """
        session = self._sessions.get(session_id)
        if session is None or (only is not None and session is not only):
            return None
        del self._sessions[session_id]
        if session.watching:
            if reason is not SessionEndReason.STREAM_CLOSED:
                session.stream_end = reason
            if reason in (SessionEndReason.LEASE_EXPIRED, SessionEndReason.ENDED_BY_OPERATOR):
                session._queue.put_nowait(SessionEnded(reason))
            session._queue.put_nowait(_END)
        return session

    async def stream(self, session: Session) -> AsyncIterator[Event | SessionEnded]:
        """The session's events until it ends (``SessionEnded`` last, when the broker
        ended it). Cost per event: one queue get."""
        queue = session._queue
        while True:
            item = await queue.get()
            if item is _END:
                return
            yield item

    def deliver(self, events: Iterable[Event]) -> int:
        """Queue each event for its recipients that watch; returns how many were queued.
        Events for sessions without a stream are dropped (they learn on next use)."""
        queued = 0
        for event in events:
            for session_id in event.recipients:
                session = self._sessions.get(session_id)
                if session is not None and session.watching:
                    session._queue.put_nowait(event)
                    queued += 1
        return queued

    def broadcast(self, event: Event) -> list[str]:
        """Queue ``event`` for every watching session (used for SHUTTING_DOWN); returns
        their ids."""
        watching = [s for s in self._sessions.values() if s.watching]
        for session in watching:
            session._queue.put_nowait(event)
        return [s.session_id for s in watching]

    def _renew(self, session: Session) -> None:
        """Push the session's lease forward: one heap push (O(log n)); the heap is
        rebuilt from the live sessions when stale entries pile up."""
        session.expires_at = self._clock() + self.lease_seconds
        heapq.heappush(self._deadlines, (session.expires_at, session.session_id))
        if len(self._deadlines) > _HEAP_SLACK * max(len(self._sessions), 64):
            self._deadlines = [(s.expires_at, sid) for sid, s in self._sessions.items()]
            heapq.heapify(self._deadlines)


#: The deadline heap is rebuilt when it holds this many times more entries than sessions.
_HEAP_SLACK = 4
