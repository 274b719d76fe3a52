"""Issue 9.1: bytes a tenant released never reach the next tenant (real host segments).

The core says when an extent held bytes before (``needs_zeroing``); the engine zeroes
it in a device thread before handing it out, unless the pool's ``scrub`` is off
(single-tenant deployments only)."""

from __future__ import annotations

import asyncio

from kvbroker.core import AllocationRequest, PoolSpec

from .support import DoorMemory, MiB, check, host_engine, private_shm_dir
from tests.support.segments import read_segment, write_segment


def _pool(scrub: bool = True) -> list[PoolSpec]:
    return [PoolSpec("p", ("host",), block_bytes=MiB, segment_bytes=4 * MiB, gc_threshold=1.0, scrub=scrub)]


def _bytes_of(engine, info) -> bytes:
    extent = info.extents[0]
    return read_segment(engine.memory("host"), extent.segment_id, extent.offset, info.nbytes)


def test_released_bytes_are_zeroed_before_the_next_tenant_gets_them():
    async def body(shm_dir: str):
        engine = host_engine(shm_dir, pools=_pool(), wrap=DoorMemory)
        memory = engine.memory("host")
        a, _ = await engine.allocate(AllocationRequest("p", MiB, holder="A"))
        write_segment(memory, a.extents[0].segment_id, a.extents[0].offset, b"\xab" * MiB)
        await engine.release(a.cache_id, "A")
        b, handle = await engine.allocate(AllocationRequest("p", MiB, holder="B"))
        assert b.extents == a.extents, "B got the bytes A released"
        assert (handle.segment.segment_id, handle.byte_offset) == (a.extents[0].segment_id, a.extents[0].offset)
        assert _bytes_of(engine, b) == bytes(MiB)
        assert memory.zeroed == [(a.extents[0].segment_id, a.extents[0].offset, MiB)]
        check(engine)
        await engine.close()

    with private_shm_dir() as shm_dir:
        asyncio.run(body(shm_dir))


def test_a_fresh_segment_is_not_zeroed_twice():
    async def body(shm_dir: str):
        engine = host_engine(shm_dir, pools=_pool(), wrap=DoorMemory)
        info, _ = await engine.allocate(AllocationRequest("p", MiB, holder="A"))
        assert _bytes_of(engine, info) == bytes(MiB)
        assert engine.memory("host").zeroed == [], "a new segment is zero-filled by its creation"
        await engine.close()

    with private_shm_dir() as shm_dir:
        asyncio.run(body(shm_dir))


def test_without_scrub_the_next_tenant_sees_the_old_bytes():
    """What ``scrub = false`` means (and why it is for single-tenant deployments only)."""

    async def body(shm_dir: str):
        engine = host_engine(shm_dir, pools=_pool(scrub=False))
        memory = engine.memory("host")
        a, _ = await engine.allocate(AllocationRequest("p", MiB, holder="A"))
        write_segment(memory, a.extents[0].segment_id, a.extents[0].offset, b"\xab" * MiB)
        await engine.release(a.cache_id, "A")
        b, _ = await engine.allocate(AllocationRequest("p", MiB, holder="B"))
        assert b.extents == a.extents
        assert _bytes_of(engine, b) == b"\xab" * MiB
        await engine.close()

    with private_shm_dir() as shm_dir:
        asyncio.run(body(shm_dir))


def test_the_place_a_moved_cache_left_is_zeroed_for_the_next_cache():
    """[X][Y][Z][ ] -> release X, defragment -> [Y][Z][ ][ ]: Z's old bytes are still
    at 2-3 MiB until a new 2 MiB cache is placed over them; it reads zeros."""

    async def body(shm_dir: str):
        engine = host_engine(shm_dir, pools=_pool())
        memory = engine.memory("host")
        x, _ = await engine.allocate(AllocationRequest("p", MiB, holder="h"))
        y, _ = await engine.allocate(AllocationRequest("p", MiB, holder="h"))
        z, _ = await engine.allocate(AllocationRequest("p", MiB, holder="h"))
        write_segment(memory, z.extents[0].segment_id, z.extents[0].offset, b"\xcd" * MiB)
        await engine.release(x.cache_id, "h")
        result = await engine.defragment(device=None, pool="p", dry_run=False)
        assert result.caches_moved == 2
        moved = engine.broker.get(z.cache_id)
        assert moved.extents[0].offset == MiB and _bytes_of(engine, moved) == b"\xcd" * MiB
        old = z.extents[0]
        assert read_segment(memory, old.segment_id, old.offset, MiB) == b"\xcd" * MiB, "the copy leaves the source as is"
        new, _ = await engine.allocate(AllocationRequest("p", 2 * MiB, holder="n"))
        assert new.extents[0].offset == 2 * MiB, "placed where Z was"
        assert _bytes_of(engine, new) == bytes(2 * MiB)
        check(engine)
        await engine.close()

    with private_shm_dir() as shm_dir:
        asyncio.run(body(shm_dir))
