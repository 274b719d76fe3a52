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
from kvbroker.wire import SESSION_ID_KEY, SESSION_SECRET_KEY
from tests.engine.support import MiB, host_engine, private_shm_dir

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
    keeper = SecretKeeper()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.tcp_port}", interceptors=[keeper.unary, keeper.stream])
    try:
        yield Served(engine, broker_pb2_grpc.CacheBrokerStub(channel), channel, shm_dir, server.tcp_port)
    finally:
        await channel.close()
        await server.stop(0)
        await engine.close()


def run(body, **options) -> None:
    """Run ``await body(served)`` against a server and engine of its own (``serving``'s
    options), in a private shm directory, on a fresh event loop."""
    with private_shm_dir() as shm_dir:
        async def main():
            async with serving(shm_dir, **options) as served:
                await body(served)

        asyncio.run(main())


def session(session_id: str) -> tuple[tuple[str, str], ...]:
    """Metadata naming a session; the channel's ``SecretKeeper`` adds its secret."""
    return ((SESSION_ID_KEY, session_id),)


class SecretKeeper:
    """Plays the client stub's part with session secrets, so tests can name sessions by
    id: the secret a session's first call (or Watch) got back in its initial metadata is
    added to every later call that names the session. A call that names a session with
    ``SESSION_SECRET_KEY`` already in its metadata is left as it is (tests of forgery)."""

    def __init__(self) -> None:
        self.secrets: dict[str, str] = {}
        self._learning: set[asyncio.Future] = set()
        keeper = self

        class Unary(grpc.aio.UnaryUnaryClientInterceptor):
            async def intercept_unary_unary(self, continuation, details, request):
                return await keeper._call(continuation, details, request)

        class Stream(grpc.aio.UnaryStreamClientInterceptor):
            async def intercept_unary_stream(self, continuation, details, request):
                return await keeper._call(continuation, details, request)

        self.unary, self.stream = Unary(), Stream()

    async def _call(self, continuation, details, request):
        metadata = list(details.metadata or ())
        keys = {k for k, _ in metadata}
        session_id = next((v for k, v in metadata if k == SESSION_ID_KEY), None)
        if session_id and SESSION_SECRET_KEY not in keys and session_id in self.secrets:
            metadata.append((SESSION_SECRET_KEY, self.secrets[session_id]))
            details = details._replace(metadata=grpc.aio.Metadata(*metadata))
        call = await continuation(details, request)
        if session_id and session_id not in self.secrets:
            # Learn the secret beside the call: awaiting it here would keep a cancel of
            # the caller's call from reaching the underlying RPC.
            self._learning.add(asyncio.ensure_future(self._learn(session_id, call)))
        return call

    async def _learn(self, session_id: str, call) -> None:
        try:
            initial = await call.initial_metadata()
        except (grpc.aio.AioRpcError, asyncio.CancelledError):
            return
        for key, value in initial or ():
            if key == SESSION_SECRET_KEY:
                self.secrets.setdefault(session_id, value)


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
