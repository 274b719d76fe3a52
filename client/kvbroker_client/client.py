"""The broker's client: typed calls over one gRPC channel, returning caches and tensors.

``BrokerClient`` (sync) and ``AsyncBrokerClient`` (``grpc.aio``) have the same methods;
the async ones are coroutines. Both turn every failed call into a typed exception
(``kvbroker_client.errors``), build requests with the same pure functions, and identify
themselves to the broker with one session id (the ``kvbroker-session-id`` metadata), so
two clients holding the same cache are two holders: one's release never frees the
other's cache.

Lifetime: a client with a session id (the default) opens a broker session (a Watch stream
and heartbeats, ``kvbroker_client.session``): the broker drops its holds if the process
dies or hangs, and tells it when its caches are evicted or moved. A client holds what it
allocates or attaches until the cache is released; ``close()`` (or leaving ``with``)
releases every cache this client still holds and ends the session. A cache that must outlive its producer is allocated with
``retain=True`` (or attached by its consumer before the producer closes).

Cost: one RPC per call, except ``list_caches`` (one per page). Channels connect lazily on
the first call and fail fast (no wait-for-ready) when the broker is down.
"""

from __future__ import annotations

import operator
import os
import uuid
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import grpc

from kvbroker import wire
from kvbroker.v1 import broker_pb2 as pb
from kvbroker.v1 import broker_pb2_grpc
from kvbroker_client.cache import AsyncCache, Cache
from kvbroker_client.dtypes import DTypeLike, to_proto_dtype, to_torch_dtype
from kvbroker_client.errors import InvalidRequest, KvBrokerError, from_rpc_error
from kvbroker_client.session import AsyncSession, SyncSession

__all__ = [
    "DEFAULT_TARGET",
    "DEFAULT_TIMEOUT_S",
    "SESSION_METADATA_KEY",
    "AsyncBrokerClient",
    "BrokerClient",
    "allocate_request",
    "list_caches_request",
]

DEFAULT_TARGET = "127.0.0.1:50051"
#: Deadline of one call; an allocation that may wait gets its ``wait_timeout_ms`` on top.
DEFAULT_TIMEOUT_S = 10.0
SESSION_METADATA_KEY = wire.SESSION_ID_KEY

_STATE_BY_NAME = {"resident": pb.CACHE_STATE_RESIDENT, "evicted": pb.CACHE_STATE_EVICTED}

Response = TypeVar("Response")


def new_session_id() -> str:
    """A fresh holder id for this process's client (the broker's id alphabet)."""
    return f"py-{os.getpid()}-{uuid.uuid4().hex[:16]}"


def _checked(field: str, convert: Callable[[Any], Any], value: Any) -> Any:
    try:
        return convert(value)
    except (TypeError, ValueError) as err:
        raise InvalidRequest(f"{field}: {err}") from None


def allocate_request(
    pool: str = "default",
    *,
    size_bytes: int | None = None,
    dtype: DTypeLike | None = None,
    shape: Sequence[int] | None = None,
    cache_id: str = "",
    model_name: str = "",
    priority: int | None = None,
    pinned: bool = False,
    retain: bool = False,
    device: str = "",
    wait_timeout_ms: int = 0,
) -> pb.AllocateRequest:
    """Build an ``AllocateRequest``; the broker checks the rest and names the field.

    Raises:
        InvalidRequest: a value the wire cannot carry (a negative size, an unknown dtype
            name, a non-integer dimension).
    """
    request = pb.AllocateRequest(pool=pool, cache_id=cache_id, model_name=model_name, device=device)
    request.pinned, request.retain = bool(pinned), bool(retain)
    for field, value in (("size_bytes", size_bytes or 0), ("wait_timeout_ms", wait_timeout_ms)):
        _checked(field, lambda v, f=field: setattr(request, f, operator.index(v)), value)
    if priority is not None:
        _checked("priority", lambda v: setattr(request, "priority", operator.index(v)), priority)
    if dtype is not None:
        request.dtype = to_proto_dtype(dtype)
    if shape is not None:
        _checked("shape", lambda v: request.shape.extend(operator.index(d) for d in v), shape)
    return request


def list_caches_request(
    pool: str = "", model_name: str = "", state: str | int | None = None, page_size: int = 0
) -> pb.ListCachesRequest:
    """Build a ``ListCachesRequest``; ``state`` is ``"resident"``, ``"evicted"``, a
    ``CacheState`` value, or None for all."""
    if isinstance(state, str):
        if state.lower() not in _STATE_BY_NAME:
            raise InvalidRequest(f"state: {state!r} is not one of {', '.join(_STATE_BY_NAME)}")
        state = _STATE_BY_NAME[state.lower()]
    return pb.ListCachesRequest(
        pool=pool, model_name=model_name, state=state or pb.CACHE_STATE_UNSPECIFIED, page_size=page_size
    )


def _view_of(dtype: DTypeLike | None, shape: Sequence[int] | None) -> dict[str, Any]:
    return {"dtype": to_torch_dtype(dtype) if dtype is not None else None, "shape": shape}


class _ClientBase:
    """What both clients share: target, deadlines, session metadata, held caches."""

    def __init__(self, target: str, timeout_s: float | None, session_id: str | None) -> None:
        self._target = target
        self._timeout_s = timeout_s
        self._session_id = new_session_id() if session_id is None else session_id
        self._metadata = ((SESSION_METADATA_KEY, self._session_id),) if self._session_id else ()
        self._held: dict[str, Any] = {}
        self._closed = False

    @property
    def target(self) -> str:
        return self._target

    @property
    def session_id(self) -> str:
        """This client's holder id; empty for an anonymous client (an operator's)."""
        return self._session_id

    def _deadline(self, extra_ms: int = 0) -> float | None:
        return None if self._timeout_s is None else self._timeout_s + extra_ms / 1000

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"this {type(self).__name__} for {self._target} is closed")

    def _adopt(self, cache: Any) -> Any:
        self._held[cache.cache_id] = cache
        return cache

    def _forget(self, cache: Any) -> None:
        if self._held.get(cache.cache_id) is cache:
            del self._held[cache.cache_id]

    def _take_held(self) -> list[Any]:
        held = list(self._held.values())
        self._held.clear()  # in place: the session's event handler shares this dict
        return held

    def __repr__(self) -> str:
        return f"{type(self).__name__}(target={self._target!r}, session_id={self._session_id!r})"


class BrokerClient(_ClientBase):
    """Synchronous client of one broker. Thread-safe: one client per process is enough.

    Args:
        target: ``host:port`` or ``unix:///path/to/socket``.
        timeout_s: deadline of each call (None: no deadline).
        session_id: this client's holder id; default a fresh one; ``""`` calls as the
            broker's anonymous holder (for operators' tools).
        options: extra gRPC channel options.
    """

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        timeout_s: float | None = DEFAULT_TIMEOUT_S,
        session_id: str | None = None,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        super().__init__(target, timeout_s, session_id)
        self._channel = grpc.insecure_channel(target, options=list(options))
        self._stub = broker_pb2_grpc.CacheBrokerStub(self._channel)
        self._session: SyncSession | None = None
        if self._session_id:
            self._session = SyncSession(self._stub, self._session_id, self._metadata, self._held)
            self._session.state.opened.wait(timeout_s)

    def _call(self, method: Callable[..., Response], request: Any, timeout: float | None = None) -> Response:
        self._check_open()
        try:
            return method(request, timeout=timeout or self._deadline(), metadata=self._metadata)
        except grpc.RpcError as err:
            raise from_rpc_error(err, target=self._target) from err

    def allocate(
        self,
        pool: str = "default",
        *,
        size_bytes: int | None = None,
        dtype: DTypeLike | None = None,
        shape: Sequence[int] | None = None,
        cache_id: str = "",
        model_name: str = "",
        priority: int | None = None,
        pinned: bool = False,
        retain: bool = False,
        device: str = "",
        wait_timeout_ms: int = 0,
    ) -> Cache:
        """Place a new cache in ``pool`` and hold it.

        Give ``size_bytes``, or ``dtype`` and ``shape`` (then ``tensor()`` defaults to
        that view); with neither, the pool's default size. The call's deadline is the
        client timeout plus ``wait_timeout_ms``.

        Raises:
            CacheExhausted: no room, even after waiting ``wait_timeout_ms``.
            CacheAlreadyExists, CacheNotFound (the pool), InvalidRequest.
        """
        request = allocate_request(
            pool, size_bytes=size_bytes, dtype=dtype, shape=shape, cache_id=cache_id,
            model_name=model_name, priority=priority, pinned=pinned, retain=retain,
            device=device, wait_timeout_ms=wait_timeout_ms,
        )  # fmt: skip
        response = self._call(self._stub.Allocate, request, self._deadline(request.wait_timeout_ms))
        return self._adopt(Cache(self, response.cache, response.handle, **_view_of(dtype, shape)))

    def attach(self, cache_id: str) -> Cache:
        """Hold an existing cache (another process's) by id.

        Raises:
            CacheNotFound, CacheEvicted.
        """
        response = self._call(self._stub.Attach, pb.AttachRequest(cache_id=cache_id))
        return self._adopt(Cache(self, response.cache, response.handle))

    def release(self, cache_id: str, *, force: bool = False) -> bool:
        """Drop this client's hold on ``cache_id``; True when that freed the memory.
        Prefer ``Cache.release``; this form serves ids known only by name."""
        return self._call(self._stub.Release, pb.ReleaseRequest(cache_id=cache_id, force=force)).freed

    def _pin(self, cache_id: str) -> pb.PinResponse:
        return self._call(self._stub.Pin, pb.PinRequest(cache_id=cache_id))

    def _attach(self, cache_id: str) -> pb.AttachResponse:
        return self._call(self._stub.Attach, pb.AttachRequest(cache_id=cache_id))

    def report_unmapped(self) -> None:
        """Report now the retired segments no tensor of this process uses any more (the
        session also does it in the background, every 0.2 s)."""
        if self._session is not None:
            self._session.report_unmapped_now()

    def _unpin(self, cache_id: str) -> pb.UnpinResponse:
        return self._call(self._stub.Unpin, pb.UnpinRequest(cache_id=cache_id))

    def stats(self) -> pb.StatsResponse:
        """Capacity, usage and fragmentation: in total, per device and per pool."""
        return self._call(self._stub.Stats, pb.StatsRequest())

    def list_caches(
        self, pool: str = "", model_name: str = "", state: str | int | None = None, page_size: int = 0
    ) -> list[pb.Cache]:
        """Every cache matching the filters (empty: all), following the pages to the end.

        Cost: one RPC per ``page_size`` caches (the broker's default page when 0).
        """
        request = list_caches_request(pool, model_name, state, page_size)
        caches: list[pb.Cache] = []
        while True:
            response = self._call(self._stub.ListCaches, request)
            caches.extend(response.caches)
            if not response.next_page_token or response.next_page_token == request.page_token:
                return caches
            request.page_token = response.next_page_token

    def defragment(self, device: str = "", pool: str = "", dry_run: bool = False) -> pb.DefragmentResponse:
        """Compact ``device``/``pool`` now (empty: all), or only plan it with ``dry_run``."""
        request = pb.DefragmentRequest(device=device, pool=pool, dry_run=dry_run)
        return self._call(self._stub.Defragment, request)

    def close(self) -> None:
        """Release every cache this client still holds (best effort), then close the
        channel. Idempotent. Views already built stay mapped."""
        if self._closed:
            return
        for cache in self._take_held():
            try:
                cache.release()
            except KvBrokerError:
                cache._released = True  # the broker is gone or refused; the hold dies with the session
        self._closed = True
        if self._session is not None:
            self._session.close()
        self._channel.close()

    def __enter__(self) -> BrokerClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class AsyncBrokerClient(_ClientBase):
    """The asyncio twin of ``BrokerClient`` (``grpc.aio``): same arguments, same methods,
    as coroutines, returning ``AsyncCache``. Use it from one event loop."""

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        timeout_s: float | None = DEFAULT_TIMEOUT_S,
        session_id: str | None = None,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        super().__init__(target, timeout_s, session_id)
        self._channel = grpc.aio.insecure_channel(target, options=list(options))
        self._stub = broker_pb2_grpc.CacheBrokerStub(self._channel)
        self._session: AsyncSession | None = None

    async def _call(self, method: Callable[..., Any], request: Any, timeout: float | None = None) -> Any:
        self._check_open()
        if self._session is None and self._session_id:
            # The session's stream and heartbeat need the running loop: opened on first use.
            self._session = AsyncSession(self._stub, self._session_id, self._metadata, self._held)
        try:
            return await method(request, timeout=timeout or self._deadline(), metadata=self._metadata)
        except grpc.RpcError as err:
            raise from_rpc_error(err, target=self._target) from err

    async def allocate(
        self,
        pool: str = "default",
        *,
        size_bytes: int | None = None,
        dtype: DTypeLike | None = None,
        shape: Sequence[int] | None = None,
        cache_id: str = "",
        model_name: str = "",
        priority: int | None = None,
        pinned: bool = False,
        retain: bool = False,
        device: str = "",
        wait_timeout_ms: int = 0,
    ) -> AsyncCache:
        """Like ``BrokerClient.allocate``."""
        request = allocate_request(
            pool, size_bytes=size_bytes, dtype=dtype, shape=shape, cache_id=cache_id,
            model_name=model_name, priority=priority, pinned=pinned, retain=retain,
            device=device, wait_timeout_ms=wait_timeout_ms,
        )  # fmt: skip
        response = await self._call(self._stub.Allocate, request, self._deadline(request.wait_timeout_ms))
        return self._adopt(AsyncCache(self, response.cache, response.handle, **_view_of(dtype, shape)))

    async def attach(self, cache_id: str) -> AsyncCache:
        """Like ``BrokerClient.attach``."""
        response = await self._call(self._stub.Attach, pb.AttachRequest(cache_id=cache_id))
        return self._adopt(AsyncCache(self, response.cache, response.handle))

    async def release(self, cache_id: str, *, force: bool = False) -> bool:
        """Like ``BrokerClient.release``."""
        return (await self._call(self._stub.Release, pb.ReleaseRequest(cache_id=cache_id, force=force))).freed

    async def _pin(self, cache_id: str) -> pb.PinResponse:
        return await self._call(self._stub.Pin, pb.PinRequest(cache_id=cache_id))

    async def _attach(self, cache_id: str) -> pb.AttachResponse:
        return await self._call(self._stub.Attach, pb.AttachRequest(cache_id=cache_id))

    async def _unpin(self, cache_id: str) -> pb.UnpinResponse:
        return await self._call(self._stub.Unpin, pb.UnpinRequest(cache_id=cache_id))

    async def stats(self) -> pb.StatsResponse:
        """Like ``BrokerClient.stats``."""
        return await self._call(self._stub.Stats, pb.StatsRequest())

    async def list_caches(
        self, pool: str = "", model_name: str = "", state: str | int | None = None, page_size: int = 0
    ) -> list[pb.Cache]:
        """Like ``BrokerClient.list_caches``."""
        request = list_caches_request(pool, model_name, state, page_size)
        caches: list[pb.Cache] = []
        while True:
            response = await self._call(self._stub.ListCaches, request)
            caches.extend(response.caches)
            if not response.next_page_token or response.next_page_token == request.page_token:
                return caches
            request.page_token = response.next_page_token

    async def defragment(self, device: str = "", pool: str = "", dry_run: bool = False) -> pb.DefragmentResponse:
        """Like ``BrokerClient.defragment``."""
        request = pb.DefragmentRequest(device=device, pool=pool, dry_run=dry_run)
        return await self._call(self._stub.Defragment, request)

    async def close(self) -> None:
        """Like ``BrokerClient.close``."""
        if self._closed:
            return
        for cache in self._take_held():
            try:
                await cache.release()
            except KvBrokerError:
                cache._released = True
        self._closed = True
        if self._session is not None:
            await self._session.close()
        await self._channel.close()

    async def __aenter__(self) -> AsyncBrokerClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()
