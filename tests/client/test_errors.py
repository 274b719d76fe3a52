"""The client's error table: every gRPC status becomes one typed exception that keeps the
broker's message and code, for hand-made errors and for real ones off the wire."""

from __future__ import annotations

import asyncio
import socket
import traceback

import grpc
import pytest

from kvbroker_client import (
    AllocationTimeout,
    AsyncBrokerClient,
    BrokerClient,
    BrokerUnavailable,
    CacheAlreadyExists,
    CacheEvicted,
    CacheExhausted,
    CacheNotFound,
    InvalidRequest,
    KvBrokerError,
    NotAuthenticated,
    PermissionDenied,
    PreconditionFailed,
    UnexpectedBrokerError,
)
from kvbroker_client.errors import STATUS_TO_ERROR, from_rpc_error


class FakeRpcError(grpc.RpcError):
    """What the stubs raise, reduced to the two methods the mapping reads."""

    def __init__(self, code: grpc.StatusCode, details: str | None) -> None:
        super().__init__(details)
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str | None:
        return self._details


EXPECTED = [
    (grpc.StatusCode.RESOURCE_EXHAUSTED, "pool 'default' cannot place the cache now", CacheExhausted),
    (grpc.StatusCode.NOT_FOUND, "cache 'kv-1' does not exist", CacheNotFound),
    (grpc.StatusCode.ALREADY_EXISTS, "cache 'kv-1' already exists", CacheAlreadyExists),
    (grpc.StatusCode.INVALID_ARGUMENT, "size_bytes: must be > 0", InvalidRequest),
    (grpc.StatusCode.FAILED_PRECONDITION, "cache 'kv-1' was evicted", CacheEvicted),
    (grpc.StatusCode.FAILED_PRECONDITION, "cache 'kv-1' is not pinned by this caller", PreconditionFailed),
    (grpc.StatusCode.DEADLINE_EXCEEDED, "no room within wait_timeout_ms=300", AllocationTimeout),
    (grpc.StatusCode.UNAVAILABLE, "failed to connect to all addresses", BrokerUnavailable),
    (grpc.StatusCode.INTERNAL, "internal error in Allocate; see the daemon log", UnexpectedBrokerError),
    (grpc.StatusCode.UNKNOWN, "boom", UnexpectedBrokerError),
    (grpc.StatusCode.UNIMPLEMENTED, "Method not found!", UnexpectedBrokerError),
    (grpc.StatusCode.CANCELLED, "Cancelled", UnexpectedBrokerError),
    (grpc.StatusCode.PERMISSION_DENIED, "principal 'a' may not allocate on pool 'b'", PermissionDenied),
    (grpc.StatusCode.UNAUTHENTICATED, "the bearer token matches no principal", NotAuthenticated),
]


@pytest.mark.parametrize(("code", "message", "cls"), EXPECTED, ids=lambda v: getattr(v, "name", None))
def test_each_status_maps_to_its_class_and_keeps_message_and_code(code, message, cls) -> None:
    err = from_rpc_error(FakeRpcError(code, message))
    assert type(err) is cls
    assert isinstance(err, KvBrokerError)
    assert err.code is code
    assert err.message == message
    assert str(err) == message


def test_every_status_code_is_mapped_to_some_broker_error() -> None:
    for code in grpc.StatusCode:
        if code is grpc.StatusCode.OK:
            continue
        err = from_rpc_error(FakeRpcError(code, "m"))
        assert isinstance(err, STATUS_TO_ERROR.get(code, UnexpectedBrokerError))
        assert err.code is code


def test_evicted_is_a_precondition_failure_and_matched_case_insensitively() -> None:
    err = from_rpc_error(FakeRpcError(grpc.StatusCode.FAILED_PRECONDITION, "Cache X was EVICTED by policy lru"))
    assert isinstance(err, CacheEvicted)
    assert isinstance(err, PreconditionFailed)
    other = from_rpc_error(FakeRpcError(grpc.StatusCode.FAILED_PRECONDITION, "pinned by 1 other holder(s)"))
    assert not isinstance(other, CacheEvicted)


def test_builtin_bases_keep_generic_handlers_working() -> None:
    assert issubclass(InvalidRequest, ValueError)
    assert issubclass(CacheNotFound, LookupError)
    assert issubclass(AllocationTimeout, TimeoutError)
    assert issubclass(BrokerUnavailable, ConnectionError)


def test_unavailable_names_the_target_and_keeps_the_details() -> None:
    err = from_rpc_error(FakeRpcError(grpc.StatusCode.UNAVAILABLE, "connection refused"), target="unix:///x.sock")
    assert err.message == "cannot reach kvbroker at unix:///x.sock: connection refused"


def test_missing_details_fall_back_to_the_code_name() -> None:
    err = from_rpc_error(FakeRpcError(grpc.StatusCode.NOT_FOUND, None))
    assert isinstance(err, CacheNotFound)
    assert err.message == "NOT_FOUND"


def test_local_errors_carry_the_status_the_broker_would_use() -> None:
    assert InvalidRequest("dtype: nope").code is grpc.StatusCode.INVALID_ARGUMENT
    assert CacheEvicted("gone").code is grpc.StatusCode.FAILED_PRECONDITION
    assert repr(CacheExhausted("full")) == "CacheExhausted('full', code=RESOURCE_EXHAUSTED)"


# -- off the wire -------------------------------------------------------------------------

WIRE_CODES = sorted({code for code, _, _ in EXPECTED} - {grpc.StatusCode.FAILED_PRECONDITION}, key=str)


@pytest.mark.parametrize("code", WIRE_CODES, ids=lambda c: c.name)
def test_sync_client_raises_the_typed_error_for_a_real_status(fake_broker, code) -> None:
    with BrokerClient(fake_broker.target) as client:
        with pytest.raises(KvBrokerError) as info:
            client.attach(f"abort:{code.name}")
    assert type(info.value) is dict((c, k) for c, _, k in EXPECTED)[code]
    assert info.value.code is code
    assert f"scripted {code.name} for abort:{code.name}" in info.value.message
    assert isinstance(info.value.rpc_error, grpc.RpcError)
    assert info.value.rpc_error.code() is code


def printed(err: BaseException) -> str:
    """The traceback Python prints for ``err`` when nothing catches it."""
    return "".join(traceback.format_exception(err))


def assert_ends_at_the_typed_error(err: KvBrokerError) -> None:
    """One exception in the printed traceback, the typed one; gRPC's error only as an
    attribute (issue 10, defect 4: a chained ``_InactiveRpcError`` came first)."""
    text = printed(err)
    assert "_InactiveRpcError" not in text and "AioRpcError" not in text, text
    assert "During handling of the above exception" not in text, text
    assert "direct cause" not in text, text
    assert text.rstrip().splitlines()[-1].startswith(f"kvbroker_client.errors.{type(err).__name__}: "), text
    assert err.__cause__ is None and err.__suppress_context__
    assert isinstance(err.rpc_error, grpc.RpcError)


def test_a_failed_call_prints_only_the_typed_error(fake_broker) -> None:
    with BrokerClient(fake_broker.target) as client:
        with pytest.raises(CacheExhausted) as info:
            client.attach("abort:RESOURCE_EXHAUSTED")
    assert_ends_at_the_typed_error(info.value)


def test_a_failed_async_call_prints_only_the_typed_error(fake_broker) -> None:
    async def attach() -> None:
        async with AsyncBrokerClient(fake_broker.target) as client:
            await client.attach("abort:NOT_FOUND")

    with pytest.raises(CacheNotFound) as info:
        asyncio.run(attach())
    assert_ends_at_the_typed_error(info.value)


def test_errors_raised_locally_have_no_rpc_error() -> None:
    assert InvalidRequest("dtype: nope").rpc_error is None


def test_async_client_raises_the_typed_error_for_a_real_status(fake_broker) -> None:
    async def attach(cache_id: str) -> None:
        async with AsyncBrokerClient(fake_broker.target) as client:
            await client.attach(cache_id)

    with pytest.raises(CacheNotFound, match="scripted NOT_FOUND"):
        asyncio.run(attach("abort:NOT_FOUND"))
    with pytest.raises(CacheExhausted):
        asyncio.run(attach("abort:RESOURCE_EXHAUSTED"))


def test_unreachable_broker_is_unavailable_and_names_the_target() -> None:
    with socket.socket() as s:  # a port nobody listens on once the socket is closed
        s.bind(("127.0.0.1", 0))
        target = f"127.0.0.1:{s.getsockname()[1]}"
    with BrokerClient(target, timeout_s=5) as client:
        with pytest.raises(BrokerUnavailable) as info:
            client.stats()
    assert info.value.code is grpc.StatusCode.UNAVAILABLE
    assert info.value.message.startswith(f"cannot reach kvbroker at {target}: ")
