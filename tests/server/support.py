"""The real grpc.aio server with the real engine over host segments, in the test
process, on 127.0.0.1 port 0, called through a real channel."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass

import grpc
import pytest

from kvbroker.core import PoolSpec
from kvbroker.engine import Engine, EngineSettings
from kvbroker.server.app import create_server
from kvbroker.v1 import broker_pb2_grpc
from kvbroker.wire import SESSION_ID_KEY
from tests.engine.support import MiB, host_engine

POOLS = (
    PoolSpec("p", ("host",), block_bytes=MiB, segment_bytes=8 * MiB, gc_threshold=1.0),
    PoolSpec("small", ("host",), block_bytes=MiB, segment_bytes=4 * MiB, max_bytes=4 * MiB, gc_threshold=1.0),
)


@dataclass
class Served:
    engine: Engine
    stub: broker_pb2_grpc.CacheBrokerStub
    channel: grpc.aio.Channel
    shm_dir: str
    port: int


@asynccontextmanager
async def serving(
    shm_dir: str, *, capacity: int = 32 * MiB, pools: Sequence[PoolSpec] = POOLS,
    settings: EngineSettings | None = None, wrap: Callable = lambda memory: memory, observer: object = None,
) -> AsyncIterator[Served]:  # fmt: skip
    engine = host_engine(shm_dir, capacity=capacity, pools=pools, settings=settings, wrap=wrap, observer=observer)
    server = await create_server(engine, listen="127.0.0.1:0", unix_socket=None)
    await server.start()
    engine.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.tcp_port}")
    try:
        yield Served(engine, broker_pb2_grpc.CacheBrokerStub(channel), channel, shm_dir, server.tcp_port)
    finally:
        await channel.close()
        await server.stop(0)
        await engine.close()


def session(session_id: str) -> tuple[tuple[str, str], ...]:
    return ((SESSION_ID_KEY, session_id),)


async def next_event(call, timeout: float = 10.0):
    """The next message of a stream (``grpc.aio.EOF`` at its end), within ``timeout``."""
    async with asyncio.timeout(timeout):
        return await call.read()


async def expect(code: grpc.StatusCode, call) -> str:
    """Await ``call`` and return the details of the error it must end with."""
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    assert info.value.code() == code, info.value.details()
    return info.value.details()
