"""SessionRegistry: leases, streams and event delivery."""

from __future__ import annotations

import asyncio

import pytest

from kvbroker.core.errors import AlreadyExists
from kvbroker.core.types import Event, EventKind
from kvbroker.engine.sessions import SessionEnded, SessionRegistry
from kvbroker.security import Unauthenticated
from kvbroker.wire import SessionEndReason


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_leases_expire_unless_renewed():
    async def body():
        clock = Clock()
        registry = SessionRegistry(2.0, clock)
        assert registry.touch("a") is True and registry.touch("a") is False
        registry.watch("b", client_name="w", pid=1, host="h")
        clock.now += 1.5
        registry.touch("a")
        clock.now += 1.0
        assert registry.expired() == ["b"]
        clock.now += 1.5
        assert sorted(registry.expired()) == ["a", "b"]

    asyncio.run(body())


def test_one_stream_per_session_and_events_reach_watchers_only():
    async def body():
        registry = SessionRegistry(5.0)
        session, opened = registry.watch("s", client_name="w", pid=7, host="h")
        assert opened and session.pid == 7
        with pytest.raises(AlreadyExists):
            registry.watch("s", session.secret, client_name="w", pid=7, host="h")
        registry.touch("lease-only")
        queued = registry.deliver([Event(EventKind.EVICTED, frozenset({"s", "lease-only", "gone"}), cache_id="c")])
        assert queued == 1
        stream = registry.stream(session)
        assert (await anext(stream)).cache_id == "c"
        registry.close("s", SessionEndReason.STREAM_CLOSED)
        assert [e async for e in stream] == [], "closing ends the stream"
        assert "s" not in registry

    asyncio.run(body())


def test_a_lease_only_session_can_start_watching():
    async def body():
        registry = SessionRegistry(5.0)
        registry.touch("s")
        secret = registry.get("s").secret
        with pytest.raises(Unauthenticated):
            registry.watch("s", client_name="w", pid=1, host="h")  # the id alone grants nothing
        with pytest.raises(Unauthenticated):
            registry.watch("s", "guess", client_name="w", pid=1, host="h")
        _, opened = registry.watch("s", secret, client_name="w", pid=1, host="h")
        assert opened is False

    asyncio.run(body())


def test_a_lease_expiry_tells_the_stream_why_before_ending_it():
    async def body():
        registry = SessionRegistry(5.0)
        session, _ = registry.watch("s", client_name="w", pid=1, host="h")
        assert registry.close("s", SessionEndReason.LEASE_EXPIRED) is session
        assert [e async for e in registry.stream(session)] == [SessionEnded(SessionEndReason.LEASE_EXPIRED)]
        assert registry.close("s", SessionEndReason.STREAM_CLOSED) is None, "idempotent"

    asyncio.run(body())


def test_a_late_close_does_not_end_a_newer_session_with_the_same_id():
    async def body():
        registry = SessionRegistry(5.0)
        old, _ = registry.watch("s", client_name="w", pid=1, host="h")
        registry.close("s", SessionEndReason.LEASE_EXPIRED)
        new, opened = registry.watch("s", client_name="w", pid=1, host="h")
        assert opened
        assert registry.close("s", SessionEndReason.STREAM_CLOSED, only=old) is None
        assert registry.get("s") is new

    asyncio.run(body())


class _NoWalk(dict):
    """A session table that refuses to be walked: ``expired`` must not visit every
    session on every tick (issue 9.5: 20k idle sessions made each tick O(sessions))."""

    def items(self):
        raise AssertionError("expired() walked every session")

    def values(self):
        raise AssertionError("expired() walked every session")

    def __iter__(self):
        raise AssertionError("expired() walked every session")


def test_finding_expired_leases_does_not_walk_every_session():
    clock = Clock()
    registry = SessionRegistry(2.0, clock)
    for i in range(20_000):
        registry.touch(f"s{i}")
    registry._sessions = _NoWalk(registry._sessions)
    clock.now += 1.0
    assert registry.expired() == []
    registry.touch("s7")
    clock.now += 1.5
    assert len(registry.expired()) == 19_999


def test_the_secret_of_an_ended_session_does_not_quietly_open_a_new_one():
    registry = SessionRegistry(5.0)
    session, _ = registry.identify("s", None)
    registry.close("s", SessionEndReason.LEASE_EXPIRED)
    with pytest.raises(Unauthenticated, match="has ended"):
        registry.identify("s", session.secret)
    fresh, opened = registry.identify("s", None)  # a caller that starts over may reuse the id
    assert opened and fresh.secret != session.secret
