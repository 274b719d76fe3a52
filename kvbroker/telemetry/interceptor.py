"""A grpc.aio server interceptor: the duration and status of every RPC, and a server span
per unary RPC when tracing is on.

Why our own and not ``opentelemetry-instrumentation-grpc``: the duration histogram and
the error counts must be recorded whether or not tracing is on, so an interceptor is
needed anyway, and one interceptor doing both costs one wrapper per call instead of two.

Each method's handler is wrapped once and cached (the server's registered handlers are
fixed objects), so a call pays one ``continuation`` await, two clock reads and the
recorder's O(1) update. The status is read from the call's context after the handler
returns or raises: ``context.abort(code, ...)`` sets it, a handler that returns without
one is OK, a cancelled call is CANCELLED and any other exception is UNKNOWN (what grpc
itself answers).

Server spans follow the OpenTelemetry RPC conventions: name ``<service>/<method>``, kind
SERVER, ``rpc.system``, ``rpc.service``, ``rpc.method`` and ``rpc.grpc.status_code``; a
W3C ``traceparent`` in the request metadata makes the span a child of the caller's.
A status other than OK marks the span ERROR with the status details. Streaming RPCs
(``Watch`` lives as long as its session) are timed but get no span.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from kvbroker.telemetry.recorder import Recorder

_OK = "OK"


def _code_name(context: grpc.aio.ServicerContext, error: BaseException | None) -> str:
    code = context.code()
    if code is not None and code != grpc.StatusCode.OK:
        return code.name if isinstance(code, grpc.StatusCode) else grpc.StatusCode(code).name
    if error is None:
        return _OK
    return "CANCELLED" if isinstance(error, asyncio.CancelledError) else "UNKNOWN"


class TelemetryInterceptor(grpc.aio.ServerInterceptor):
    """Times every call into ``recorder``; opens server spans with ``tracer`` (or none)."""

    def __init__(self, recorder: Recorder, tracer: Any = None) -> None:
        self._recorder = recorder
        self._tracer = tracer
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        cached = self._wrapped.get(handler_call_details.method)
        if cached is None or cached[0] is not handler:
            cached = (handler, self._wrap(handler, handler_call_details.method))
            self._wrapped[handler_call_details.method] = cached
        return cached[1]

    def _wrap(self, handler: grpc.RpcMethodHandler, path: str) -> grpc.RpcMethodHandler:
        service, _, method = path.lstrip("/").rpartition("/")
        if handler.unary_unary is not None:
            if not inspect.iscoroutinefunction(handler.unary_unary):
                return handler  # a sync handler run in a thread: left alone
            return handler._replace(unary_unary=self._unary(handler.unary_unary, service, method))
        for kind in ("unary_stream", "stream_unary", "stream_stream"):
            behavior = getattr(handler, kind)
            if behavior is not None:
                return handler._replace(**{kind: self._timed(behavior, service, method)})
        return handler

    def _unary(self, behavior: Callable, service: str, method: str) -> Callable:
        recorder, tracer = self._recorder, self._tracer
        if tracer is None:

            async def timed(request: Any, context: grpc.aio.ServicerContext) -> Any:
                started = time.perf_counter()
                error = None
                try:
                    return await behavior(request, context)
                except BaseException as err:
                    error = err
                    raise
                finally:
                    recorder.rpc_finished(service, method, _code_name(context, error), time.perf_counter() - started)

            return timed

        from opentelemetry import propagate
        from opentelemetry.trace import SpanKind, Status, StatusCode

        name = f"{service}/{method}"
        attributes = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": method}

        async def traced(request: Any, context: grpc.aio.ServicerContext) -> Any:
            started = time.perf_counter()
            error = None
            parent = propagate.extract(dict(context.invocation_metadata() or ()))
            with tracer.start_as_current_span(
                name, context=parent, kind=SpanKind.SERVER, attributes=attributes,
                record_exception=False, set_status_on_exception=False,
            ) as span:  # fmt: skip
                try:
                    return await behavior(request, context)
                except BaseException as err:
                    error = err
                    raise
                finally:
                    code = _code_name(context, error)
                    recorder.rpc_finished(service, method, code, time.perf_counter() - started)
                    span.set_attribute("rpc.grpc.status_code", grpc.StatusCode[code].value[0])
                    if code != _OK:
                        span.set_status(Status(StatusCode.ERROR, f"{code}: {context.details() or ''}".rstrip(": ")))

        return traced

    def _timed(self, behavior: Callable, service: str, method: str) -> Callable:
        """Streaming handlers: the wrapper must be the same kind of function (async
        generator or coroutine) because grpc.aio dispatches on it."""
        recorder = self._recorder

        def finish(context: grpc.aio.ServicerContext, error: BaseException | None, started: float) -> None:
            recorder.rpc_finished(service, method, _code_name(context, error), time.perf_counter() - started)

        if inspect.isasyncgenfunction(behavior):

            async def timed_stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
                started = time.perf_counter()
                error = None
                try:
                    async for response in behavior(request, context):
                        yield response
                except BaseException as err:
                    error = err
                    raise
                finally:
                    finish(context, error, started)

            return timed_stream
        if inspect.iscoroutinefunction(behavior):

            async def timed_call(request: Any, context: grpc.aio.ServicerContext) -> Any:
                started = time.perf_counter()
                error = None
                try:
                    return await behavior(request, context)
                except BaseException as err:
                    error = err
                    raise
                finally:
                    finish(context, error, started)

            return timed_call
        return behavior  # a sync handler run in a thread: left alone
