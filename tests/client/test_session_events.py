"""The session over real gRPC against the scripted broker (tests/client/conftest.py): the
secret, the events that end a session (SESSION_ENDED, SHUTTING_DOWN, a bare end of the
stream), the new session that follows, moves and evictions, retired segments, and the
target from the environment; for the sync and the asyncio client."""

from __future__ import annotations

import asyncio
import gc

import pytest

from kvbroker import wire
from kvbroker.v1 import broker_pb2 as pb
from kvbroker_client import AsyncBrokerClient, BrokerClient, CacheEvicted, PreconditionFailed, SessionLost
from kvbroker_client.core import Phase
from kvbroker_client.mapping import process_mapper

from .daemon import wait_until


def open_session(client) -> str:
    wait_until(lambda: client.core.phase is Phase.OPEN, 10.0, "session open")
    return client.session_id


def metadata_of_last(fake, method: str) -> dict[str, str]:
    return [metadata for name, _, metadata in fake.calls if name == method][-1]


def test_calls_carry_the_secret_the_broker_issued(fake_broker) -> None:
    with BrokerClient(fake_broker.target) as client:
        session = open_session(client)
        client.stats()
    metadata = metadata_of_last(fake_broker.broker, "Stats")
    assert metadata[wire.SESSION_ID_KEY] == session
    assert metadata[wire.SESSION_SECRET_KEY] == f"secret-of-{session}"


@pytest.mark.parametrize("ending", ["session_ended", "shutting_down", "stream_end"])
def test_an_ended_session_refuses_views_and_a_new_one_takes_over(fake_broker, host_segment, ending) -> None:
    fake = fake_broker.broker
    fake.segment = host_segment
    with BrokerClient(fake_broker.target) as client:
        old = open_session(client)
        cache = client.allocate(size_bytes=64, cache_id="kv")
        cache.tensor()
        if ending == "session_ended":
            fake.end_session(old, "lease_expired")
        elif ending == "shutting_down":
            fake.push(old, pb.WatchEvent(kind=pb.EVENT_KIND_SHUTTING_DOWN, reason="broker stopping"))
        else:
            fake.push(old, None)
        wait_until(lambda: client.core.sessions_lost == 1, 10.0, "session lost")
        with pytest.raises(SessionLost):
            cache.tensor()
        assert cache.lost and cache.release() is False
        new = open_session(client)
        assert new != old
        assert [m.get(wire.SESSION_ID_KEY) for name, _, m in fake.session_calls if name == "Watch"] == [old, new]
        client.allocate(size_bytes=64, cache_id="kv2")
        assert metadata_of_last(fake, "Allocate")[wire.SESSION_SECRET_KEY] == f"secret-of-{new}"
    assert ("kv", False) not in fake.released, "no call for a hold the broker already dropped"


def test_a_retained_cache_the_broker_no_longer_has_is_evicted(fake_broker) -> None:
    fake = fake_broker.broker
    with BrokerClient(fake_broker.target) as client:
        old = open_session(client)
        cache = client.allocate(size_bytes=64, cache_id="abort:NOT_FOUND", retain=True)
        fake.end_session(old)
        wait_until(lambda: client.core.sessions_lost == 1, 10.0, "session lost")
        with pytest.raises(CacheEvicted, match="gone from the broker"):
            cache.tensor()
        assert cache.evicted


def test_moves_and_evictions_reach_the_cache(fake_broker, host_segment) -> None:
    fake = fake_broker.broker
    fake.segment = host_segment
    with BrokerClient(fake_broker.target) as client:
        session = open_session(client)
        cache = client.allocate(size_bytes=64, cache_id="m")
        fake.caches[-1].epoch = 5  # the broker moved it
        fake.push(session, pb.WatchEvent(kind=pb.EVENT_KIND_MOVED, cache_id="m", epoch=5))
        wait_until(lambda: cache.stale, 10.0, "MOVED applied")
        before = len(fake.requests("Attach"))
        cache.tensor()
        assert len(fake.requests("Attach")) == before + 1 and cache.handle.epoch == 5 and not cache.stale
        fake.push(session, pb.WatchEvent(kind=pb.EVENT_KIND_EVICTED, cache_id="m", epoch=6))
        wait_until(lambda: cache.evicted, 10.0, "EVICTED applied")
        with pytest.raises(CacheEvicted):
            cache.tensor()


def test_a_retired_segment_is_reported_once_no_view_uses_it(fake_broker, host_segment) -> None:
    fake = fake_broker.broker
    fake.segment = host_segment
    with BrokerClient(fake_broker.target) as client:
        session = open_session(client)
        cache = client.allocate(size_bytes=64, cache_id="r")
        view = cache.tensor()
        key = process_mapper().key_of(cache.handle)
        cache.release()
        fake.push(session, pb.WatchEvent(kind=pb.EVENT_KIND_SEGMENT_RETIRED, segment_id=1, segment_generation=1))
        wait_until(lambda: key not in process_mapper(), 10.0, "segment retired")
        assert process_mapper().still_mapped(key), "a view is alive: not reported yet"
        del view
        gc.collect()
        client.report_unmapped()  # or the schedule's next poll: whichever comes first reports it

        def reports() -> list[tuple[int, int]]:
            calls = fake.session_calls
            return [(r.segment_id, r.segment_generation) for name, r, _ in calls if name == "ReportUnmapped"]

        wait_until(reports, 10.0, "ReportUnmapped received")
        assert reports() == [(1, 1)], "reported once"


def test_the_target_comes_from_the_environment(fake_broker, monkeypatch) -> None:
    monkeypatch.setenv("KVBROKER_TARGET", fake_broker.target)
    with BrokerClient(session_id="") as client:
        assert client.target == fake_broker.target
        client.stats()
    monkeypatch.delenv("KVBROKER_TARGET")
    assert BrokerClient(session_id="").target == "127.0.0.1:50051"


def test_the_async_client_loses_and_reopens_its_session_too(fake_broker, host_segment) -> None:
    fake = fake_broker.broker
    fake.segment = host_segment

    async def scenario() -> None:
        async with AsyncBrokerClient(fake_broker.target, timeout_s=5) as client:
            cache = await client.allocate(size_bytes=64, cache_id="a")
            kept = await client.allocate(size_bytes=64, cache_id="k", retain=True)
            await wait_async(lambda: client.core.phase is Phase.OPEN)
            old = client.session_id
            fake.end_session(old)
            await wait_async(lambda: client.core.sessions_lost == 1)
            with pytest.raises(SessionLost):
                cache.tensor()
            with pytest.raises(SessionLost, match="await cache.refresh"):
                kept.tensor()  # retained, but tensor() cannot await the Attach
            await kept.refresh()
            assert kept.tensor().numel() == 64
            await wait_async(lambda: client.core.phase is Phase.OPEN)
            assert client.session_id != old
            await (await client.allocate(size_bytes=64, cache_id="b")).release()
            with pytest.raises(PreconditionFailed):
                await cache.pin()

    asyncio.run(scenario())


async def wait_async(predicate, timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        assert loop.time() < deadline, "condition not met"
        await asyncio.sleep(0.01)
