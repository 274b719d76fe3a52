"""Issue 9.2 against a real daemon: a cached view must not outlive its memory.

When a client's session ends (its lease lapsed, the daemon restarted), the broker drops
its holds and may give the bytes to another tenant. Every cache held under that session
then refuses to give a view (``SessionLost``), nothing the first client does through the
stub reaches the new tenant's bytes, and the same ``BrokerClient`` carries on under a new
session. A retained cache survives a lapsed lease and is re-attached on next use.

What these tests rely on from the daemon in this tree: a lapsed lease ends the session
and closes its Watch stream ("ended (lease_expired)" in its log); SIGTERM sends
SHUTTING_DOWN and closes every stream. (The daemon does not send SESSION_ENDED yet; the
client treats the stream's end the same way, and ``test_session_events.py`` covers the
event itself against the scripted broker.)
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from kvbroker_client import BrokerClient, BrokerUnavailable, CacheEvicted, SessionLost
from kvbroker_client.core import Phase
from kvbroker_client.mapping import process_mapper

from .daemon import MiB, Daemon, start_daemon, wait_until

LAPSE_TIMEOUT_S = 15.0  # a 1 s lease lapses in ~1.25 s; generous for a loaded machine


@pytest.fixture(scope="module")
def daemon(tmp_path_factory) -> Iterator[Daemon]:
    daemon = start_daemon(tmp_path_factory.mktemp("lease"), "--lease-seconds", "1")
    yield daemon
    assert daemon.stop() == 0, daemon.log()


def lapse(client: BrokerClient) -> str:
    """Stop the client's heartbeats until the broker ends its session (as if the process
    hung), then let them run again; returns the lost session's id."""
    lost_id, lost_before = client.session_id, client.core.sessions_lost
    client.core.suspend_heartbeats()
    try:
        wait_until(lambda: client.core.sessions_lost > lost_before, LAPSE_TIMEOUT_S, "session lost")
    finally:
        client.core.suspend_heartbeats(False)
    return lost_id


def recording(client: BrokerClient, methods: list[str]) -> None:
    """Record the method of every call the client's plans make (a spy on ``drive``)."""
    real = client.drive

    def watched(plan):
        try:
            call = next(plan)
            while True:
                methods.append(call.method)
                try:
                    response = yield call
                except Exception as err:  # noqa: BLE001 - handed to the plan as the transport would
                    call = plan.throw(err)
                else:
                    call = plan.send(response)
        except StopIteration as stop:
            return stop.value

    client.drive = lambda plan: real(watched(plan))  # type: ignore[method-assign]


def test_a_lapsed_lease_refuses_views_and_the_next_tenant_is_untouched(daemon):
    with BrokerClient(daemon.target) as first, BrokerClient(daemon.target) as second:
        cache = first.allocate(size_bytes=MiB)
        cache.tensor().fill_(1)
        place = (cache.handle.segment_id, cache.handle.segment_generation, cache.handle.byte_offset)

        lost_id = lapse(first)
        assert f"session {lost_id} ended (lease_expired)" in daemon.log()
        assert cache.lost and first.session_id != lost_id

        # The broker freed the cache: the second tenant gets that very place.
        theirs = second.allocate(size_bytes=MiB)
        assert (theirs.handle.segment_id, theirs.handle.segment_generation, theirs.handle.byte_offset) == place
        theirs.tensor().fill_(7)

        # Nothing the first client does through its cache reaches those bytes.
        for attempt in (cache.tensor, lambda: cache.tensor("float32", (16,)), cache.pin, cache.refresh, cache.unpin):
            with pytest.raises(SessionLost, match="session that is over"):
                attempt()
        with pytest.raises(SessionLost):
            with cache.pinned() as view:
                view.fill_(0)
        assert cache.release() is False  # its hold went with the session: no call
        assert bool((theirs.tensor() == 7).all())

        # The same client carries on under its new session.
        wait_until(lambda: first.core.phase is Phase.OPEN, 10.0, "new session open")
        again = first.allocate(size_bytes=MiB)
        again.tensor().fill_(3)
        assert bool((theirs.tensor() == 7).all())
        holders = {c.cache_id: c.holder_count for c in first.list_caches()}
        assert holders == {theirs.cache_id: 1, again.cache_id: 1}, "the lost cache is gone from the broker"


def test_a_retained_cache_survives_a_lapsed_lease_and_is_reattached_on_next_use(daemon):
    with BrokerClient(daemon.target) as client:
        kept = client.allocate(size_bytes=MiB, retain=True)
        dropped = client.allocate(size_bytes=MiB)
        kept.tensor().fill_(5)

        lapse(client)
        assert kept.lost and dropped.lost
        with pytest.raises(SessionLost):
            dropped.tensor()

        methods: list[str] = []
        recording(client, methods)
        view = kept.tensor()
        assert methods == ["Attach"], "one Attach re-attaches it under the new session"
        assert not kept.lost and bool((view == 5).all())
        del view
        kept.tensor()
        assert methods == ["Attach"], "held again: no further call"

        listed = {c.cache_id: c for c in client.list_caches()}
        assert dropped.cache_id not in listed
        assert listed[kept.cache_id].holder_count == 1
        assert kept.release(force=True) is True


def test_a_retained_cache_freed_meanwhile_is_evicted_for_its_old_holder(daemon):
    with BrokerClient(daemon.target) as client, BrokerClient(daemon.target, session_id="") as operator:
        kept = client.allocate(size_bytes=MiB, retain=True)
        lapse(client)
        assert operator.release(kept.cache_id, force=True) is True
        with pytest.raises(CacheEvicted, match="gone from the broker|another cache"):
            kept.tensor()
        with pytest.raises(CacheEvicted):
            kept.tensor()  # and stays so, without another call


def test_a_restarted_daemon_loses_the_session_and_the_same_client_carries_on(tmp_path):
    sock = tmp_path / "kvb.sock"
    daemon = start_daemon(tmp_path / "first", socket_path=sock)
    client = BrokerClient(daemon.target, timeout_s=5)
    restarted: Daemon | None = None
    try:
        cache = client.allocate(size_bytes=MiB)
        cache.tensor().fill_(9)
        old_instance = cache.handle.instance_id

        assert daemon.stop() == 0, daemon.log()
        wait_until(lambda: client.core.sessions_lost >= 1, 10.0, "session lost")
        assert "stopping" in client.core.last_loss or "stream ended" in client.core.last_loss
        with pytest.raises(SessionLost):
            cache.tensor()

        restarted = start_daemon(tmp_path / "second", socket_path=sock)
        with BrokerClient(restarted.target, session_id="") as operator:
            # gRPC shares one subchannel per target between channels: until the first
            # client's reconnect backoff (at most 2 s) ends, calls may still fail fast.
            def instance() -> str | None:
                try:
                    return operator.stats().instance_id
                except BrokerUnavailable:
                    return None

            new_instance = wait_until(instance, 15.0, "the restarted daemon answers")
        assert new_instance != old_instance
        wait_until(
            lambda: client.core.phase is Phase.OPEN and client.core.instance_id == new_instance,
            15.0, "session open on the new daemon",
        )  # fmt: skip
        fresh = client.allocate(size_bytes=MiB)
        assert fresh.handle.instance_id == new_instance
        assert int(fresh.tensor().sum()) == 0
        assert all(key.instance_id != old_instance for key in process_mapper().keys()), "old mappings forgotten"
        with pytest.raises(SessionLost):
            cache.tensor()
    finally:
        client.close()
        if restarted is not None:
            assert restarted.stop() == 0, restarted.log()
        daemon.stop()
