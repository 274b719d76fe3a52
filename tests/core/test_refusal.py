"""Out-of-memory refusals say which limit was hit, in human units and in bytes, with
figures that are the ones Stats shows for the same pool or device (issue 10, defect 4:
a quota refusal used to read "0 bytes free" while Stats showed 928 MiB free in the pool,
and a request larger than the device was INVALID_ARGUMENT, which OOM handlers miss)."""

from __future__ import annotations

import pytest

from kvbroker.core import AllocationRequest, Broker, DeviceSpec, PoolSpec, ResourceExhausted
from kvbroker.core.audit import audit
from kvbroker.core.errors import amount
from kvbroker.core.types import GiB, KiB, MiB

from .support import settle


def alloc(b: Broker, pool: str, nbytes: int, **kw) -> None:
    result = b.allocate(AllocationRequest(pool, nbytes, **kw))
    assert result.cache is not None
    settle(b, result)


def refusal(b: Broker, pool: str, nbytes: int, **kw) -> ResourceExhausted:
    with pytest.raises(ResourceExhausted) as info:
        b.allocate(AllocationRequest(pool, nbytes, **kw))
    audit(b)
    return info.value


def pool_usage(b: Broker, name: str):
    return next(p for p in b.stats().pools if p.pool == name).usage


def device_usage(b: Broker, name: str):
    return next(d for d in b.stats().devices if d.device_id == name).usage


@pytest.mark.parametrize(
    "nbytes, text",
    [
        (0, "0 bytes"), (1023, "1023 bytes"), (1024, "1 KiB (1024 bytes)"),
        (1572864000, "1.46 GiB (1572864000 bytes)"), (GiB, "1 GiB (1073741824 bytes)"),
        (928 * MiB, "928 MiB (973078528 bytes)"), (3 * 2**40 // 2, "1.5 TiB (1649267441664 bytes)"),
    ],
)
def test_amounts_read_in_binary_units_then_exact_bytes(nbytes, text):
    assert amount(nbytes) == text


def test_a_request_above_the_quota_names_max_bytes_and_the_pool_free_that_stats_shows():
    """The issue's case: a 1 GiB quota with 96 MiB allocated, a 1500 MiB request."""
    b = Broker([DeviceSpec("host", 4 * GiB)], [PoolSpec("vista", ("host",), max_bytes=GiB)])
    alloc(b, "vista", 96 * MiB)
    err = refusal(b, "vista", 1572864000)
    assert err.satisfiable is False
    free = pool_usage(b, "vista").free_bytes
    assert free == 928 * MiB
    message = str(err)
    assert "1.46 GiB (1572864000 bytes)" in message
    assert "quota, max_bytes = 1 GiB (1073741824 bytes)" in message
    assert f"the pool has {amount(free)} free" in message and "never fit" in message
    assert "0 bytes free" not in message


def test_a_request_above_the_device_is_resource_exhausted_and_never_satisfiable():
    b = Broker([DeviceSpec("host", 256 * MiB)], [PoolSpec("default", ("host",))])
    err = refusal(b, "default", GiB)
    assert err.satisfiable is False
    assert "exceeds the capacity of device 'host', 256 MiB (268435456 bytes)" in str(err)
    assert "1 GiB (1073741824 bytes)" in str(err)
    two = Broker([DeviceSpec("a", 64 * MiB), DeviceSpec("b", 128 * MiB)], [PoolSpec("p", ("a", "b"))])
    err = refusal(two, "p", 160 * MiB)
    assert err.satisfiable is False
    assert "every device it may use (the largest, 'b', has 128 MiB (134217728 bytes)" in str(err)
    err = refusal(two, "p", 100 * MiB, device_hint="a")
    assert err.satisfiable is False and "capacity of device 'a', 64 MiB (67108864 bytes)" in str(err)


def test_a_used_up_quota_says_so_with_the_pools_free_allocated_and_pinned_bytes():
    b = Broker([DeviceSpec("host", 256 * MiB)], [PoolSpec("small", ("host",), max_bytes=16 * MiB, segment_bytes=16 * MiB)])
    alloc(b, "small", 8 * MiB, pinned=True)
    alloc(b, "small", 6 * MiB, pinned=True)
    err = refusal(b, "small", 4 * MiB)
    assert err.satisfiable is True  # it fits once a pinned cache goes
    usage = pool_usage(b, "small")
    assert (usage.free_bytes, usage.allocated_bytes, usage.pinned_bytes) == (2 * MiB, 14 * MiB, 14 * MiB)
    assert str(err) == (
        "pool 'small' cannot place 4 MiB (4194304 bytes) now: its quota, max_bytes = 16 MiB "
        "(16777216 bytes), has 2 MiB (2097152 bytes) free; 14 MiB (14680064 bytes) is allocated, "
        "14 MiB (14680064 bytes) of it pinned"
    )


def test_a_full_device_says_so_with_the_device_figures_that_stats_shows():
    b = Broker(
        [DeviceSpec("host", 64 * MiB)],
        [PoolSpec("a", ("host",), segment_bytes=16 * MiB), PoolSpec("b", ("host",), segment_bytes=16 * MiB)],
    )
    alloc(b, "b", 48 * MiB, pinned=True)
    alloc(b, "a", 8 * MiB, pinned=True)
    err = refusal(b, "a", 16 * MiB)
    usage = device_usage(b, "host")
    assert (usage.free_bytes, usage.allocated_bytes, usage.pinned_bytes) == (8 * MiB, 56 * MiB, 56 * MiB)
    assert err.satisfiable is True
    assert (
        "device 'host' has 8 MiB (8388608 bytes) free of 64 MiB (67108864 bytes); 56 MiB (58720256 bytes) "
        "is allocated (48 MiB (50331648 bytes) by other pools), 56 MiB (58720256 bytes) pinned"
    ) in str(err)


def test_fragmented_free_space_says_the_largest_extent_and_the_pinned_bytes():
    b = Broker([DeviceSpec("d0", 256 * KiB, 4 * KiB)], [PoolSpec("p", ("d0",), block_bytes=4 * KiB, segment_bytes=64 * KiB)])
    for i in range(16):
        alloc(b, "p", 16 * KiB, cache_id=f"c{i}", pinned=i % 2 == 0)
    for i in range(1, 16, 2):
        b.release(f"c{i}")
    # Every segment is [pinned 16K][free 16K][pinned 16K][free 16K]: nothing can move.
    err = refusal(b, "p", 32 * KiB)
    usage = pool_usage(b, "p")
    assert usage.free_bytes == 128 * KiB
    assert err.satisfiable is True
    assert str(err) == (
        "pool 'p' cannot place 32 KiB (32768 bytes) now: the pool has 128 KiB (131072 bytes) free, but "
        "the largest free extent it can use is 16 KiB (16384 bytes); 128 KiB (131072 bytes) of pinned "
        "caches can be neither moved nor evicted"
    )


def test_free_bytes_inside_another_pools_segments_are_pointed_at():
    """Pool b keeps its (empty, mapped-by-nobody) segment because of its min_bytes: the
    device shows free bytes that pool a cannot take."""
    b = Broker(
        [DeviceSpec("host", 64 * MiB)],
        [PoolSpec("a", ("host",), segment_bytes=16 * MiB), PoolSpec("b", ("host",), min_bytes=32 * MiB, segment_bytes=32 * MiB)],
    )
    alloc(b, "b", 4 * MiB, cache_id="kept", pinned=True)
    alloc(b, "a", 32 * MiB, pinned=True)
    err = refusal(b, "a", 16 * MiB)
    assert err.satisfiable is True
    assert "28 MiB (29360128 bytes) free on device 'host' is in other pools' segments" in str(err)
    assert device_usage(b, "host").free_bytes == 28 * MiB


def test_messages_fit_what_the_server_passes_on_whole():
    """The server caps a message at 400 characters (kvbroker/server/convert.py): the
    longest refusal, with a GPU UUID for a device id, must fit."""
    gpu = "GPU-8d1c2f3e-5a6b-7c8d-9e0f-123456789abc"
    b = Broker(
        [DeviceSpec(gpu, 80 * GiB)],
        [PoolSpec("deepseek-ocr", (gpu,), segment_bytes=GiB), PoolSpec("vista-prefill", (gpu,), min_bytes=40 * GiB, segment_bytes=40 * GiB)],
    )
    alloc(b, "vista-prefill", 4 * GiB, pinned=True)
    alloc(b, "deepseek-ocr", 39 * GiB + 123 * MiB, pinned=True)
    for nbytes in (20 * GiB + 7 * MiB, 100 * GiB):
        err = refusal(b, "deepseek-ocr", nbytes)
        assert len(str(err)) <= 400, str(err)
    assert "quota" not in str(err), "a pool without max_bytes has no quota to blame"
