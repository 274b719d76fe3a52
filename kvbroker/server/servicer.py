"""The gRPC adapter of ``kvbroker.v1.CacheBroker``: decode, one engine call, encode.

No state and no policy live here: a method that needs more than decode/call/encode is
missing a piece in the engine or the core. Domain errors become status codes through
``convert.status_for`` (one table) with capped details (``convert.error_details``);
anything else is a bug, logged with its traceback and answered with INTERNAL, so one
bad request never takes the daemon down. Request bytes that do not parse never reach
these methods (``kvbroker.server.registration`` answers them INVALID_ARGUMENT).

The caller's identity (its holder id) comes from the ``kvbroker-session-id`` request
metadata (``wire.SESSION_ID_KEY``); calls without it act as the one anonymous holder
(an operator's grpcurl).
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import grpc

from kvbroker.core import ANONYMOUS_HOLDER
from kvbroker.core.errors import BrokerError
from kvbroker.core.types import validate_id
from kvbroker.engine import Engine
from kvbroker.server import convert
from kvbroker.v1 import broker_pb2 as pb
from kvbroker.v1 import broker_pb2_grpc
from kvbroker.wire import SESSION_ID_KEY

log = logging.getLogger(__name__)

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000

Response = TypeVar("Response")


def _translate_errors(
    method: Callable[..., Awaitable[Response]],
) -> Callable[..., Awaitable[Response]]:
    """Answer domain errors with their status code and bugs with INTERNAL."""

    @functools.wraps(method)
    async def wrapper(self, request, context: grpc.aio.ServicerContext) -> Response:
        try:
            return await method(self, request, context)
        except BrokerError as err:
            await context.abort(convert.status_for(err), convert.error_details(err))
        except grpc.aio.AbortError:
            raise
        except Exception:
            log.exception("internal error in %s", method.__name__)
            await context.abort(grpc.StatusCode.INTERNAL, f"internal error in {method.__name__}; see the daemon log")

    return wrapper


@functools.lru_cache(maxsize=4096)
def _valid_session_id(value: str) -> str:
    """Validate a session id once per distinct value (every RPC of a session sends it)."""
    if not value:
        raise convert.InvalidArgument(SESSION_ID_KEY, "is required to open a session")
    return validate_id(SESSION_ID_KEY, value)


def holder_of(context: grpc.aio.ServicerContext) -> str:
    """The caller's holder id from its metadata (anonymous without one)."""
    for key, value in context.invocation_metadata() or ():
        if key == SESSION_ID_KEY:
            return _valid_session_id(value)
    return ANONYMOUS_HOLDER


class CacheBrokerServicer(broker_pb2_grpc.CacheBrokerServicer):
    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    @_translate_errors
    async def Allocate(self, request: pb.AllocateRequest, context) -> pb.AllocateResponse:
        core_request, wait_s = convert.allocation_request(request, holder_of(context))
        info, handle = await self._engine.allocate(core_request, wait_timeout_s=wait_s)
        return pb.AllocateResponse(cache=convert.cache_message(info), handle=convert.handle_message(handle))

    @_translate_errors
    async def Release(self, request: pb.ReleaseRequest, context) -> pb.ReleaseResponse:
        cache_id = convert.required_id("cache_id", request.cache_id)
        freed = await self._engine.release(cache_id, holder_of(context), force=request.force)
        return pb.ReleaseResponse(freed=freed)

    @_translate_errors
    async def Attach(self, request: pb.AttachRequest, context) -> pb.AttachResponse:
        cache_id = convert.required_id("cache_id", request.cache_id)
        info, handle = await self._engine.attach(cache_id, holder_of(context))
        return pb.AttachResponse(cache=convert.cache_message(info), handle=convert.handle_message(handle))

    @_translate_errors
    async def Pin(self, request: pb.PinRequest, context) -> pb.PinResponse:
        cache_id = convert.required_id("cache_id", request.cache_id)
        info, handle = await self._engine.pin(cache_id, holder_of(context))
        return pb.PinResponse(cache=convert.cache_message(info), handle=convert.handle_message(handle))

    @_translate_errors
    async def Unpin(self, request: pb.UnpinRequest, context) -> pb.UnpinResponse:
        cache_id = convert.required_id("cache_id", request.cache_id)
        info = await self._engine.unpin(cache_id, holder_of(context))
        return pb.UnpinResponse(cache=convert.cache_message(info))

    @_translate_errors
    async def Stats(self, request: pb.StatsRequest, context) -> pb.StatsResponse:
        return convert.stats_message(self._engine.stats(), self._engine.status())

    @_translate_errors
    async def ListCaches(self, request: pb.ListCachesRequest, context) -> pb.ListCachesResponse:
        if request.page_size > MAX_PAGE_SIZE:
            raise convert.InvalidArgument("page_size", f"must be at most {MAX_PAGE_SIZE}")
        # The token is the last id served: pages stay consistent while caches come and go.
        page = self._engine.list_caches(
            pool=request.pool or None,
            model_name=request.model_name or None,
            state=convert.cache_state(request.state),
            after=request.page_token,
            limit=request.page_size or DEFAULT_PAGE_SIZE,
        )
        return pb.ListCachesResponse(
            caches=[convert.cache_message(c) for c in page.caches], next_page_token=page.next_page_token
        )

    async def Watch(self, request: pb.WatchRequest, context) -> AsyncIterator[pb.WatchEvent]:
        """Open the caller's session and stream its events until the stream breaks (the
        session then ends at once: a killed client is reclaimed in milliseconds) or the
        broker ends the session (SESSION_ENDED, then the stream ends)."""
        try:
            session_id = holder_of(context) or _valid_session_id(request.session_id or "")
            events = self._engine.session_events(
                session_id, client_name=request.client_name[:128], pid=request.pid, host=request.host[:256]
            )
            opened = await anext(events)
        except BrokerError as err:
            await context.abort(convert.status_for(err), convert.error_details(err))
        async with contextlib.aclosing(events):
            yield convert.session_event_message(opened)
            async for event in events:
                yield convert.session_event_message(event)

    @_translate_errors
    async def Heartbeat(self, request: pb.HeartbeatRequest, context) -> pb.HeartbeatResponse:
        holder = holder_of(context)
        if not holder:
            raise convert.InvalidArgument(SESSION_ID_KEY, "is required to heartbeat a session")
        return pb.HeartbeatResponse(lease_seconds=self._engine.heartbeat(holder))

    @_translate_errors
    async def ReportUnmapped(self, request: pb.ReportUnmappedRequest, context) -> pb.ReportUnmappedResponse:
        holder = holder_of(context)
        if not holder:
            raise convert.InvalidArgument(SESSION_ID_KEY, "is required to report an unmapping")
        if not request.segment_id:
            raise convert.InvalidArgument("segment_id", "is required")
        await self._engine.report_unmapped(request.segment_id, request.segment_generation, holder)
        return pb.ReportUnmappedResponse()

    @_translate_errors
    async def Defragment(self, request: pb.DefragmentRequest, context) -> pb.DefragmentResponse:
        result = await self._engine.defragment(
            device=request.device or None, pool=request.pool or None, dry_run=request.dry_run
        )
        return convert.defragment_message(result)
