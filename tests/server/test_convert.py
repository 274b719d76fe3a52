"""Wire translation: size rules, field-named errors and the one status table."""

from __future__ import annotations

import grpc
import pytest

from kvbroker.core import errors
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
