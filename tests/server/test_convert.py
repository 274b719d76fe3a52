"""Wire translation: size rules, field-named errors and the one status table."""

from __future__ import annotations

import grpc

from kvbroker.persistence import BudgetExceeded, DiskFull, PersistenceError
from kvbroker.security import PermissionDenied, Unauthenticated
import pytest

from kvbroker.core import errors
from kvbroker.core.paged import OutOfTokens
from kvbroker.core.types import CacheState
from kvbroker.server import convert
from kvbroker.v1 import broker_pb2 as pb


def test_every_domain_error_has_a_status_code():
    expected = {
        errors.InvalidArgument("f", "x"): grpc.StatusCode.INVALID_ARGUMENT,
        errors.NotFound("x"): grpc.StatusCode.NOT_FOUND,
        errors.AlreadyExists("x"): grpc.StatusCode.ALREADY_EXISTS,
        errors.ResourceExhausted(
            "x", requested_bytes=1, free_bytes=0, largest_free_extent_bytes=0, satisfiable=True
        ): grpc.StatusCode.RESOURCE_EXHAUSTED,
        errors.FailedPrecondition("x"): grpc.StatusCode.FAILED_PRECONDITION,
        errors.DeadlineExceeded("x"): grpc.StatusCode.DEADLINE_EXCEEDED,
        Unauthenticated("x"): grpc.StatusCode.UNAUTHENTICATED,
        PermissionDenied("x"): grpc.StatusCode.PERMISSION_DENIED,
        PersistenceError("x"): grpc.StatusCode.ABORTED,
        BudgetExceeded("x"): grpc.StatusCode.RESOURCE_EXHAUSTED,
        DiskFull("x"): grpc.StatusCode.RESOURCE_EXHAUSTED,
        OutOfTokens("x", tokens_requested=32, tokens_free=16): grpc.StatusCode.RESOURCE_EXHAUSTED,
    }
    for err, code in expected.items():
        assert convert.status_for(err) is code
    assert set(convert.STATUS_FOR_ERROR) == {type(e) for e in expected}
    assert convert.status_for(errors.BrokerError("bug")) is grpc.StatusCode.INTERNAL


def test_size_from_dtype_and_shape():
    msg = pb.AllocateRequest(pool="p", dtype=pb.DTYPE_FLOAT16, shape=[2, 3, 4])
    request, wait_s = convert.allocation_request(msg, "holder")
    assert (request.nbytes, request.dtype, request.shape, request.holder) == (48, "float16", (2, 3, 4), "holder")
    assert wait_s == 0


def test_optional_fields_mean_unset():
    request, _ = convert.allocation_request(pb.AllocateRequest(pool="p", size_bytes=10), "")
    assert (request.cache_id, request.priority, request.device_hint) == (None, None, None)
    request, wait_s = convert.allocation_request(
        pb.AllocateRequest(pool="p", size_bytes=10, priority=0, device="host", wait_timeout_ms=1500), ""
    )
    assert (request.priority, request.device_hint, wait_s) == (0, "host", 1.5)


@pytest.mark.parametrize(
    "msg, field",
    [
        (pb.AllocateRequest(pool="p", shape=[2, 2]), "dtype"),
        (pb.AllocateRequest(pool="p", dtype=pb.DTYPE_FLOAT32, shape=[2, 0]), "shape"),
        (pb.AllocateRequest(pool="p", dtype=pb.DTYPE_FLOAT32, shape=[2, -3]), "shape"),
        (pb.AllocateRequest(pool="p", dtype=pb.DTYPE_FLOAT32, shape=[1] * 17), "shape"),
        (pb.AllocateRequest(pool="p", dtype=pb.DTYPE_FLOAT32, shape=[4], size_bytes=15), "size_bytes"),
        (pb.AllocateRequest(pool="p", dtype=pb.DTYPE_FLOAT32, size_bytes=6), "size_bytes"),
        (pb.AllocateRequest(pool="p", dtype=99, size_bytes=8), "dtype"),
        (pb.AllocateRequest(pool="p", size_bytes=8, wait_timeout_ms=4_000_000_000), "wait_timeout_ms"),
    ],
)
def test_bad_fields_are_named(msg, field):
    with pytest.raises(errors.InvalidArgument) as info:
        convert.allocation_request(msg, "")
    assert info.value.field == field


def test_state_filter():
    assert convert.cache_state(pb.CACHE_STATE_UNSPECIFIED) is None
    assert convert.cache_state(pb.CACHE_STATE_EVICTED) is CacheState.EVICTED
    with pytest.raises(errors.InvalidArgument, match="state"):
        convert.cache_state(42)


def test_pending_caches_have_a_wire_state():
    assert convert.cache_state(pb.CACHE_STATE_PENDING) is CacheState.PENDING
    assert convert._STATE_TO_PB[CacheState.PENDING] == pb.CACHE_STATE_PENDING
    assert set(convert._STATE_TO_PB) == set(CacheState)


def test_dtypes_come_from_the_wire_table():
    from kvbroker import wire

    for dtype in wire.DTYPES:
        request, _ = convert.allocation_request(pb.AllocateRequest(pool="p", dtype=dtype.value, shape=[3]), "")
        assert (request.dtype, request.nbytes) == (dtype.name, 3 * dtype.itemsize)
        assert convert._dtype_value(dtype.name) == dtype.value
    assert not hasattr(convert, "DTYPES"), "one table: kvbroker.wire.DTYPES"


def test_error_details_are_capped_per_field():
    err = errors.InvalidArgument("model_name", "x" * 10_000)
    details = convert.error_details(err)
    assert details.startswith("model_name: " + "x" * 200) and details.endswith("(9800 more characters)")
    assert convert.error_details(errors.NotFound("short")) == "short"
    assert len(convert.error_details(errors.NotFound("y" * 100_000))) < convert.MAX_MESSAGE_CHARS + 40


def test_host_handles_name_their_directory():
    from kvbroker.core import SegmentInfo
    from kvbroker.engine import CacheHandle
    from kvbroker.memory.backend import HostHandle

    segment = SegmentInfo(1, 1, "p", "host", 4096)
    backend = HostHandle("kvb-1-x-1-1", 4096, 1, 2, "/dev/shm/private")
    msg = convert.handle_message(CacheHandle("x", 1, segment, backend, 0, 10, 0))
    assert msg.host.shm_dir == "/dev/shm/private"


def test_session_events_on_the_wire():
    from kvbroker.engine import SessionEnded, SessionOpened
    from kvbroker.wire import SessionEndReason

    opened = convert.session_event_message(SessionOpened("s", 10.0, "i"))
    assert (opened.kind, opened.session_id, opened.lease_seconds, opened.instance_id) == (
        pb.EVENT_KIND_SESSION_OPENED, "s", 10.0, "i",
    )  # fmt: skip
    ended = convert.session_event_message(SessionEnded(SessionEndReason.LEASE_EXPIRED))
    assert (ended.kind, ended.reason) == (pb.EVENT_KIND_SESSION_ENDED, "lease_expired")
