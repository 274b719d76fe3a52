"""Issue 9.3: a cancelled Allocate holds nothing and leaks nothing.

(a) A segment being created when its caller is cancelled is still created (a thread
cannot be stopped), then the allocation is aborted and the segment freed.
(b) Callers cancelled while waiting, or between placement and hand-out, never leave a
cache behind: every cache that exists at the end belongs to a caller that got it.
Every interleaving here is driven by events and loop steps, never by elapsed time.
"""

from __future__ import annotations

import asyncio
import random

import pytest

from kvbroker.core import AllocationRequest, PoolSpec
from kvbroker.core.errors import FailedPrecondition
from kvbroker.engine import EngineSettings
from kvbroker.wire import SessionEndReason

from .support import DoorMemory, MiB, check, host_engine, private_shm_dir, shm_objects, steps, until


def test_a_segment_created_for_a_cancelled_caller_is_freed():
    async def body(shm_dir: str):
        engine = host_engine(shm_dir, wrap=DoorMemory)
        memory = engine.memory("host")
        door = memory.doors["create"]
        door.close()
        task = asyncio.create_task(engine.allocate(AllocationRequest("p", MiB, holder="gone")))
        await door.arrival()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        assert task.cancelled()
        door.open()
        await engine.idle()
        assert shm_objects(shm_dir) == [], "the segment made for a gone caller is freed"
        assert memory.segment_ids() == []
        stats = engine.broker.stats()
        assert (stats.total.segments, stats.total.active_caches) == (0, 0)
        check(engine)
        await engine.close()

    with private_shm_dir() as shm_dir:
        asyncio.run(body(shm_dir))


def test_zeroing_for_a_cancelled_caller_aborts_the_allocation():
    async def body(shm_dir: str):
        engine = host_engine(shm_dir, wrap=DoorMemory)
        memory = engine.memory("host")
        # 4 MiB: above INLINE_ZERO_BYTES, so the zeroing runs in a thread the caller awaits.
        first, _ = await engine.allocate(AllocationRequest("p", 4 * MiB, holder="a"))
        await engine.release(first.cache_id, "a")
        door = memory.doors["zero"]
        door.close()
        task = asyncio.create_task(engine.allocate(AllocationRequest("p", 4 * MiB, holder="gone")))
        await door.arrival()
        task.cancel()
        door.open()
        await asyncio.gather(task, return_exceptions=True)
        await engine.idle()
        assert engine.broker.stats().total.active_caches == 0
        assert len(shm_objects(shm_dir)) == len(engine.broker.segments()) == 1
        check(engine)
        await engine.close()

    with private_shm_dir() as shm_dir:
        asyncio.run(body(shm_dir))


@pytest.mark.parametrize("retire_segment", [False, True], ids=["zeroing", "creating"])
def test_cancelled_waiters_never_leave_a_cache_behind(retire_segment):
    """100 waiting Allocates; room is freed and every caller is cancelled, in every
    order and with every gap of loop steps between the two. Afterwards the caches that
    exist are exactly those whose callers got them."""

    async def body(shm_dir: str):
        pools = [PoolSpec("p", ("host",), block_bytes=MiB, segment_bytes=16 * MiB, gc_threshold=1.0)]
        settings = EngineSettings(lease_seconds=60, segment_idle_seconds=0)
        engine = host_engine(shm_dir, pools=pools, settings=settings)
        rng = random.Random(93)
        for round_ in range(24):
            # Anonymous: it maps nothing, so its segment can be retired at once.
            blocker, _ = await engine.allocate(AllocationRequest("p", 16 * MiB, pinned=True))
            tasks = [
                # 4 MiB: above INLINE_ZERO_BYTES, so a reused place is zeroed in a thread
                # (an await where the caller can be cancelled).
                asyncio.create_task(engine.allocate(AllocationRequest("p", 4 * MiB, holder=f"w{i}"), wait_timeout_s=60))
                for i in range(100)
            ]
            await until(lambda: engine.waiting == 100, what=f"100 waiters in round {round_} (have {engine.waiting}, {[t for t in tasks if t.done()][:2]})")
            gap = round_ % 8
            cancel_first = round_ % 3 == 0
            order = list(tasks)
            rng.shuffle(order)
            cancelled: set[asyncio.Task] = set()  # cancelled while still running
            if cancel_first:
                cancelled.update(t for t in order if t.cancel())
            await engine.release(blocker.cache_id, "")
            if retire_segment:
                await engine.idle()
                await engine.tick()  # the empty segment goes: the next cache needs a new one
            await steps(gap)
            if not cancel_first:
                cancelled.update(t for t in order[: len(order) // 2] if t.cancel())
                await steps(gap)
                cancelled.update(t for t in order[len(order) // 2 :] if t.cancel())
            async with asyncio.timeout(20):
                results = await asyncio.gather(*tasks, return_exceptions=True)
            await engine.idle()
            for task in cancelled:
                assert task.cancelled(), f"round {round_}: a cancelled caller was handed a cache"
            got = {r[0].cache_id: f"w{i}" for i, r in enumerate(results) if isinstance(r, tuple)}
            held = {c.cache_id: set(c.holders) for c in engine.broker.caches()}
            assert set(held) == set(got), f"round {round_}: caches without a caller"
            for cache_id, holder in got.items():
                assert held[cache_id] == {holder}
            for i in range(100):  # the clients go away: their caches and mappings too
                await engine.end_session(f"w{i}", SessionEndReason.STREAM_CLOSED)
            assert engine.waiting == 0
            await engine.idle()
            check(engine)
            assert engine.broker.stats().total.active_caches == 0
            assert len(shm_objects(shm_dir)) == len(engine.broker.segments())
        await engine.close()

    with private_shm_dir() as shm_dir:
        asyncio.run(body(shm_dir))


def test_a_session_that_ends_while_its_cache_is_created_gets_nothing():
    async def body(shm_dir: str):
        engine = host_engine(shm_dir, wrap=DoorMemory)
        door = engine.memory("host").doors["create"]
        door.close()
        task = asyncio.create_task(engine.allocate(AllocationRequest("p", MiB, holder="s")))
        await door.arrival()
        await engine.end_session("s", SessionEndReason.LEASE_EXPIRED)
        door.open()
        with pytest.raises(FailedPrecondition, match="session ended while the cache was being created"):
            await task
        await engine.idle()
        assert engine.broker.stats().total.active_caches == 0
        assert len(shm_objects(shm_dir)) == len(engine.broker.segments())
        check(engine)
        await engine.close()

    with private_shm_dir() as shm_dir:
        asyncio.run(body(shm_dir))
