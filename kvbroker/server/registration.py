"""Registering the CacheBroker service so that garbled request bytes get INVALID_ARGUMENT.

The generated ``add_CacheBrokerServicer_to_server`` deserializes with ``FromString``; a
``DecodeError`` there escapes into grpc, which answers UNKNOWN and logs an ERROR with a
traceback for every such request: one misbehaving client floods the log.
Here each method's deserializer catches the error and hands the handler a ``Garbled``
marker instead, and the handler aborts with INVALID_ARGUMENT naming the message type.
At most one log line per ``LOG_INTERVAL_S`` says how many were refused.

The handlers keep the generated ones' shape (unary or server-streaming, coroutine or
async generator), so interceptors (telemetry's) wrap them as before.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import grpc
from google.protobuf.message import DecodeError

from kvbroker.v1 import broker_pb2 as pb

log = logging.getLogger(__name__)

SERVICE = pb.DESCRIPTOR.services_by_name["CacheBroker"]
LOG_INTERVAL_S = 60.0


class Garbled(NamedTuple):
    """Stands for request bytes that are not a valid message of ``type_name``."""

    type_name: str
    error: str


class _RateLimitedLog:
    """One WARNING line per interval, counting what it did not print."""

    def __init__(self, interval_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._interval = interval_s
        self._clock = clock
        self._next = 0.0
        self.suppressed = 0

    def warning(self, message: str, *args: Any) -> None:
        now = self._clock()
        if now < self._next:
            self.suppressed += 1
            return
        self._next = now + self._interval
        suppressed, self.suppressed = self.suppressed, 0
        log.warning(message + " (%d more since the last such line)", *args, suppressed)


_garbled_log = _RateLimitedLog(LOG_INTERVAL_S)


def _deserializer(message_class: type) -> Callable[[bytes], Any]:
    from_string = message_class.FromString
    type_name = message_class.DESCRIPTOR.full_name

    def deserialize(data: bytes) -> Any:
        try:
            return from_string(data)
        except DecodeError as err:
            return Garbled(type_name, str(err))

    return deserialize


async def _refuse(garbled: Garbled, method: str, context: grpc.aio.ServicerContext) -> None:
    _garbled_log.warning("refused %s: the request is not a valid %s", method, garbled.type_name)
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"the request is not a valid {garbled.type_name} message")


def _unary(behavior: Callable, method: str) -> Callable:
    async def handle(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if type(request) is Garbled:
            await _refuse(request, method, context)
        return await behavior(request, context)

    return handle


def _server_stream(behavior: Callable, method: str) -> Callable:
    async def handle(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if type(request) is Garbled:
            await _refuse(request, method, context)
        async for response in behavior(request, context):
            yield response

    return handle


def add_cache_broker(servicer: Any, server: grpc.aio.Server) -> None:
    """Register every CacheBroker method of ``servicer`` on ``server``."""
    handlers = {}
    for method in SERVICE.methods:
        request_class = getattr(pb, method.input_type.name)
        response_class = getattr(pb, method.output_type.name)
        behavior = getattr(servicer, method.name)
        options = {
            "request_deserializer": _deserializer(request_class),
            "response_serializer": response_class.SerializeToString,
        }
        if method.client_streaming:
            raise NotImplementedError(f"client-streaming method {method.name} has no safe handler")
        if method.server_streaming:
            handlers[method.name] = grpc.unary_stream_rpc_method_handler(_server_stream(behavior, method.name), **options)
        else:
            handlers[method.name] = grpc.unary_unary_rpc_method_handler(_unary(behavior, method.name), **options)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE.full_name, handlers),))
    server.add_registered_method_handlers(SERVICE.full_name, handlers)
