"""The engine's wait queue, with real host segments: FIFO within a priority, higher
priority first, served as soon as memory is freed, timeouts and cancellation clean."""

from __future__ import annotations

import asyncio

import pytest

from kvbroker.core import AllocationRequest
from kvbroker.core.errors import DeadlineExceeded

from .support import MiB, host_engine, private_shm_dir, until


@pytest.fixture
def engine():
    with private_shm_dir() as shm_dir:
        engine = host_engine(shm_dir)
        yield engine
        asyncio.run(engine.close())


def test_waiters_are_served_by_priority_then_arrival(engine):
    async def body():
        # Two 8 MiB blockers fill the device: each release makes room for one waiter, so
        # the order of service is the order of placement (backing then runs in threads).
        blockers = [(await engine.allocate(AllocationRequest("p", 8 * MiB, holder="h", pinned=True)))[0] for _ in range(2)]
        served: list[str] = []

        async def wait(name: str, priority: int) -> None:
            await engine.allocate(
                AllocationRequest("p", 8 * MiB, holder=name, priority=priority, pinned=True), wait_timeout_s=30
            )
            served.append(name)

        tasks = []
        for n, (name, priority) in enumerate((("low-1", 0), ("high", 3), ("low-2", 0)), 1):
            tasks.append(asyncio.create_task(wait(name, priority)))
            await until(lambda: engine.waiting == n, what=f"{n} waiters")
        assert served == []
        await engine.unpin(blockers[0].cache_id, "h")
        await engine.release(blockers[0].cache_id, "h")
        await until(lambda: len(served) == 1, what="one served")
        assert served == ["high"], "the highest priority first"
        await engine.unpin(blockers[1].cache_id, "h")
        await engine.release(blockers[1].cache_id, "h")
        await until(lambda: len(served) == 2, what="two served")
        assert served == ["high", "low-1"], "then, within a priority, the first to arrive"
        assert engine.waiting == 1, "low-2 still waits for its turn"
        tasks[2].cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        assert engine.waiting == 0

    asyncio.run(body())


def test_timeout_and_cancellation_leave_the_queue(engine):
    async def body():
        blocker, _ = await engine.allocate(AllocationRequest("p", 16 * MiB, holder="h", pinned=True))
        with pytest.raises(DeadlineExceeded, match="wait_timeout_ms=200"):
            await engine.allocate(AllocationRequest("p", MiB, holder="w"), wait_timeout_s=0.2)
        task = asyncio.create_task(engine.allocate(AllocationRequest("p", MiB, holder="c"), wait_timeout_s=30))
        await until(lambda: engine.waiting == 1, what="the waiter")
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        assert engine.waiting == 0
        await engine.unpin(blocker.cache_id, "h")
        await engine.release(blocker.cache_id, "h")
        await engine.idle()
        assert engine.broker.stats().total.allocated_bytes == 0, "the cancelled request got nothing"

    asyncio.run(body())


def test_a_head_that_does_not_fit_blocks_smaller_requests_behind_it(engine):
    async def body():
        a, _ = await engine.allocate(AllocationRequest("p", 8 * MiB, holder="h", pinned=True))
        b, _ = await engine.allocate(AllocationRequest("p", 8 * MiB, holder="h", pinned=True))
        big = asyncio.create_task(engine.allocate(AllocationRequest("p", 16 * MiB, holder="big"), wait_timeout_s=30))
        await until(lambda: engine.waiting == 1)
        small = asyncio.create_task(engine.allocate(AllocationRequest("p", MiB, holder="small"), wait_timeout_s=30))
        await until(lambda: engine.waiting == 2)
        await engine.release(a.cache_id, "h")
        await engine.idle()
        assert not small.done(), "8 MiB are free, but the 16 MiB head goes first"
        await engine.release(b.cache_id, "h")
        info, _ = await big
        assert info.nbytes == 16 * MiB
        await engine.release(info.cache_id, "big")
        small_info, _ = await small
        assert small_info.nbytes == MiB

    asyncio.run(body())
