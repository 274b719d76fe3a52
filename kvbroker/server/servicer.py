"""The gRPC adapter of ``kvbroker.v1.CacheBroker``: decode, one engine call, encode.

No state and no policy live here: a method that needs more than decode/call/encode is
missing a piece in the engine or the core. Domain errors become status codes through
``convert.status_for`` (one table) with capped details (``convert.error_details``);
anything else is a bug, logged with its traceback and answered with INTERNAL, so one
bad request never takes the daemon down. Request bytes that do not parse never reach
these methods (``kvbroker.server.registration`` answers them INVALID_ARGUMENT).

Who the caller is and what it may do is the ``Gate``'s (``kvbroker.server.gate``): each
method asks it once, then translates.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import grpc

from kvbroker.core.errors import BrokerError
from kvbroker.engine import Engine
from kvbroker.engine.paged import PagedPools
from kvbroker.security import Action
from kvbroker.server import convert
from kvbroker.server.errorlog import RecentErrors
from kvbroker.server.gate import Gate
from kvbroker.server.pagedservice import PagedService
from kvbroker.v1 import broker_pb2 as pb
from kvbroker.v1 import broker_pb2_grpc
from kvbroker.wire import SESSION_SECRET_KEY

log = logging.getLogger(__name__)

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000

Response = TypeVar("Response")


def _translate_errors(
    method: Callable[..., Awaitable[Response]],
) -> Callable[..., Awaitable[Response]]:
    """Answer domain errors with their status code and bugs with INTERNAL; either is
    kept in the recent errors (``kvbroker.server.errorlog``)."""

    @functools.wraps(method)
    async def wrapper(self, request, context: grpc.aio.ServicerContext) -> Response:
        try:
            return await method(self, request, context)
        except BrokerError as err:
            code, details = convert.status_for(err), convert.error_details(err)
        except grpc.aio.AbortError:
            raise
        except Exception:
            log.exception("internal error in %s", method.__name__)
            code, details = grpc.StatusCode.INTERNAL, f"internal error in {method.__name__}; see the daemon log"
        self.errors.add(method.__name__, code.name, details)
        await context.abort(code, details)

    return wrapper


class CacheBrokerServicer(PagedService, broker_pb2_grpc.CacheBrokerServicer):
    def __init__(self, engine: Engine, gate: Gate | None = None, errors: RecentErrors | None = None,
                 paged: PagedPools | None = None) -> None:  # fmt: skip
        self._engine = engine
        self._gate = gate or Gate(engine)
        self.errors = errors if errors is not None else RecentErrors()
        self._paged = paged

    @_translate_errors
    async def Allocate(self, request: pb.AllocateRequest, context) -> pb.AllocateResponse:
        caller = await self._gate.caller(context)
        core_request, wait_s = convert.allocation_request(request, caller.holder)
        self._gate.on_pool(caller, Action.ALLOCATE, core_request.pool)
        info, handle = await self._engine.allocate(core_request, wait_timeout_s=wait_s)
        return pb.AllocateResponse(cache=convert.cache_message(info), handle=convert.handle_message(handle))

    @_translate_errors
    async def Release(self, request: pb.ReleaseRequest, context) -> pb.ReleaseResponse:
        caller = await self._gate.caller(context)
        cache_id = convert.required_id("cache_id", request.cache_id)
        self._gate.on_cache(caller, Action.RELEASE, cache_id, force=request.force)
        freed = await self._engine.release(cache_id, caller.holder, force=request.force)
        return pb.ReleaseResponse(freed=freed)

    @_translate_errors
    async def Attach(self, request: pb.AttachRequest, context) -> pb.AttachResponse:
        caller = await self._gate.caller(context)
        cache_id = convert.required_id("cache_id", request.cache_id)
        self._gate.on_cache(caller, Action.ATTACH, cache_id)
        wait_s = convert.wait_seconds(request.wait_timeout_ms)
        info, handle = await self._engine.attach(cache_id, caller.holder, wait_timeout_s=wait_s)
        return pb.AttachResponse(cache=convert.cache_message(info), handle=convert.handle_message(handle))

    @_translate_errors
    async def Pin(self, request: pb.PinRequest, context) -> pb.PinResponse:
        caller = await self._gate.caller(context)
        cache_id = convert.required_id("cache_id", request.cache_id)
        self._gate.on_cache(caller, Action.ATTACH, cache_id)
        info, handle = await self._engine.pin(cache_id, caller.holder)
        return pb.PinResponse(cache=convert.cache_message(info), handle=convert.handle_message(handle))

    @_translate_errors
    async def Unpin(self, request: pb.UnpinRequest, context) -> pb.UnpinResponse:
        caller = await self._gate.caller(context)
        cache_id = convert.required_id("cache_id", request.cache_id)
        self._gate.on_cache(caller, Action.ATTACH, cache_id)
        info = await self._engine.unpin(cache_id, caller.holder)
        return pb.UnpinResponse(cache=convert.cache_message(info))

    @_translate_errors
    async def Stats(self, request: pb.StatsRequest, context) -> pb.StatsResponse:
        await self._gate.caller(context)  # any authenticated principal: no cache ids
        response = convert.stats_message(self._engine.stats(), self._engine.status())
        response.paged_pools.extend(self._paged_stats())
        return self.errors.fill(response)

    @_translate_errors
    async def ListCaches(self, request: pb.ListCachesRequest, context) -> pb.ListCachesResponse:
        caller = await self._gate.caller(context)
        if request.page_size > MAX_PAGE_SIZE:
            raise convert.InvalidArgument("page_size", f"must be at most {MAX_PAGE_SIZE}")
        visible = self._gate.visible_pools(caller)
        if visible is not None and request.pool and request.pool not in visible:
            self._gate.operator(caller, Action.LIST)  # raises PERMISSION_DENIED
        # The token is the last id served: pages stay consistent while caches come and go.
        page = self._engine.list_caches(
            pool=request.pool or None,
            model_name=request.model_name or None,
            state=convert.cache_state(request.state),
            after=request.page_token,
            limit=request.page_size or DEFAULT_PAGE_SIZE,
        )
        caches = page.caches if visible is None else [c for c in page.caches if c.pool in visible]
        # Holder ids name other tenants' sessions: only for those who may list them all.
        holders = visible is None
        return pb.ListCachesResponse(
            caches=[convert.cache_message(c, holders=holders) for c in caches], next_page_token=page.next_page_token
        )

    async def Watch(self, request: pb.WatchRequest, context) -> AsyncIterator[pb.WatchEvent]:
        """Open the caller's session and stream its events until the stream breaks (the
        session then ends at once: a killed client is reclaimed in milliseconds) or the
        broker ends the session (SESSION_ENDED, then the stream ends)."""
        try:
            events = await self._open_session(request, context)
            opened = await anext(events)
        except BrokerError as err:
            code, details = convert.status_for(err), convert.error_details(err)
            self.errors.add("Watch", code.name, details)
            await context.abort(code, details)
        async with contextlib.aclosing(events):
            # The secret also travels in the initial metadata, as for a session that a
            # unary call opened: one place for a client to read it.
            await context.send_initial_metadata(((SESSION_SECRET_KEY, opened.secret),))
            yield convert.session_event_message(opened)
            async for event in events:
                yield convert.session_event_message(event)

    async def _open_session(self, request: pb.WatchRequest, context):
        """The session the Watch opens (``Gate.watcher`` says which, and who asks)."""
        who = self._gate.watcher(context, request.session_id)
        return self._engine.session_events(
            who.session_id, who.secret, client_name=request.client_name[:128], pid=request.pid,
            host=request.host[:256], principal=who.principal.name, peer=who.peer,
        )

    @_translate_errors
    async def Heartbeat(self, request: pb.HeartbeatRequest, context) -> pb.HeartbeatResponse:
        caller = await self._gate.caller(context, session_required="heartbeat a session")
        return pb.HeartbeatResponse(lease_seconds=self._engine.heartbeat(caller.holder))

    @_translate_errors
    async def ReportUnmapped(self, request: pb.ReportUnmappedRequest, context) -> pb.ReportUnmappedResponse:
        caller = await self._gate.caller(context, session_required="report an unmapping")
        if not request.segment_id:
            raise convert.InvalidArgument("segment_id", "is required")
        await self._engine.report_unmapped(request.segment_id, request.segment_generation, caller.holder)
        return pb.ReportUnmappedResponse()

    @_translate_errors
    async def Defragment(self, request: pb.DefragmentRequest, context) -> pb.DefragmentResponse:
        caller = await self._gate.caller(context)
        self._gate.operator(caller, Action.DEFRAGMENT)
        if self._paged is not None and request.pool in self._paged.specs:  # a paged pool: its blocks
            result = await self._paged.defragment(request.pool, dry_run=request.dry_run)
            return convert.defragment_message(result)
        result = await self._engine.defragment(
            device=request.device or None, pool=request.pool or None, dry_run=request.dry_run,
            target_bytes=request.target_bytes or None,
        )
        return convert.defragment_message(result)

    @_translate_errors
    async def Evict(self, request: pb.EvictRequest, context) -> pb.EvictResponse:
        caller = await self._gate.caller(context)
        self._gate.operator(caller, Action.FORCE_RELEASE)  # it frees caches other holders hold
        result = await self._engine.evict(
            convert.required_id("pool", request.pool), idle_only=request.idle_only,
            device=request.device or None, by=caller.principal.name,
        )  # fmt: skip
        return convert.evict_message(result)

    @_translate_errors
    async def SetPoolLimits(self, request: pb.SetPoolLimitsRequest, context) -> pb.SetPoolLimitsResponse:
        caller = await self._gate.caller(context)
        self._gate.operator(caller, Action.SET_LIMITS)
        pool = convert.required_id("pool", request.pool)
        change = await self._engine.set_pool_limits(
            pool, **convert.pool_limits(request), dry_run=request.dry_run, by=caller.principal.name
        )
        return convert.limits_message(pool, change)

    @_translate_errors
    async def Sessions(self, request: pb.SessionsRequest, context) -> pb.SessionsResponse:
        caller = await self._gate.caller(context)
        only = None if caller.principal.may(Action.LIST) else caller.principal.name
        return pb.SessionsResponse(sessions=[convert.session_message(v) for v in self._engine.sessions(only)])

    @_translate_errors
    async def Checkpoint(self, request: pb.CheckpointRequest, context) -> pb.CheckpointResponse:
        caller = await self._gate.caller(context)
        self._gate.operator(caller, Action.CHECKPOINT)
        checkpoints = self._engine.checkpoints
        if checkpoints is None:
            raise convert.FailedPrecondition("no pool is persistent: there is nothing to checkpoint")
        result = await checkpoints.checkpoint(f"requested by {caller.principal.name or 'an operator'}")
        return pb.CheckpointResponse(
            generation=result.generation, caches=result.caches, skipped=result.skipped,
            written_bytes=result.nbytes, duration_seconds=result.seconds, directory=checkpoints.store.directory,
        )  # fmt: skip

    @_translate_errors
    async def EndSessions(self, request: pb.EndSessionsRequest, context) -> pb.EndSessionsResponse:
        caller = await self._gate.caller(context)
        self._gate.operator(caller, Action.FORCE_RELEASE)  # it frees caches other sessions hold
        older_than, session_ids = convert.end_sessions_request(request)
        ended, freed = self._engine.end_sessions(older_than, session_ids, request.dry_run)
        if ended and not request.dry_run:
            log.info("%s ended %d sessions (older than %gs%s)", caller.principal.name, len(ended), older_than,
                     f", ids {sorted(session_ids)[:10]}" if session_ids else "")  # fmt: skip
        return pb.EndSessionsResponse(
            sessions=[convert.session_message(v) for v in ended], caches_freed=freed, dry_run=request.dry_run
        )

    # -- paged KV pools (kvbroker.server.pagedservice) ------------------------------------

    OpenPagedPool = _translate_errors(PagedService._open_paged_pool)
    AllocateSequence = _translate_errors(PagedService._allocate_sequence)
    ExtendSequence = _translate_errors(PagedService._extend_sequence)
    FreeSequence = _translate_errors(PagedService._free_sequence)
    AttachSequence = _translate_errors(PagedService._attach_sequence)
    PinSequence = _translate_errors(PagedService._pin_sequence)
    BlockMap = _translate_errors(PagedService._block_map)
