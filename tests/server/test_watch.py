"""The Watch stream through the real server: the session's first and last events, event
delivery, and what ends a session (the stream, the lease, the broker stopping)."""

from __future__ import annotations


import grpc

from kvbroker.engine import EngineSettings
from kvbroker.telemetry.observer import TelemetryObserver
from kvbroker.telemetry.recorder import Recorder
from kvbroker.v1 import broker_pb2 as pb
from tests.engine.support import MiB, until

from .support import expect, next_event, run, session

RECLAIMED = "kvbroker_sessions_reclaimed_total"


def reclaimed(recorder) -> dict:
    """The session-end counts that moved (every known reason is exported from 0)."""
    return {reason: n for reason, n in recorder.snapshot().counters[RECLAIMED].items() if n}


def test_a_stream_opens_its_session_and_carries_its_events():
    async def body(s):
        call = s.stub.Watch(pb.WatchRequest(client_name="t", pid=7, host="h"), metadata=session("w"))
        opened = await next_event(call)
        assert (opened.kind, opened.session_id, opened.lease_seconds, opened.instance_id) == (
            pb.EVENT_KIND_SESSION_OPENED, "w", 60, "test",
        )  # fmt: skip
        second = s.stub.Watch(pb.WatchRequest(), metadata=session("w"))
        await expect(grpc.StatusCode.ALREADY_EXISTS, next_event(second))
        cache = (await s.stub.Allocate(pb.AllocateRequest(pool="p", size_bytes=MiB), metadata=session("w"))).cache
        await s.stub.Attach(pb.AttachRequest(cache_id=cache.cache_id))  # the anonymous holder
        await s.stub.Release(pb.ReleaseRequest(cache_id=cache.cache_id, force=True))
        evicted = await next_event(call)
        assert (evicted.kind, evicted.cache_id, evicted.epoch) == (pb.EVENT_KIND_EVICTED, cache.cache_id, 1)
        await s.stub.Allocate(pb.AllocateRequest(pool="p", size_bytes=MiB), metadata=session("w"))
        call.cancel()
        await until(lambda: s.engine.stats().total.active_caches == 0, what="the session's end")

    run(body)


def test_a_session_id_is_required():
    async def body(s):
        await expect(grpc.StatusCode.INVALID_ARGUMENT, next_event(s.stub.Watch(pb.WatchRequest())))
        by_field = s.stub.Watch(pb.WatchRequest(session_id="from-field"))
        assert (await next_event(by_field)).session_id == "from-field"
        by_field.cancel()

    run(body)


def test_a_closed_stream_ends_the_session_and_frees_its_caches():
    recorder = Recorder(("p", "small"))

    async def body(s):
        call = s.stub.Watch(pb.WatchRequest(), metadata=session("w"))
        await next_event(call)
        await s.stub.Allocate(pb.AllocateRequest(pool="p", size_bytes=MiB), metadata=session("w"))
        kept = await s.stub.Allocate(pb.AllocateRequest(pool="p", size_bytes=MiB, retain=True), metadata=session("w"))
        call.cancel()
        await until(lambda: s.engine.stats().total.active_caches == 1, what="the session's caches freed")
        assert [c.cache_id for c in s.engine.broker.caches()] == [kept.cache.cache_id]

    run(body, observer=TelemetryObserver(recorder))
    assert reclaimed(recorder) == {("stream_closed",): 1}


def test_an_expired_lease_ends_the_stream_with_session_ended():
    recorder = Recorder(("p", "small"))

    async def body(s):
        call = s.stub.Watch(pb.WatchRequest(), metadata=session("hung"))
        await next_event(call)
        await s.stub.Allocate(pb.AllocateRequest(pool="p", size_bytes=MiB), metadata=session("hung"))
        ended = await next_event(call)
        assert (ended.kind, ended.reason) == (pb.EVENT_KIND_SESSION_ENDED, "lease_expired")
        assert await next_event(call) is grpc.aio.EOF
        assert s.engine.stats().total.active_caches == 0
        assert (await call.code()) == grpc.StatusCode.OK

    run(body, settings=EngineSettings(lease_seconds=0.3, tick_seconds=0.05), observer=TelemetryObserver(recorder))
    assert reclaimed(recorder) == {("lease_expired",): 1}


def test_a_stopping_broker_tells_the_stream_and_ends_the_session():
    recorder = Recorder(("p", "small"))

    async def body(s):
        call = s.stub.Watch(pb.WatchRequest(), metadata=session("w"))
        await next_event(call)
        await s.engine.shutting_down()
        assert (await next_event(call)).kind == pb.EVENT_KIND_SHUTTING_DOWN
        assert await next_event(call) is grpc.aio.EOF

    run(body, observer=TelemetryObserver(recorder))
    assert reclaimed(recorder) == {("broker_stopping",): 1}
