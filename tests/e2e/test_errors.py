"""Bad requests get the right status code and a message naming the field; the daemon
stays up and its accounting stays exact. Out-of-memory refusals say which limit was hit,
with the figures Stats shows, and reach a worker as ``CacheExhausted``."""

from __future__ import annotations

import traceback

import grpc
import pytest

from kvbroker.core.errors import amount
from kvbroker.v1 import broker_pb2 as pb
from kvbroker.v1 import broker_pb2_grpc
from kvbroker_client import BrokerClient, CacheExhausted

MiB = 1 << 20
CODE = grpc.StatusCode


@pytest.fixture
def stub(daemon):
    with grpc.insecure_channel(daemon.target) as channel:
        yield broker_pb2_grpc.CacheBrokerStub(channel)


def status_of(call, request) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call(request)
    return info.value.code(), info.value.details()


CASES = [
    ("zero size", pb.AllocateRequest(pool="default"), CODE.INVALID_ARGUMENT, "size_bytes"),
    ("size above the device", pb.AllocateRequest(pool="default", size_bytes=1 << 40), CODE.RESOURCE_EXHAUSTED, "capacity of device 'host'"),
    ("size above the pool quota", pb.AllocateRequest(pool="small", size_bytes=32 * MiB), CODE.RESOURCE_EXHAUSTED, "quota"),
    ("unknown pool", pb.AllocateRequest(pool="nope", size_bytes=MiB), CODE.NOT_FOUND, "nope"),
    ("missing pool", pb.AllocateRequest(size_bytes=MiB), CODE.INVALID_ARGUMENT, "pool"),
    ("shape without dtype", pb.AllocateRequest(pool="default", shape=[4, 4]), CODE.INVALID_ARGUMENT, "dtype"),
    ("negative dimension", pb.AllocateRequest(pool="default", dtype=pb.DTYPE_FLOAT16, shape=[4, -4]), CODE.INVALID_ARGUMENT, "shape"),
    ("size disagrees with shape", pb.AllocateRequest(pool="default", dtype=pb.DTYPE_FLOAT16, shape=[4], size_bytes=9), CODE.INVALID_ARGUMENT, "size_bytes"),
    ("unknown dtype", pb.AllocateRequest(pool="default", dtype=77, size_bytes=MiB), CODE.INVALID_ARGUMENT, "dtype"),
    ("bad cache id", pb.AllocateRequest(pool="default", size_bytes=MiB, cache_id="has space"), CODE.INVALID_ARGUMENT, "cache_id"),
    ("overlong cache id", pb.AllocateRequest(pool="default", size_bytes=MiB, cache_id="x" * 200), CODE.INVALID_ARGUMENT, "cache_id"),
    ("non-printable model name", pb.AllocateRequest(pool="default", size_bytes=MiB, model_name="a\x00b"), CODE.INVALID_ARGUMENT, "model_name"),
    ("unknown device", pb.AllocateRequest(pool="default", size_bytes=MiB, device="GPU-none"), CODE.NOT_FOUND, "GPU-none"),
]


@pytest.mark.parametrize("name, request_, code, word", CASES, ids=[c[0] for c in CASES])
def test_allocate_errors(stub, name, request_, code, word):
    before = stub.Stats(pb.StatsRequest())
    got, details = status_of(stub.Allocate, request_)
    assert got == code, details
    assert word in details
    after = stub.Stats(pb.StatsRequest())
    assert (after.total_allocated_bytes, after.active_caches) == (before.total_allocated_bytes, before.active_caches)


def pool_stats(stub, name: str) -> pb.Usage:
    return next(p.usage for p in stub.Stats(pb.StatsRequest()).pools if p.pool == name)


def test_a_quota_refusal_names_max_bytes_and_the_free_bytes_stats_shows(stub):
    kept = stub.Allocate(pb.AllocateRequest(pool="small", size_bytes=4 * MiB)).cache.cache_id
    try:
        code, details = status_of(stub.Allocate, pb.AllocateRequest(pool="small", size_bytes=24 * MiB))
        usage = pool_stats(stub, "small")
        assert code == CODE.RESOURCE_EXHAUSTED
        assert "24 MiB (25165824 bytes)" in details and "max_bytes = 16 MiB (16777216 bytes)" in details
        assert usage.free_bytes == 12 * MiB and f"the pool has {amount(usage.free_bytes)} free" in details
    finally:
        stub.Release(pb.ReleaseRequest(cache_id=kept))


def test_a_request_above_the_device_is_cache_exhausted_at_once_and_prints_only_that(daemon):
    """RESOURCE_EXHAUSTED, never satisfiable: a worker that would wait a minute for room is
    told at once (had it waited, the call would end in AllocationTimeout instead), and
    its traceback is the typed error alone."""
    with BrokerClient(daemon.target) as client:
        with pytest.raises(CacheExhausted) as info:
            client.allocate("default", size_bytes=1 << 40, wait_timeout_ms=60_000)
    err = info.value
    assert "1 TiB (1099511627776 bytes)" in err.message and "256 MiB (268435456 bytes)" in err.message
    printed = "".join(traceback.format_exception(err))
    assert "_InactiveRpcError" not in printed and "During handling" not in printed, printed
    assert err.rpc_error.code() == CODE.RESOURCE_EXHAUSTED


def test_duplicate_id_is_already_exists_and_the_first_cache_is_untouched(stub):
    first = stub.Allocate(pb.AllocateRequest(pool="default", size_bytes=MiB, cache_id="dup-1"))
    code, details = status_of(stub.Allocate, pb.AllocateRequest(pool="default", size_bytes=2 * MiB, cache_id="dup-1"))
    assert code == CODE.ALREADY_EXISTS and "dup-1" in details
    again = stub.Attach(pb.AttachRequest(cache_id="dup-1"))
    assert again.cache.nbytes == MiB and again.handle.byte_offset == first.handle.byte_offset
    stub.Release(pb.ReleaseRequest(cache_id="dup-1"))


@pytest.mark.parametrize(
    "method, request_, code",
    [
        ("Attach", pb.AttachRequest(cache_id="never-existed"), CODE.NOT_FOUND),
        ("Release", pb.ReleaseRequest(cache_id="never-existed"), CODE.NOT_FOUND),
        ("Pin", pb.PinRequest(cache_id="never-existed"), CODE.NOT_FOUND),
        ("Unpin", pb.UnpinRequest(cache_id="never-existed"), CODE.NOT_FOUND),
        ("Attach", pb.AttachRequest(), CODE.INVALID_ARGUMENT),
        ("ListCaches", pb.ListCachesRequest(page_size=5000), CODE.INVALID_ARGUMENT),
        ("ListCaches", pb.ListCachesRequest(pool="nope"), CODE.NOT_FOUND),
        ("Defragment", pb.DefragmentRequest(device="GPU-none"), CODE.NOT_FOUND),
    ],
)
def test_unknown_ids(stub, method, request_, code):
    assert status_of(getattr(stub, method), request_)[0] == code


def test_unpin_without_pin_is_failed_precondition(stub):
    stub.Allocate(pb.AllocateRequest(pool="default", size_bytes=MiB, cache_id="unpinned-1"))
    assert status_of(stub.Unpin, pb.UnpinRequest(cache_id="unpinned-1"))[0] == CODE.FAILED_PRECONDITION
    stub.Release(pb.ReleaseRequest(cache_id="unpinned-1"))


def test_bad_session_metadata_is_invalid_argument(daemon):
    with grpc.insecure_channel(daemon.target) as channel:
        stub = broker_pb2_grpc.CacheBrokerStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.Allocate(pb.AllocateRequest(pool="default", size_bytes=MiB), metadata=(("kvbroker-session-id", "bad id!"),))
        assert info.value.code() == CODE.INVALID_ARGUMENT
        assert "kvbroker-session-id" in info.value.details()


def test_accounting_is_exact_after_a_storm_of_mistakes(stub):
    before = stub.Stats(pb.StatsRequest())
    ids = [stub.Allocate(pb.AllocateRequest(pool="default", size_bytes=(i + 1) * 100_000)).cache.cache_id for i in range(5)]
    for request_ in [c[1] for c in CASES]:
        with pytest.raises(grpc.RpcError):
            stub.Allocate(request_)
    mid = stub.Stats(pb.StatsRequest())
    expected = sum(-(-(i + 1) * 100_000 // 65536) * 65536 for i in range(5))
    assert mid.total_allocated_bytes - before.total_allocated_bytes == expected
    assert mid.active_caches - before.active_caches == 5
    for cache_id in ids:
        assert stub.Release(pb.ReleaseRequest(cache_id=cache_id)).freed
    after = stub.Stats(pb.StatsRequest())
    assert after.total_allocated_bytes == before.total_allocated_bytes
