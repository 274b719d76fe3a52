"""The operators' RPCs through the real server and engine, in-process: Evict,
SetPoolLimits, the holders in ListCaches, the live figures in Stats; every invalid field
gets INVALID_ARGUMENT naming it. (Rights: tests/cli/test_acting.py, against a daemon with
principals.)"""

from __future__ import annotations

import asyncio

import grpc

from kvbroker.v1 import broker_pb2 as pb
from tests.engine.support import MiB

from .support import expect, next_event, run, session

Code = grpc.StatusCode


def test_evict_takes_the_pools_unpinned_caches_and_tells_their_holders():
    async def body(s):
        watch = s.stub.Watch(pb.WatchRequest(), metadata=session("w"))
        assert (await next_event(watch)).kind == pb.EVENT_KIND_SESSION_OPENED
        for name in ("a", "b", "c"):
            await s.stub.Allocate(pb.AllocateRequest(pool="p", cache_id=name, size_bytes=MiB), metadata=session("w"))
        await s.stub.Pin(pb.PinRequest(cache_id="b"), metadata=session("w"))
        reply = await s.stub.Evict(pb.EvictRequest(pool="p"))
        assert (reply.caches_evicted, reply.bytes_evicted, list(reply.cache_ids), reply.caches_kept) == (
            2, 2 * MiB, ["a", "c"], 1,
        )  # fmt: skip
        events = [await next_event(watch), await next_event(watch)]
        assert {(e.kind, e.cache_id) for e in events} == {(pb.EVENT_KIND_EVICTED, "a"), (pb.EVENT_KIND_EVICTED, "c")}
        assert all("operator" in e.reason for e in events)
        details = await expect(Code.FAILED_PRECONDITION, s.stub.Attach(pb.AttachRequest(cache_id="a"),
                                                                       metadata=session("w")))  # fmt: skip
        assert "evicted" in details
        watch.cancel()

    run(body)


def test_evict_idle_only_and_its_invalid_fields():
    async def body(s):
        await s.stub.Allocate(pb.AllocateRequest(pool="p", cache_id="kept", size_bytes=MiB, retain=True),
                              metadata=session("w"))  # fmt: skip
        await s.stub.Allocate(pb.AllocateRequest(pool="p", cache_id="idle", size_bytes=MiB, retain=True),
                              metadata=session("w"))  # fmt: skip
        await s.stub.Release(pb.ReleaseRequest(cache_id="idle"), metadata=session("w"))
        stats = await s.stub.Stats(pb.StatsRequest())
        assert stats.pools[0].usage.idle_retained_caches == 1 and stats.sessions == 1
        reply = await s.stub.Evict(pb.EvictRequest(pool="p", idle_only=True))
        assert list(reply.cache_ids) == ["idle"] and reply.caches_kept == 1
        assert (await s.stub.Evict(pb.EvictRequest(pool="p", idle_only=True))).caches_evicted == 0
        assert (await expect(Code.INVALID_ARGUMENT, s.stub.Evict(pb.EvictRequest()))).startswith("pool: ")
        await expect(Code.NOT_FOUND, s.stub.Evict(pb.EvictRequest(pool="nosuch")))
        assert "gpu-0" in await expect(Code.NOT_FOUND, s.stub.Evict(pb.EvictRequest(pool="p", device="gpu-0")))

    run(body)


def test_set_pool_limits_raises_lowers_and_refuses():
    async def body(s):
        small = lambda stats: next(p for p in stats.pools if p.pool == "small")  # noqa: E731
        raised = await s.stub.SetPoolLimits(pb.SetPoolLimitsRequest(pool="small", max_bytes=8 * MiB, priority=3))
        assert (raised.before.max_bytes, raised.after.max_bytes) == (4 * MiB, 8 * MiB)
        assert (raised.after.priority, raised.after.min_bytes) == (3, 0)
        assert small(await s.stub.Stats(pb.StatsRequest())).max_bytes == 8 * MiB
        for name in ("s1", "s2"):  # sessionless: nobody maps their segments, which retire at once
            await s.stub.Allocate(pb.AllocateRequest(pool="small", cache_id=name, size_bytes=4 * MiB))
        plan = await s.stub.SetPoolLimits(pb.SetPoolLimitsRequest(pool="small", max_bytes=4 * MiB, dry_run=True))
        assert plan.dry_run and plan.caches_evicted == 1 and plan.segments_retired == 1
        assert small(await s.stub.Stats(pb.StatsRequest())).usage.active_caches == 2, "a dry run changes nothing"
        lowered = await s.stub.SetPoolLimits(pb.SetPoolLimitsRequest(pool="small", max_bytes=4 * MiB))
        assert (lowered.caches_evicted, lowered.bytes_evicted, lowered.segments_retired) == (1, 4 * MiB, 1)
        after = small(await s.stub.Stats(pb.StatsRequest()))
        assert (after.max_bytes, after.usage.reserved_bytes, after.usage.active_caches) == (4 * MiB, 4 * MiB, 1)
        (left,) = [c for c in (await s.stub.ListCaches(pb.ListCachesRequest(pool="small", state=pb.CACHE_STATE_RESIDENT))).caches]
        await s.stub.Pin(pb.PinRequest(cache_id=left.cache_id))
        details = await expect(Code.FAILED_PRECONDITION,
                               s.stub.SetPoolLimits(pb.SetPoolLimitsRequest(pool="small", max_bytes=MiB)))  # fmt: skip
        assert "lowest max_bytes possible now is 4.00 MiB" in details

    run(body)


def test_set_pool_limits_invalid_fields_are_named():
    async def body(s):
        cases = [
            (pb.SetPoolLimitsRequest(), "pool: "),
            (pb.SetPoolLimitsRequest(pool="p", max_bytes=0), "max_bytes: "),
            (pb.SetPoolLimitsRequest(pool="p", min_bytes=1 << 40), "min_bytes: "),
            (pb.SetPoolLimitsRequest(pool="small", min_bytes=8 * MiB), "min_bytes: "),
        ]
        for request, prefix in cases:
            details = await expect(Code.INVALID_ARGUMENT, s.stub.SetPoolLimits(request))
            assert details.startswith(prefix), details
        await expect(Code.NOT_FOUND, s.stub.SetPoolLimits(pb.SetPoolLimitsRequest(pool="nosuch", priority=1)))

    run(body)


def test_a_raised_max_serves_a_waiting_allocation():
    async def body(s):
        await s.stub.Allocate(pb.AllocateRequest(pool="small", size_bytes=4 * MiB, pinned=True), metadata=session("w"))
        waiting = asyncio.ensure_future(s.stub.Allocate(
            pb.AllocateRequest(pool="small", size_bytes=4 * MiB, wait_timeout_ms=20_000), metadata=session("w")
        ))  # fmt: skip
        async with asyncio.timeout(10):  # polling a condition, not waiting for time
            while not (await s.stub.Stats(pb.StatsRequest())).pools[1].waiting_allocations:
                assert not waiting.done(), waiting.exception()
                await asyncio.sleep(0.01)
        stats = await s.stub.Stats(pb.StatsRequest())
        assert (stats.pools[1].waiting_allocations, stats.pools[1].allocation_waits) == (1, 1)
        await s.stub.SetPoolLimits(pb.SetPoolLimitsRequest(pool="small", max_bytes=8 * MiB))
        assert (await waiting).cache.nbytes == 4 * MiB
        assert (await s.stub.Stats(pb.StatsRequest())).pools[1].waiting_allocations == 0

    run(body)


def test_list_caches_names_holders_and_gives_timestamps():
    async def body(s):
        await s.stub.Allocate(pb.AllocateRequest(pool="p", cache_id="a", size_bytes=MiB), metadata=session("w1"))
        await s.stub.Attach(pb.AttachRequest(cache_id="a"), metadata=session("w2"))
        allocated = await s.stub.Allocate(pb.AllocateRequest(pool="p", cache_id="b", size_bytes=MiB))
        assert list(allocated.cache.holders) == [], "holders only in ListCaches, for those who may list"
        listed = {c.cache_id: c for c in (await s.stub.ListCaches(pb.ListCachesRequest())).caches}
        assert list(listed["a"].holders) == ["w1", "w2"] and list(listed["b"].holders) == [""]
        a = listed["a"]
        assert a.created_at.seconds > 1_700_000_000 and a.last_access_at.ToNanoseconds() >= a.created_at.ToNanoseconds()

    run(body)
