"""What a client call is on the wire: the target and channel options, the deadline,
``Call``, and the request builders that validate what a user passes before anything is
sent.

Pure functions and constants (no I/O, no torch): the core's plans use them, and tools may
build the same requests (``allocate_request``) to send through a raw stub. Validation
errors are ``InvalidRequest`` whose message starts with the field, as the broker's do.
"""

from __future__ import annotations

import operator
import os
import uuid
from collections.abc import Callable, Generator, Sequence
from typing import Any, NamedTuple, TypeAlias, TypeVar

from kvbroker.v1 import broker_pb2 as pb
from kvbroker_client.dtypes import DTypeLike, to_proto_dtype
from kvbroker_client.errors import InvalidRequest
from kvbroker_client.units import PriorityLike, SizeLike, priority_value, request_bytes

__all__ = [
    "CHANNEL_OPTIONS", "DEFAULT_TARGET", "DEFAULT_TIMEOUT_S", "TARGET_ENV", "Call", "Plan",
    "allocate_request", "channel_options", "list_caches_request", "new_session_id", "resolve_target",
]  # fmt: skip

#: The daemon's default TCP address (``kvbroker serve --listen``); the CLI uses it too.
DEFAULT_TARGET = "127.0.0.1:50051"
#: Environment variable naming the target when none is given (client and CLI alike).
TARGET_ENV = "KVBROKER_TARGET"
#: Deadline of one call; an allocation that may wait gets its ``wait_timeout_ms`` on top.
DEFAULT_TIMEOUT_S = 10.0
#: Reconnection pacing of the channel: grpc's default backs off to 120 s, which would
#: leave a client unable to reach a restarted broker for minutes. (Not
#: ``grpc.min_reconnect_backoff_ms``: it is also the connection attempt's timeout, 20 s
#: by default, and a short one fails handshakes with a busy broker.)
CHANNEL_OPTIONS: tuple[tuple[str, Any], ...] = (
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2000),
)


def channel_options(options: Sequence[tuple[str, Any]]) -> list[tuple[str, Any]]:
    """``CHANNEL_OPTIONS`` under the caller's options (the caller's win)."""
    given = {key for key, _ in options}
    return [option for option in CHANNEL_OPTIONS if option[0] not in given] + list(options)


def resolve_target(target: str | None) -> str:
    """``target``, else ``$KVBROKER_TARGET``, else ``DEFAULT_TARGET``."""
    return target or os.environ.get(TARGET_ENV) or DEFAULT_TARGET


def new_session_id() -> str:
    """A fresh holder id for this process's client (the broker's id alphabet)."""
    return f"py-{os.getpid()}-{uuid.uuid4().hex[:16]}"


T = TypeVar("T")
#: An operation of the core: yields ``Call``s, receives their responses, returns a T.
Plan: TypeAlias = Generator["Call", Any, T]
_STATE_BY_NAME = {"resident": pb.CACHE_STATE_RESIDENT, "evicted": pb.CACHE_STATE_EVICTED}


class Call(NamedTuple):
    """One RPC a plan asks for: ``getattr(stub, method)(request, timeout=, metadata=)``.
    ``generation`` is the session it is made for: a response to a call of an ended
    session must not make a record live."""

    method: str
    request: Any
    metadata: tuple[tuple[str, str], ...]
    timeout: float | None
    generation: int


def _checked(field: str, convert: Callable[[Any], Any], value: Any) -> Any:
    try:
        return convert(value)
    except (TypeError, ValueError) as err:
        raise InvalidRequest(f"{field}: {err}") from None


def allocate_request(
    pool: str = "default", *, size_bytes: int | None = None, dtype: DTypeLike | None = None,
    shape: Sequence[int] | None = None, cache_id: str = "", model_name: str = "",
    priority: PriorityLike = None, pinned: bool = False, retain: bool = False, device: str = "",
    wait_timeout_ms: int = 0, size: SizeLike | None = None, size_mb: float | None = None,
    size_gb: float | None = None,
) -> pb.AllocateRequest:  # fmt: skip
    """Build an ``AllocateRequest``; the broker checks the rest and names the field.

    The size is one of ``size_bytes``, ``size`` (bytes, or a string such as
    ``"512MiB"``), ``size_mb`` or ``size_gb`` (mebibytes, gibibytes); ``priority`` an
    integer or ``"low"``/``"normal"``/``"high"`` (``kvbroker_client/units.py``).

    Raises:
        InvalidRequest: a value the wire cannot carry (a negative size, two sizes, an
            unknown dtype or priority name, a non-integer dimension); the message starts
            with the field.
    """
    size_bytes = request_bytes(size_bytes, size, size_mb, size_gb)
    priority = priority_value(priority)
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
