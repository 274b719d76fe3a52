"""Issue 9.3 through the real server: an Allocate whose caller goes away (its deadline
passes, or it cancels) leaves no cache and no shm object behind."""

from __future__ import annotations

import asyncio

import grpc

from kvbroker.core import PoolSpec
from kvbroker.v1 import broker_pb2 as pb
from tests.engine.support import MiB, private_shm_dir, shm_objects, until

from .support import serving, session

GiB = 1024 * MiB


def test_allocates_past_their_deadline_leave_as_many_shm_objects_as_segments():
    """Five 512 MiB Allocates with a 50 ms deadline (and wait) on 1 GiB: the segments
    being created when the deadlines pass are created, then freed; nothing leaks."""
    pools = [PoolSpec("big", ("host",), block_bytes=2 * MiB, segment_bytes=512 * MiB, gc_threshold=1.0)]

    async def main(shm_dir: str):
        async with serving(shm_dir, capacity=GiB, pools=pools) as s:
            calls = [
                s.stub.Allocate(pb.AllocateRequest(pool="big", size_bytes=512 * MiB, wait_timeout_ms=50), timeout=0.05)
                for _ in range(5)
            ]
            results = await asyncio.gather(*calls, return_exceptions=True)
            codes = [r.code() if isinstance(r, grpc.aio.AioRpcError) else grpc.StatusCode.OK for r in results]
            assert set(codes) <= {grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.OK}, codes
            await s.engine.idle()
            stats = await s.stub.Stats(pb.StatsRequest())
            segments = sum(d.usage.segments for d in stats.devices)
            assert len(shm_objects(shm_dir)) == segments == codes.count(grpc.StatusCode.OK)
            assert stats.active_caches == codes.count(grpc.StatusCode.OK)

    with private_shm_dir() as shm_dir:
        asyncio.run(main(shm_dir))


def test_cancelled_waiting_allocates_get_nothing_when_room_comes():
    async def main(shm_dir: str):
        async with serving(shm_dir) as s:
            blocker = await s.stub.Allocate(pb.AllocateRequest(pool="small", size_bytes=4 * MiB, pinned=True))
            calls = [
                s.stub.Allocate(pb.AllocateRequest(pool="small", size_bytes=MiB, wait_timeout_ms=60_000),
                                metadata=session(f"w{i}"))
                for i in range(20)
            ]  # fmt: skip
            await until(lambda: s.engine.waiting == 20, what="20 waiting Allocates")
            for call in calls:
                call.cancel()
            await s.stub.Release(pb.ReleaseRequest(cache_id=blocker.cache.cache_id))
            await until(lambda: s.engine.waiting == 0, what="the queue to empty")
            await s.engine.idle()
            assert s.engine.stats().total.active_caches == 0

    with private_shm_dir() as shm_dir:
        asyncio.run(main(shm_dir))
