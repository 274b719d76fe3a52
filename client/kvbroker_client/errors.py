"""Typed exceptions of the client stub, one per gRPC status the broker answers with.

A model worker should be able to write ``except CacheExhausted:`` instead of comparing
status codes, so every failed RPC is turned into one of these by ``from_rpc_error``, through
one table (``STATUS_TO_ERROR``). The server's message travels verbatim in ``str(err)``: it
names the field or the object at fault and, for ``RESOURCE_EXHAUSTED``, the requested,
free and largest free bytes.

A traceback ends at the typed error: the ``grpc.RpcError`` it came from is kept as
``err.rpc_error`` (for its trailing metadata or debug string), not chained, so a worker
that dies of ``CacheExhausted`` prints one exception, not gRPC's ``_InactiveRpcError``
followed by "During handling of the above exception, another exception occurred".

Some classes also derive from the matching built-in exception (``InvalidRequest`` is a
``ValueError``, ``CacheNotFound`` a ``LookupError``, ``AllocationTimeout`` a
``TimeoutError``, ``BrokerUnavailable`` a ``ConnectionError``), so generic handlers keep
working. The stub raises the same classes for misuse it detects before sending anything
(an unknown dtype name, a released cache), with the status the broker would have used.
"""

from __future__ import annotations

import grpc

__all__ = [
    "STATUS_TO_ERROR",
    "AllocationTimeout",
    "BrokerUnavailable",
    "CacheAlreadyExists",
    "CacheLost",
    "CacheEvicted",
    "CacheExhausted",
    "CacheNotFound",
    "InvalidRequest",
    "KvBrokerError",
    "PreconditionFailed",
    "SessionLost",
    "UnexpectedBrokerError",
    "from_rpc_error",
]


class KvBrokerError(Exception):
    """Base of every error the client stub raises on the broker's behalf.

    Attributes:
        message: the broker's message (or the stub's, for misuse caught locally).
        code: the gRPC status code the broker answered with; for an error raised locally,
            the code the broker would have used.
        rpc_error: the ``grpc.RpcError`` of the failed call (``from_rpc_error``), or
            None for an error raised locally.
    """

    #: The status this class stands for; instances may carry another (see the fallback).
    default_code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code if code is not None else self.default_code
        self.rpc_error: grpc.RpcError | None = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r}, code={self.code.name})"


class CacheExhausted(KvBrokerError):
    """No room for the cache, even after reclaiming, compacting, evicting and waiting
    ``wait_timeout_ms`` (RESOURCE_EXHAUSTED). Retry later, ask for less, or raise the
    pool's quota."""

    default_code = grpc.StatusCode.RESOURCE_EXHAUSTED


class CacheNotFound(KvBrokerError, LookupError):
    """An unknown cache id, pool or device (NOT_FOUND)."""

    default_code = grpc.StatusCode.NOT_FOUND


class CacheAlreadyExists(KvBrokerError):
    """The requested ``cache_id`` is already in use (ALREADY_EXISTS); ``attach`` it instead."""

    default_code = grpc.StatusCode.ALREADY_EXISTS


class InvalidRequest(KvBrokerError, ValueError):
    """A malformed request; the message names the field (INVALID_ARGUMENT)."""

    default_code = grpc.StatusCode.INVALID_ARGUMENT


class PreconditionFailed(KvBrokerError):
    """The object exists but is in the wrong state, e.g. unpinning a cache this caller
    has not pinned, or force-releasing one that another holder pins (FAILED_PRECONDITION)."""

    default_code = grpc.StatusCode.FAILED_PRECONDITION


class CacheEvicted(PreconditionFailed):
    """The cache was evicted: its bytes are gone and it must be allocated again
    (FAILED_PRECONDITION whose message says so). A ``PreconditionFailed``, so handlers of
    the wider class also see it."""


class SessionLost(PreconditionFailed):
    """The broker session this cache was held under is over (FAILED_PRECONDITION, raised
    by the stub itself): its lease lapsed, the broker stopped or restarted, or the Watch
    stream broke. The broker dropped the session's holds and pins and freed its
    non-retained caches, so the bytes may already belong to another tenant; the stub
    therefore never builds another view of them, and re-maps the views it built to
    private memory. The client itself carries on under a new session. Raised as such
    while no new session is open yet; once one is, a cache that survived (retained, or
    restored by a restarted broker) is re-attached by its next ``tensor()``/``pin()``,
    and one that did not raises ``CacheLost`` (a subclass)."""


class CacheLost(SessionLost, CacheEvicted):
    """A cache this client held did not survive the end of its session (raised by the
    stub itself, on the cache's next use): the broker freed it when the session ended
    (it was not retained), or the broker restarted without it (it was not persistent),
    or its id now names another cache. Its bytes are gone for this client, and the views
    it built of them no longer reach the broker's memory (they were re-mapped to private
    memory: kvbroker_client/revoke.py). Allocate it again.

    Both a ``SessionLost`` and a ``CacheEvicted``, so handlers of either see it. A cache
    that did survive (retained, or persistent across a restart) is re-attached instead,
    with the same id, by its next ``tensor()``/``pin()``/``refresh()``."""


class AllocationTimeout(KvBrokerError, TimeoutError):
    """The request's deadline passed: an allocation waited ``wait_timeout_ms`` without
    finding room, or the broker did not answer within the client's timeout
    (DEADLINE_EXCEEDED)."""

    default_code = grpc.StatusCode.DEADLINE_EXCEEDED


class BrokerUnavailable(KvBrokerError, ConnectionError):
    """The broker could not be reached, or is shutting down (UNAVAILABLE). The message
    names the target."""

    default_code = grpc.StatusCode.UNAVAILABLE


class NotAuthenticated(KvBrokerError, PermissionError):
    """The broker requires credentials this client did not present or that it does not
    know (UNAUTHENTICATED): a token, a client certificate, or a Unix uid it authorizes;
    or a session's id without that session's secret."""

    default_code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(KvBrokerError, PermissionError):
    """The broker knows this client's principal, which may not do this (on this pool)
    (PERMISSION_DENIED)."""

    default_code = grpc.StatusCode.PERMISSION_DENIED


class UnexpectedBrokerError(KvBrokerError):
    """Any other status (INTERNAL, UNKNOWN, CANCELLED, UNIMPLEMENTED...): a bug in the
    broker or a version mismatch rather than misuse. ``code`` says which."""


#: The one table from status code to exception class; codes absent here become
#: ``UnexpectedBrokerError``. FAILED_PRECONDITION is refined by ``from_rpc_error``.
STATUS_TO_ERROR: dict[grpc.StatusCode, type[KvBrokerError]] = {
    grpc.StatusCode.RESOURCE_EXHAUSTED: CacheExhausted,
    grpc.StatusCode.NOT_FOUND: CacheNotFound,
    grpc.StatusCode.ALREADY_EXISTS: CacheAlreadyExists,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidRequest,
    grpc.StatusCode.FAILED_PRECONDITION: PreconditionFailed,
    grpc.StatusCode.DEADLINE_EXCEEDED: AllocationTimeout,
    grpc.StatusCode.UNAVAILABLE: BrokerUnavailable,
    grpc.StatusCode.UNAUTHENTICATED: NotAuthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
}


def from_rpc_error(err: grpc.RpcError, *, target: str | None = None) -> KvBrokerError:
    """Turn a failed call into the matching typed exception.

    Works for the sync stub's errors and for ``grpc.aio.AioRpcError`` alike (both expose
    ``code()`` and ``details()``).

    Args:
        err: the error raised by a stub call.
        target: the address that was dialled; when given, an UNAVAILABLE error says
            which broker could not be reached.

    Returns:
        The exception to raise (``raise from_rpc_error(err)``, in the ``except`` block or
        thrown into a generator), carrying the server's message and status code, with
        ``err`` as its ``rpc_error`` and its context suppressed: the traceback ends at it.
    """
    code_fn = getattr(err, "code", None)
    details_fn = getattr(err, "details", None)
    code = code_fn() if callable(code_fn) else None
    if not isinstance(code, grpc.StatusCode):
        code = grpc.StatusCode.UNKNOWN
    message = (details_fn() if callable(details_fn) else None) or code.name
    cls = STATUS_TO_ERROR.get(code, UnexpectedBrokerError)
    if cls is PreconditionFailed and "evicted" in message.lower():
        cls = CacheEvicted
    if cls is BrokerUnavailable and target:
        message = f"cannot reach kvbroker at {target}: {message}"
    error = cls(message, code)
    error.rpc_error = err
    # Raised while ``err`` is being handled, the typed error gets it as __context__;
    # the message already says everything gRPC's error would, so print only ours.
    error.__suppress_context__ = True
    return error
