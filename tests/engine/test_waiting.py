"""The engine's wait queue, with real host segments: FIFO within a priority, higher
priority first, served as soon as memory is freed, timeouts and cancellation clean."""

from __future__ import annotations

import asyncio

import pytest

from kvbroker.core import AllocationRequest, Broker, DeviceSpec, PoolSpec
from kvbroker.core.errors import DeadlineExceeded
from kvbroker.engine import Engine, EngineSettings
from kvbroker.memory.host import HostMemory

MiB = 1 << 20


@pytest.fixture
def engine(tmp_path):
    broker = Broker(
        [DeviceSpec("host", 16 * MiB, 4096)],
        [PoolSpec("p", ("host",), block_bytes=MiB, segment_bytes=16 * MiB, gc_threshold=1.0)],
    )
    memory = HostMemory("wait", shm_dir=str(tmp_path))
    engine = Engine(broker, {"host": memory}, "wait", EngineSettings(lease_seconds=60))
    yield engine
    asyncio.run(engine.close())


def test_waiters_are_served_by_priority_then_arrival(engine):
    async def body():
        blocker, _ = await engine.allocate(AllocationRequest("p", 16 * MiB, holder="h", pinned=True))
        served: list[str] = []

        async def wait(name: str, priority: int) -> None:
            info, _ = await engine.allocate(
                AllocationRequest("p", 8 * MiB, holder=name, priority=priority, pinned=True), wait_timeout_s=10
            )
            served.append(name)

        tasks = []
        for name, priority in (("low-1", 0), ("high", 3), ("low-2", 0)):
            tasks.append(asyncio.create_task(wait(name, priority)))
            await asyncio.sleep(0.05)
        assert served == []
        await engine.unpin(blocker.cache_id, "h")
        await engine.release(blocker.cache_id, "h")
        await asyncio.sleep(0.2)
        assert served == ["high", "low-1"], "two 8 MiB requests fit: the high one, then the first low one"
        assert len(engine._waiters) == 1, "low-2 still waits for its turn"
        tasks[2].cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        assert engine._waiters == []

    asyncio.run(body())


def test_timeout_and_cancellation_leave_the_queue(engine):
    async def body():
        blocker, _ = await engine.allocate(AllocationRequest("p", 16 * MiB, holder="h", pinned=True))
        with pytest.raises(DeadlineExceeded, match="wait_timeout_ms=200"):
            await engine.allocate(AllocationRequest("p", MiB, holder="w"), wait_timeout_s=0.2)
        task = asyncio.create_task(engine.allocate(AllocationRequest("p", MiB, holder="c"), wait_timeout_s=10))
        await asyncio.sleep(0.05)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        assert engine._waiters == []
        await engine.unpin(blocker.cache_id, "h")
        await engine.release(blocker.cache_id, "h")
        await asyncio.sleep(0.05)
        assert engine.broker.stats().total.allocated_bytes == 0, "the cancelled request got nothing"

    asyncio.run(body())
