"""Sessions: who is connected, whether they are alive, and the queue of their events.

A session is one client process, named by the id it sends in the ``kvbroker-session-id``
metadata. It is alive while its lease runs: every call it makes, and every Heartbeat,
renews the lease; a ``Watch`` stream also ends the session the moment it breaks (a
killed process closes its socket, so a crash is noticed in milliseconds, not after the
lease). A hung process (stream open, no heartbeat) is caught by the lease.

The registry only keeps time and queues; what a session's end means for its caches is
the core's ``Broker.end_session``, driven by the engine. Not thread-safe: it lives on
the engine's event loop.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from kvbroker.core.errors import AlreadyExists
from kvbroker.core.types import Event


@dataclass(eq=False)
class Session:
    """One connected client.

    ``events`` feeds the session's Watch stream; ``None`` in it ends the stream.
    """

    session_id: str
    expires_at: float
    client_name: str = ""
    pid: int = 0
    host: str = ""
    watching: bool = False
    events: asyncio.Queue[Event | None] = field(default_factory=asyncio.Queue)


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

    def __len__(self) -> int:
        return len(self._sessions)

    def __contains__(self, session_id: object) -> bool:
        return session_id in self._sessions

    def get(self, session_id: str) -> Session | None:
        return self._sessions.get(session_id)

    def sessions(self) -> list[Session]:
        return list(self._sessions.values())

    def watch(self, session_id: str, *, client_name: str, pid: int, host: str) -> tuple[Session, bool]:
        """Attach a Watch stream to the session (opening it if new). Returns the session
        and whether it is new.

        Raises:
            AlreadyExists: another live stream watches this session.
        """
        session = self._sessions.get(session_id)
        opened = session is None
        if session is None:
            session = self._sessions[session_id] = Session(session_id, self._deadline())
        elif session.watching:
            raise AlreadyExists(f"session {session_id!r} is already watched by another stream")
        session.watching = True
        session.client_name, session.pid, session.host = client_name, pid, host
        session.expires_at = self._deadline()
        return session, opened

    def touch(self, session_id: str) -> bool:
        """Renew a session's lease, opening a lease-only session for an unknown id (a
        client that calls without watching). Returns True when the session is new."""
        session = self._sessions.get(session_id)
        if session is None:
            self._sessions[session_id] = Session(session_id, self._deadline())
            return True
        session.expires_at = self._deadline()
        return False

    def expired(self) -> list[str]:
        """Ids of the sessions whose lease ran out."""
        now = self._clock()
        return [sid for sid, s in self._sessions.items() if s.expires_at <= now]

    def close(self, session_id: str) -> Session | None:
        """Forget a session and end its Watch stream. Idempotent."""
        session = self._sessions.pop(session_id, None)
        if session is not None and session.watching:
            session.events.put_nowait(None)
        return session

    def deliver(self, events: Iterable[Event]) -> int:
        """Queue each event for its recipients that watch; returns how many were queued.
        Events for sessions without a stream are dropped (they learn on next use)."""
        queued = 0
        for event in events:
            for session_id in event.recipients:
                session = self._sessions.get(session_id)
                if session is not None and session.watching:
                    session.events.put_nowait(event)
                    queued += 1
        return queued

    def broadcast(self, event: Event) -> None:
        """Queue ``event`` for every watching session (used for SHUTTING_DOWN)."""
        for session in self._sessions.values():
            if session.watching:
                session.events.put_nowait(event)

    def _deadline(self) -> float:
        return self._clock() + self.lease_seconds
