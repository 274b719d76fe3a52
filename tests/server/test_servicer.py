"""Every RPC through the real server and engine, in-process: success and error codes."""

from __future__ import annotations

import os

import grpc

from kvbroker import __version__
from kvbroker.core.errors import ResourceExhausted
from kvbroker.v1 import broker_pb2 as pb
from tests.engine.support import DoorMemory, MiB

from .support import expect, run, session

Code = grpc.StatusCode


def test_allocate():
    async def body(s):
        reply = await s.stub.Allocate(
            pb.AllocateRequest(pool="p", cache_id="a", dtype=pb.DTYPE_FLOAT16, shape=[4, 1024]),
            metadata=session("w1"),
        )
        cache, handle = reply.cache, reply.handle
        assert (cache.cache_id, cache.nbytes, cache.state, cache.dtype, list(cache.shape)) == (
            "a", 8192, pb.CACHE_STATE_RESIDENT, pb.DTYPE_FLOAT16, [4, 1024],
        )  # fmt: skip
        assert handle.WhichOneof("segment") == "host" and handle.server_pid == os.getpid()
        assert handle.host.shm_name in os.listdir(s.shm_dir) and handle.host.size_bytes == 8 * MiB
        assert handle.host.shm_dir  # the backend's directory once HostHandle carries it
        assert (handle.byte_offset, handle.nbytes, handle.epoch) == (0, 8192, 0)
        await expect(Code.INVALID_ARGUMENT, s.stub.Allocate(pb.AllocateRequest(pool="p", dtype=99, size_bytes=8)))
        await expect(Code.INVALID_ARGUMENT, s.stub.Allocate(pb.AllocateRequest(pool="p")))
        await expect(Code.NOT_FOUND, s.stub.Allocate(pb.AllocateRequest(pool="nosuch", size_bytes=MiB)))
        await expect(Code.ALREADY_EXISTS, s.stub.Allocate(pb.AllocateRequest(pool="p", cache_id="a", size_bytes=MiB)))
        await expect(Code.RESOURCE_EXHAUSTED, s.stub.Allocate(pb.AllocateRequest(pool="small", size_bytes=8 * MiB)))
        await s.stub.Allocate(pb.AllocateRequest(pool="small", size_bytes=4 * MiB, pinned=True))
        details = await expect(
            Code.DEADLINE_EXCEEDED,
            s.stub.Allocate(pb.AllocateRequest(pool="small", size_bytes=MiB, wait_timeout_ms=50)),
        )
        assert "wait_timeout_ms=50" in details

    run(body)


def test_release_attach_pin_unpin():
    async def body(s):
        a = (await s.stub.Allocate(pb.AllocateRequest(pool="p", size_bytes=MiB), metadata=session("w1"))).cache
        attached = await s.stub.Attach(pb.AttachRequest(cache_id=a.cache_id), metadata=session("w2"))
        assert attached.cache.holder_count == 2 and attached.handle.host.shm_name
        pinned = await s.stub.Pin(pb.PinRequest(cache_id=a.cache_id), metadata=session("w2"))
        assert pinned.cache.pinned and pinned.cache.pin_count == 1
        details = await expect(
            Code.FAILED_PRECONDITION,
            s.stub.Release(pb.ReleaseRequest(cache_id=a.cache_id, force=True), metadata=session("w1")),
        )
        assert "pinned" in details
        unpinned = await s.stub.Unpin(pb.UnpinRequest(cache_id=a.cache_id), metadata=session("w2"))
        assert not unpinned.cache.pinned
        await expect(Code.FAILED_PRECONDITION, s.stub.Unpin(pb.UnpinRequest(cache_id=a.cache_id), metadata=session("w2")))
        assert not (await s.stub.Release(pb.ReleaseRequest(cache_id=a.cache_id), metadata=session("w1"))).freed
        assert (await s.stub.Release(pb.ReleaseRequest(cache_id=a.cache_id), metadata=session("w2"))).freed
        assert not (await s.stub.Release(pb.ReleaseRequest(cache_id=a.cache_id), metadata=session("w2"))).freed
        for call in (s.stub.Attach(pb.AttachRequest(cache_id="nope")), s.stub.Pin(pb.PinRequest(cache_id="nope")),
                     s.stub.Unpin(pb.UnpinRequest(cache_id="nope")), s.stub.Release(pb.ReleaseRequest(cache_id="nope"))):  # fmt: skip
            await expect(Code.NOT_FOUND, call)
        for call in (s.stub.Attach(pb.AttachRequest()), s.stub.Pin(pb.PinRequest()),
                     s.stub.Unpin(pb.UnpinRequest()), s.stub.Release(pb.ReleaseRequest())):  # fmt: skip
            await expect(Code.INVALID_ARGUMENT, call)
        held = (await s.stub.Allocate(pb.AllocateRequest(pool="p", size_bytes=MiB), metadata=session("w1"))).cache
        await s.stub.Attach(pb.AttachRequest(cache_id=held.cache_id), metadata=session("w2"))
        # Force-released by its allocator: the other holder (w2) learns "evicted", not
        # NOT_FOUND, on its next use (issue 9.7).
        await s.stub.Release(pb.ReleaseRequest(cache_id=held.cache_id, force=True), metadata=session("w1"))
        details = await expect(Code.FAILED_PRECONDITION, s.stub.Attach(pb.AttachRequest(cache_id=held.cache_id), metadata=session("w2")))
        assert "evicted" in details
        await expect(Code.INVALID_ARGUMENT, s.stub.Attach(pb.AttachRequest(cache_id="x"), metadata=session("bad id")))
        details = await expect(
            Code.INVALID_ARGUMENT, s.stub.Attach(pb.AttachRequest(cache_id="x", wait_timeout_ms=4_000_000_000))
        )
        assert "wait_timeout_ms" in details

    run(body)


def test_stats():
    async def body(s):
        await s.stub.Allocate(pb.AllocateRequest(pool="p", size_bytes=MiB))
        stats = await s.stub.Stats(pb.StatsRequest())
        assert (stats.version, stats.instance_id) == (__version__, "test")
        assert stats.uptime_seconds > 0 and stats.active_caches == 1 and stats.total_allocated_bytes == MiB
        assert [p.pool for p in stats.pools] == ["p", "small"] and [d.device for d in stats.devices] == ["host"]
        assert list(stats.methods) == [] and stats.window_seconds == 0, "telemetry is off"

    run(body)


def test_list_caches_pages_through_the_core():
    async def body(s):
        for i in range(5):
            await s.stub.Allocate(pb.AllocateRequest(pool="p", cache_id=f"c{i}", size_bytes=MiB, model_name=f"m{i % 2}"))
        await s.stub.Allocate(pb.AllocateRequest(pool="small", cache_id="s0", size_bytes=MiB))
        seen, token = [], ""
        while True:
            page = await s.stub.ListCaches(pb.ListCachesRequest(pool="p", page_size=2, page_token=token))
            assert len(page.caches) <= 2
            seen += [c.cache_id for c in page.caches]
            token = page.next_page_token
            if not token:
                break
        assert seen == ["c0", "c1", "c2", "c3", "c4"]
        everything = await s.stub.ListCaches(pb.ListCachesRequest())
        assert [c.cache_id for c in everything.caches] == ["c0", "c1", "c2", "c3", "c4", "s0"]
        assert everything.next_page_token == ""
        models = await s.stub.ListCaches(pb.ListCachesRequest(model_name="m1"))
        assert [c.cache_id for c in models.caches] == ["c1", "c3"]
        resident = await s.stub.ListCaches(pb.ListCachesRequest(state=pb.CACHE_STATE_RESIDENT, page_size=1))
        assert [c.cache_id for c in resident.caches] == ["c0"] and resident.next_page_token == "c0"
        await expect(Code.INVALID_ARGUMENT, s.stub.ListCaches(pb.ListCachesRequest(page_size=1001)))
        await expect(Code.INVALID_ARGUMENT, s.stub.ListCaches(pb.ListCachesRequest(state=42)))
        await expect(Code.NOT_FOUND, s.stub.ListCaches(pb.ListCachesRequest(pool="nosuch")))

    run(body)


def test_defragment():
    async def body(s):
        ids = []
        for _ in range(4):
            ids.append((await s.stub.Allocate(pb.AllocateRequest(pool="p", size_bytes=2 * MiB))).cache.cache_id)
        for cache_id in ids[::2]:
            await s.stub.Release(pb.ReleaseRequest(cache_id=cache_id))
        plan = await s.stub.Defragment(pb.DefragmentRequest(pool="p", dry_run=True))
        assert plan.dry_run and plan.caches_moved == 2 and plan.bytes_moved == 4 * MiB
        done = await s.stub.Defragment(pb.DefragmentRequest(pool="p"))
        assert (done.caches_moved, done.bytes_moved, done.fragmentation_after) == (2, 4 * MiB, 0.0)
        again = await s.stub.Defragment(pb.DefragmentRequest())
        assert again.caches_moved == 0
        await expect(Code.NOT_FOUND, s.stub.Defragment(pb.DefragmentRequest(device="GPU-nosuch")))
        await expect(Code.NOT_FOUND, s.stub.Defragment(pb.DefragmentRequest(pool="nosuch")))

    run(body)


def test_defragment_lists_the_moves_and_tells_both_figures(monkeypatch):
    """Issue 10.5: a dry run names each cache it would move, from where to where (the
    first MAX_LISTED_MOVES, with the total), and the figures say what compaction fixes
    (within segments) apart from what it cannot (across segments)."""
    import kvbroker.engine.engine as engine_module

    monkeypatch.setattr(engine_module, "MAX_LISTED_MOVES", 2)

    async def body(s):
        for i in range(8):  # one 8 MiB segment: c0..c7
            await s.stub.Allocate(pb.AllocateRequest(pool="p", size_bytes=MiB, cache_id=f"c{i}"))
        await s.stub.Allocate(pb.AllocateRequest(pool="small", size_bytes=MiB, cache_id="s0"))  # 3 MiB free
        for cache_id in ("c0", "c2", "c4"):
            await s.stub.Release(pb.ReleaseRequest(cache_id=cache_id))
        device = await s.stub.Defragment(pb.DefragmentRequest(device="host", dry_run=True))
        assert (device.caches_moved, device.moves_total, len(device.moves)) == (5, 5, 2)
        first = device.moves[0]
        assert (first.cache_id, first.pool, first.device, first.nbytes) == ("c1", "p", "host", MiB)
        assert (first.from_offset, first.to_offset, first.from_segment_id) == (MiB, 0, first.to_segment_id)
        assert [m.cache_id for m in device.moves] == ["c1", "c3"]
        # p: three 1 MiB holes; small: 3 MiB at its end. 6 MiB free, the largest range 3 MiB.
        assert (device.free_bytes_in_segments, device.largest_free_extent_before_bytes) == (6 * MiB, 3 * MiB)
        assert device.fragmentation_within_segments_before == 2 / 6
        assert device.fragmentation_across_segments_before == 1 / 6
        assert device.fragmentation_within_segments_after == 0.0
        assert device.fragmentation_across_segments_after == 3 / 6, "p's 3 MiB and small's 3 MiB stay apart"
        assert device.fragmentation_before == device.fragmentation_after == 0.5, "the classic figure cannot tell"
        assert (device.segments_freed, device.segments_freed_bytes) == (0, 0)
        done = await s.stub.Defragment(pb.DefragmentRequest(device="host"))
        assert not done.dry_run and done.moves == device.moves and done.fragmentation_within_segments_after == 0.0
        stats = await s.stub.Stats(pb.StatsRequest())
        assert stats.devices[0].usage.fragmentation_ratio == 0.5

    run(body)


def test_heartbeat_and_report_unmapped():
    async def body(s):
        reply = await s.stub.Heartbeat(pb.HeartbeatRequest(), metadata=session("w1"))
        assert reply.lease_seconds == 60
        await expect(Code.INVALID_ARGUMENT, s.stub.Heartbeat(pb.HeartbeatRequest()))
        handle = (await s.stub.Allocate(pb.AllocateRequest(pool="p", size_bytes=MiB), metadata=session("w1"))).handle
        await s.stub.ReportUnmapped(
            pb.ReportUnmappedRequest(segment_id=handle.segment_id, segment_generation=handle.segment_generation),
            metadata=session("w1"),
        )
        await expect(Code.INVALID_ARGUMENT, s.stub.ReportUnmapped(pb.ReportUnmappedRequest(segment_id=1)))
        await expect(Code.INVALID_ARGUMENT, s.stub.ReportUnmapped(pb.ReportUnmappedRequest(), metadata=session("w1")))

    run(body)


def test_overlong_names_are_not_echoed_whole():
    async def body(s):
        name = "x" * 100_000
        details = await expect(Code.NOT_FOUND, s.stub.Allocate(pb.AllocateRequest(pool=name, size_bytes=MiB)))
        assert len(details) < 500 and "100000 characters" in details
        details = await expect(Code.INVALID_ARGUMENT, s.stub.Allocate(pb.AllocateRequest(pool="p", size_bytes=MiB, model_name=name)))
        assert details.startswith("model_name: ") and len(details) < 300
        details = await expect(Code.INVALID_ARGUMENT, s.stub.Attach(pb.AttachRequest(cache_id=name)))
        assert len(details) < 300

    run(body)


def test_a_backend_out_of_file_descriptors_is_resource_exhausted():
    async def body(s):
        s.engine.memory("host").create_error = ResourceExhausted(
            "host shared memory: cannot open a segment: too many open files (EMFILE)",
            requested_bytes=MiB, free_bytes=0, largest_free_extent_bytes=0, satisfiable=False,
        )  # fmt: skip
        details = await expect(Code.RESOURCE_EXHAUSTED, s.stub.Allocate(pb.AllocateRequest(pool="p", size_bytes=MiB)))
        assert "EMFILE" in details
        assert s.engine.broker.caches() == [] and s.engine.broker.segments() == []

    run(body, wrap=DoorMemory)


def test_a_device_failure_is_internal_and_logged(caplog):
    async def body(s):
        s.engine.memory("host").create_error = RuntimeError("injected device failure")
        details = await expect(Code.INTERNAL, s.stub.Allocate(pb.AllocateRequest(pool="p", size_bytes=MiB)))
        assert "see the daemon log" in details
        assert s.engine.broker.caches() == []

    run(body, wrap=DoorMemory)
    assert "injected device failure" in caplog.text
