"""Device work runs outside every core section (``kvbroker/engine/engine.py``): while a segment is being
created or a compaction copied, other calls go on; calls that need the busy cache or
pool wait for the work and then proceed; a failed copy commits what it completed."""

from __future__ import annotations

import asyncio
import errno

import pytest

from kvbroker.core import AllocationRequest, PoolSpec
from kvbroker.core.errors import NotFound, ResourceExhausted
from kvbroker.memory.backend import CopyError

from .support import DoorMemory, MiB, check, host_engine, private_shm_dir, shm_objects, steps
from tests.support.segments import read_segment, write_segment

POOLS = [
    PoolSpec("p", ("host",), block_bytes=MiB, segment_bytes=8 * MiB, gc_threshold=1.0),
    PoolSpec("q", ("host",), block_bytes=MiB, segment_bytes=4 * MiB, gc_threshold=1.0),
]


def run(body, pools=POOLS):
    with private_shm_dir() as shm_dir:
        engine = host_engine(shm_dir, capacity=32 * MiB, pools=pools, wrap=DoorMemory)
        try:
            asyncio.run(body(engine, engine.memory("host")))
        finally:
            asyncio.run(engine.close())
        assert shm_objects(shm_dir) == []


async def fragmented(engine, memory) -> list:
    """Eight 1 MiB caches of pool p, each filled with its index; 0, 2 and 4 released:
    a defragment then moves 1, 3, 5, 6 and 7, in that order."""
    caches = []
    for i in range(8):
        info, _ = await engine.allocate(AllocationRequest("p", MiB, holder="h", cache_id=f"c{i}"))
        write_segment(memory, info.extents[0].segment_id, info.extents[0].offset, bytes([i]) * MiB)
        caches.append(info)
    for i in (0, 2, 4):
        await engine.release(f"c{i}", "h")
    return caches


def content(engine, memory, cache_id: str) -> bytes:
    info = engine.broker.get(cache_id)
    extent = info.extents[0]
    return read_segment(memory, extent.segment_id, extent.offset, MiB)


def test_a_failed_copy_commits_the_completed_moves_and_aborts_the_rest():
    async def body(engine, memory):
        before = {c.cache_id: c for c in await fragmented(engine, memory)}
        plan = engine.broker.plan_compaction(pool="p")
        assert [m.cache_id for m in plan.moves] == ["c1", "c3", "c5", "c6", "c7"]
        memory.copy_fails_after = 2
        with pytest.raises(CopyError):
            await engine.defragment(device=None, pool="p", dry_run=False)
        for move in plan.moves[:2]:
            info = engine.broker.get(move.cache_id)
            assert info.extents[0] == move.destination and info.epoch == before[move.cache_id].epoch + 1
        for move in plan.moves[2:]:
            info = engine.broker.get(move.cache_id)
            assert info.extents[0] == move.source and info.epoch == before[move.cache_id].epoch
        for i in (1, 3, 5, 6, 7):
            assert content(engine, memory, f"c{i}") == bytes([i]) * MiB, f"c{i} lost its bytes"
        check(engine)
        memory.copy_fails_after = None
        result = await engine.defragment(device=None, pool="p", dry_run=False)
        assert result.caches_moved == 3
        assert sorted(engine.broker.get(f"c{i}").extents[0].offset // MiB for i in (1, 3, 5, 6, 7)) == [0, 1, 2, 3, 4]
        for i in (1, 3, 5, 6, 7):
            assert content(engine, memory, f"c{i}") == bytes([i]) * MiB
        check(engine)

    run(body)


def test_while_bytes_are_copied_other_calls_go_on_and_the_moving_cache_waits():
    async def body(engine, memory):
        await fragmented(engine, memory)
        other, _ = await engine.allocate(AllocationRequest("q", MiB, holder="h"))
        door = memory.doors["copy"]
        door.close()
        defrag = asyncio.create_task(engine.defragment(device=None, pool="p", dry_run=False))
        await door.arrival()
        # Not moving, or another pool: served at once while the copy is held.
        attached, _ = await engine.attach(other.cache_id, "h2")
        assert attached.holders == {"h", "h2"}
        info, _ = await engine.allocate(AllocationRequest("q", MiB, holder="h"))
        assert info.pool == "q"
        engine.stats()
        # Moving, or the pool being compacted: they wait for the commit.
        attach = asyncio.create_task(engine.attach("c7", "h2"))
        pin = asyncio.create_task(engine.pin("c5", "h2"))
        place = asyncio.create_task(engine.allocate(AllocationRequest("p", MiB, holder="h2")))
        await steps(20)
        assert not (attach.done() or pin.done() or place.done() or defrag.done())
        door.open()
        result = await defrag
        assert result.caches_moved == 5
        c7, handle = await attach
        assert c7.epoch == 1 and handle.byte_offset == 4 * MiB, "the handle of the moved cache"
        c5, _ = await pin
        assert c5.pinned and c5.extents[0].offset == 2 * MiB
        placed, _ = await place
        assert placed.extents[0].offset == 5 * MiB, "placed after the compaction, in the packed layout"
        check(engine)

    run(body)


def test_while_a_segment_is_created_other_calls_go_on_and_its_cache_waits():
    async def body(engine, memory):
        existing, _ = await engine.allocate(AllocationRequest("q", MiB, holder="h"))
        door = memory.doors["create"]
        door.close()
        placing = asyncio.create_task(engine.allocate(AllocationRequest("p", MiB, holder="h", cache_id="new")))
        await door.arrival()
        attached, _ = await engine.attach(existing.cache_id, "h2")
        assert attached.holders == {"h", "h2"}
        pending = engine.broker.list_caches(limit=10)[0]
        assert {c.cache_id: c.state.value for c in pending}["new"] == "pending"
        attach = asyncio.create_task(engine.attach("new", "h2"))
        await steps(20)
        assert not (attach.done() or placing.done())
        door.open()
        info, _ = await placing
        again, _ = await attach
        assert info.state.value == "resident" and again.holders == {"h", "h2"}
        check(engine)

    run(body)


def test_a_backend_that_cannot_create_leaves_no_cache_and_no_segment():
    async def body(engine, memory):
        memory.create_error = ResourceExhausted(
            "host shared memory: too many open files (EMFILE)", requested_bytes=MiB,
            free_bytes=0, largest_free_extent_bytes=0, satisfiable=False,
        )  # fmt: skip
        with pytest.raises(ResourceExhausted, match="EMFILE"):
            await engine.allocate(AllocationRequest("p", MiB, holder="h", cache_id="x"))
        assert engine.broker.segments() == [] and engine.broker.caches() == []
        with pytest.raises(NotFound):
            engine.broker.get("x")
        memory.create_error = OSError(errno.EIO, "injected")
        with pytest.raises(OSError):
            await engine.allocate(AllocationRequest("p", MiB, holder="h"))
        memory.create_error = None
        info, _ = await engine.allocate(AllocationRequest("p", MiB, holder="h", cache_id="x"))
        assert info.cache_id == "x", "the aborted id is free again"
        check(engine)

    run(body)


def test_attach_of_a_cache_whose_creation_failed_is_not_found():
    async def body(engine, memory):
        door = memory.doors["create"]
        door.close()
        memory.create_error = OSError(errno.EIO, "injected")
        placing = asyncio.create_task(engine.allocate(AllocationRequest("p", MiB, holder="h", cache_id="doomed")))
        await door.arrival()
        attach = asyncio.create_task(engine.attach("doomed", "h2"))
        await steps(5)
        door.open()
        with pytest.raises(OSError):
            await placing
        with pytest.raises(NotFound):
            await attach

    run(body)


def test_allocations_that_arrive_while_a_segment_is_created_share_it_instead_of_failing():
    """Pool r may hold one 8 MiB segment (max_bytes). While its first segment is being
    created, its other bytes are withheld: requests that arrive then must wait for the
    creation and be placed in it, not fail RESOURCE_EXHAUSTED (nor make a second
    segment) because they came a moment early."""
    pools = POOLS + [PoolSpec("r", ("host",), block_bytes=MiB, segment_bytes=8 * MiB, max_bytes=8 * MiB, gc_threshold=1.0)]

    async def body(engine, memory):
        door = memory.doors["create"]
        door.close()
        first = asyncio.create_task(engine.allocate(AllocationRequest("r", MiB, holder="h", cache_id="r0")))
        await door.arrival()
        others = [asyncio.create_task(engine.allocate(AllocationRequest("r", MiB, holder="h", cache_id=f"r{i}"))) for i in range(1, 6)]
        await steps(20)
        assert not any(t.done() for t in others), "they wait for the creation, they do not fail"
        door.open()
        placed = [info for info, _ in await asyncio.gather(first, *others)]
        assert {c.extents[0].segment_id for c in placed} == {placed[0].extents[0].segment_id}
        assert len(engine.broker.segments()) == 1
        check(engine)

    run(body, pools)
