"""``AsyncBrokerClient``: the asyncio transport (``grpc.aio``) of the client core.

Same core, same rules and same methods as ``kvbroker_client.sync.BrokerClient``, as
coroutines, returning ``AsyncCache``. The session (the Watch loop and the schedule) runs
as two tasks of the loop the client is first used on; use the client from that loop only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import grpc

from kvbroker.v1 import broker_pb2 as pb
from kvbroker.v1 import broker_pb2_grpc
from kvbroker_client.cache import AsyncCache
from kvbroker_client.calls import DEFAULT_TIMEOUT_S, Plan, channel_options, list_caches_request, resolve_target
from kvbroker_client.credentials import Credentials
from kvbroker_client.core import UNMAP_POLL_SECONDS, ClientCore, Phase
from kvbroker_client.dtypes import DTypeLike
from kvbroker_client.errors import BrokerUnavailable, KvBrokerError, from_rpc_error
from kvbroker_client.handles import check_handle
from kvbroker_client.paged import DEFAULT_GRANT_TOKENS
from kvbroker_client.paged_aio import AsyncPagedPool
from kvbroker_client.summary import summarize
from kvbroker_client.units import PriorityLike, SizeLike

__all__ = ["AsyncBrokerClient"]

log = logging.getLogger("kvbroker_client")
T = TypeVar("T")


class AsyncBrokerClient:
    """The asyncio twin of ``BrokerClient``: same arguments, same methods, as coroutines,
    returning ``AsyncCache``; the same session rules (``SessionLost``, a new session after
    a lost one). The session opens on first use (``async with`` or the first call)."""

    def __init__(
        self,
        target: str | None = None,
        *,
        timeout_s: float | None = DEFAULT_TIMEOUT_S,
        session_id: str | None = None,
        options: Sequence[tuple[str, Any]] = (),
        token: str | None = None,
        tls_ca: str | None = None,
        tls_cert: str | None = None,
        tls_key: str | None = None,
    ) -> None:
        target = resolve_target(target)
        self._credentials = Credentials.resolve(token, tls_ca, tls_cert, tls_key)
        self._core = ClientCore(target, timeout_s, session_id, lambda: self._credentials.metadata(target))
        self._channel = self._credentials.channel(target, channel_options(options), aio=True)
        self._stub = broker_pb2_grpc.CacheBrokerStub(self._channel)
        self._session: _AsyncSession | None = None
        #: Called (on the loop) with each event about a paged pool's sequence.
        self.sequence_listeners: list[Callable[[pb.WatchEvent], None]] = []

    @property
    def target(self) -> str:
        return self._core.target

    @property
    def session_id(self) -> str:
        """Like ``BrokerClient.session_id``."""
        return self._core.session_id

    @property
    def core(self) -> ClientCore:
        """Like ``BrokerClient.core``."""
        return self._core

    def _start_session(self) -> None:
        # The session's tasks need the running loop: started on first use.
        if self._session is None and self._core.phase is Phase.CONNECTING:
            self._session = _AsyncSession(self._core, self._stub, self._recover, self.sequence_listeners)

    async def drive(self, plan: Plan[T]) -> T:
        """Like ``BrokerClient.drive``, awaiting each call."""
        self._start_session()
        try:
            call = next(plan)
            while True:
                metadata = call.metadata
                try:
                    if metadata and self._core.phase is Phase.CONNECTING:
                        # The core's wait blocks: in a thread, so the session task can run.
                        metadata = await asyncio.to_thread(
                            self._core.metadata_when_open, call, call.timeout or DEFAULT_TIMEOUT_S
                        )
                    response = await getattr(self._stub, call.method)(call.request, timeout=call.timeout, metadata=metadata)
                except grpc.RpcError as err:
                    error = from_rpc_error(err, target=self._core.target)
                    call = plan.throw(error)
                except BrokerUnavailable as unsent:  # no session opened in time: not sent
                    call = plan.throw(unsent)
                else:
                    call = plan.send(response)
        except StopIteration as stop:
            return stop.value

    async def _recover(self) -> None:
        """Like ``BrokerClient._recover``: a task the session starts once a new session
        is open."""
        for held in self._core.stranded():
            try:
                await self.drive(self._core.view(held))
            except KvBrokerError as err:
                log.info("kvbroker cache %s not re-attached: %s", held.cache_id, err.message)

    async def allocate(
        self,
        pool: str = "default",
        *,
        size_bytes: int | None = None,
        dtype: DTypeLike | None = None,
        shape: Sequence[int] | None = None,
        cache_id: str = "",
        model_name: str = "",
        priority: PriorityLike = None,
        pinned: bool = False,
        retain: bool = False,
        device: str = "",
        wait_timeout_ms: int = 0,
        size: SizeLike | None = None,
        size_mb: float | None = None,
        size_gb: float | None = None,
    ) -> AsyncCache:
        """Like ``BrokerClient.allocate``."""
        held = await self.drive(self._core.allocate(
            pool, size_bytes=size_bytes, dtype=dtype, shape=shape, cache_id=cache_id,
            model_name=model_name, priority=priority, pinned=pinned, retain=retain,
            device=device, wait_timeout_ms=wait_timeout_ms, size=size, size_mb=size_mb, size_gb=size_gb,
            check=check_handle,
        ))  # fmt: skip
        return AsyncCache(self, held, dtype=dtype, shape=shape)

    async def attach(self, cache_id: str, *, wait_timeout_ms: int = 0) -> AsyncCache:
        """Like ``BrokerClient.attach``."""
        return AsyncCache(self, await self.drive(self._core.attach(cache_id, wait_timeout_ms)))

    async def release(self, cache_id: str, *, force: bool = False) -> bool:
        """Like ``BrokerClient.release``."""
        return await self.drive(self._core.release_id(cache_id, force))

    async def report_unmapped(self) -> None:
        """Like ``BrokerClient.report_unmapped``."""
        for call in self._core.due(time.monotonic(), heartbeat=False):
            await self.drive(self._core.unary(call.method, call.request))

    async def stats(self) -> pb.StatsResponse:
        """Like ``BrokerClient.stats``."""
        return await self.drive(self._core.unary("Stats", pb.StatsRequest()))

    async def summary(self) -> dict[str, Any]:
        """Like ``BrokerClient.summary``."""
        return summarize(await self.stats())

    async def list_caches(
        self, pool: str = "", model_name: str = "", state: str | int | None = None, page_size: int = 0
    ) -> list[pb.Cache]:
        """Like ``BrokerClient.list_caches``."""
        return await self.drive(self._core.list_caches(list_caches_request(pool, model_name, state, page_size)))

    async def sessions(self) -> pb.SessionsResponse:
        """Like ``BrokerClient.sessions``."""
        return await self.drive(self._core.unary("Sessions", pb.SessionsRequest()))

    async def end_sessions(
        self, *, older_than_seconds: float = 0.0, session_ids: Sequence[str] = (), dry_run: bool = False
    ) -> pb.EndSessionsResponse:
        """Like ``BrokerClient.end_sessions``."""
        request = pb.EndSessionsRequest(older_than_seconds=older_than_seconds, session_ids=session_ids, dry_run=dry_run)
        return await self.drive(self._core.unary("EndSessions", request))

    async def defragment(
        self, device: str = "", pool: str = "", dry_run: bool = False, target_bytes: int = 0,
    ) -> pb.DefragmentResponse:
        """Like ``BrokerClient.defragment``."""
        request = pb.DefragmentRequest(device=device, pool=pool, dry_run=dry_run, target_bytes=target_bytes)
        return await self.drive(self._core.unary("Defragment", request))

    async def paged_pool(self, pool: str, *, grant_tokens: int = DEFAULT_GRANT_TOKENS, populate: bool = False) -> AsyncPagedPool:
        """Like ``BrokerClient.paged_pool``: an ``AsyncPagedPool``."""
        return await AsyncPagedPool.open(self, pool, grant_tokens=grant_tokens, populate=populate)

    async def close(self) -> None:
        """Like ``BrokerClient.close``."""
        if self._core.closed:
            return
        await self.drive(self._core.close())
        if self._session is not None:
            await self._session.stop()
        await self._channel.close()

    async def __aenter__(self) -> AsyncBrokerClient:
        self._start_session()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(target={self.target!r}, session_id={self.session_id!r})"


class _AsyncSession:
    """The session's two tasks: the Watch loop and the schedule."""

    def __init__(self, core: ClientCore, stub: Any, recover: Any,
                 listeners: list[Callable[[pb.WatchEvent], None]]) -> None:
        self._core = core
        self._stub = stub
        self._recover = recover  # a coroutine function: re-attaches the stranded records
        self._recovering: set[asyncio.Task] = set()
        self._listeners = listeners
        self._stream: Any = None
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._watch_loop()), loop.create_task(self._schedule_loop())]

    async def _watch_loop(self) -> None:
        core = self._core
        while True:
            delay = core.reconnect_delay()
            if delay:
                await asyncio.sleep(delay)
            call = core.watch_call()
            if call is None:
                return
            waits = core.watch_waits_for_ready()
            self._stream = stream = self._stub.Watch(call.request, metadata=call.metadata, wait_for_ready=waits)
            lost_before, detail = core.sessions_lost, "the broker ended it"
            try:
                async for event in stream:
                    alive = core.on_event(event, call.generation, time.monotonic())
                    if event.kind == pb.EVENT_KIND_SESSION_OPENED and core.sessions_lost:
                        task = asyncio.get_running_loop().create_task(self._recover())
                        self._recovering.add(task)
                        task.add_done_callback(self._recovering.discard)
                    if not alive:
                        break
                    if event.sequence_id:
                        for listener in list(self._listeners):
                            listener(event)
            except grpc.RpcError as err:
                detail = f"{err.code().name}: {err.details()}"
            finally:
                stream.cancel()
            core.on_stream_end(call.generation, detail, time.monotonic())
            if core.sessions_lost != lost_before:
                log.warning("kvbroker session lost (%s); opening session %s", core.last_loss, core.session_id)

    async def _schedule_loop(self) -> None:
        while True:
            await asyncio.sleep(UNMAP_POLL_SECONDS)
            for call in self._core.due(time.monotonic()):
                try:
                    await getattr(self._stub, call.method)(call.request, timeout=call.timeout, metadata=call.metadata)
                except grpc.RpcError as err:
                    log.debug("kvbroker %s failed: %s", call.method, err.details())

    async def stop(self) -> None:
        if self._stream is not None:
            self._stream.cancel()
        for task in self._tasks:
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*self._tasks, return_exceptions=True)
