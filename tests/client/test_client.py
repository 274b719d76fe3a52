"""The client stub over real gRPC against the scripted fake broker: requests it builds,
session identity, cache lifetime (release, context managers, close) and zero-copy views
of a real shm segment."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import pytest
import torch

from kvbroker.v1 import broker_pb2 as pb
from kvbroker.wire import SESSION_ID_KEY
from kvbroker_client import AsyncBrokerClient, BrokerClient, CacheEvicted, InvalidRequest, PreconditionFailed
from kvbroker_client.calls import allocate_request, list_caches_request
from kvbroker_client.dtypes import to_torch_dtype
from kvbroker_client.mapping import process_mapper


def test_allocate_request_carries_every_argument() -> None:
    request = allocate_request(
        "vista", dtype="bfloat16", shape=torch.Size([2, 16, 128]), cache_id="kv-1", model_name="m",
        priority=-3, pinned=True, retain=True, device="host", wait_timeout_ms=250,
    )  # fmt: skip
    assert request.pool == "vista" and request.cache_id == "kv-1" and request.model_name == "m"
    assert request.dtype == pb.DTYPE_BFLOAT16 and list(request.shape) == [2, 16, 128]
    assert request.HasField("priority") and request.priority == -3
    assert request.pinned and request.retain and request.device == "host" and request.wait_timeout_ms == 250
    assert not allocate_request(size_bytes=10).HasField("priority")  # unset: the pool's priority


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"size_bytes": -1}, "size_bytes"),
        ({"size_bytes": 1.5}, "size_bytes"),
        ({"dtype": "float17", "shape": [1]}, "dtype"),
        ({"dtype": torch.complex64, "shape": [1]}, "dtype"),
        ({"dtype": "float16", "shape": [2.0]}, "shape"),
        ({"wait_timeout_ms": -5}, "wait_timeout_ms"),
        ({"priority": 1 << 40}, "priority"),
    ],
)
def test_allocate_request_names_the_bad_field(kwargs, field) -> None:
    with pytest.raises(InvalidRequest, match=rf"^{field}: "):
        allocate_request(**kwargs)


def test_dtype_names_and_list_filters() -> None:
    assert to_torch_dtype("float16") is torch.float16
    assert to_torch_dtype("torch.float8_e4m3fn") is torch.float8_e4m3fn
    assert to_torch_dtype(torch.int64) is torch.int64
    assert list_caches_request(state="Evicted").state == pb.CACHE_STATE_EVICTED
    assert list_caches_request(state=None).state == pb.CACHE_STATE_UNSPECIFIED
    with pytest.raises(InvalidRequest, match=r"^state: "):
        list_caches_request(state="offloaded")


def test_each_client_is_its_own_holder(fake_broker) -> None:
    with BrokerClient(fake_broker.target) as a, BrokerClient(fake_broker.target) as b:
        a.stats()
        b.stats()
        with BrokerClient(fake_broker.target, session_id="") as operator:
            operator.stats()
    sessions = [metadata.get(SESSION_ID_KEY) for _, _, metadata in fake_broker.broker.calls]
    assert sessions[0] and sessions[1] and sessions[0] != sessions[1]
    assert sessions[2] is None
    assert a.session_id == sessions[0]


def test_release_is_idempotent_and_context_managers_release(fake_broker) -> None:
    with BrokerClient(fake_broker.target) as client:
        with client.allocate(size_bytes=64, cache_id="x") as cache:
            assert cache.cache_id == "x" and cache.nbytes == 64 and not cache.released
        assert cache.released
        assert cache.release() is False  # no second RPC
        assert fake_broker.broker.released == [("x", False)]
        with pytest.raises(PreconditionFailed, match="released"):
            cache.tensor()


def test_close_releases_what_the_client_still_holds(fake_broker) -> None:
    client = BrokerClient(fake_broker.target)
    kept = client.allocate(size_bytes=64, cache_id="kept")
    done = client.allocate(size_bytes=64, cache_id="done")
    done.release()
    client.close()
    client.close()
    assert sorted(fake_broker.broker.released) == [("done", False), ("kept", False)]
    assert kept.released
    with pytest.raises(RuntimeError, match="closed"):
        client.stats()


def test_list_caches_follows_every_page(fake_broker) -> None:
    fake_broker.broker.caches = [pb.Cache(cache_id=f"c{i:02d}") for i in range(25)]
    with BrokerClient(fake_broker.target) as client:
        caches = client.list_caches(page_size=10)
    assert [c.cache_id for c in caches] == [f"c{i:02d}" for i in range(25)]
    assert [r.page_token for r in fake_broker.broker.requests("ListCaches")] == ["", "c09", "c19"]


def test_views_of_a_real_segment_are_zero_copy_and_shared(fake_broker, host_segment) -> None:
    fake_broker.broker.segment = host_segment
    with BrokerClient(fake_broker.target) as client:
        cache = client.allocate(dtype="float16", shape=(4, 8), cache_id="kv")
        t = cache.tensor()
        assert t.dtype is torch.float16 and t.shape == (4, 8)
        t.fill_(2.0)
        raw = cache.tensor("uint8")
        assert raw.shape == (64,) and raw.data_ptr() == t.data_ptr()  # same bytes, no copy
        assert cache.tensor(torch.float32, (2, 8)).data_ptr() == t.data_ptr()
        key = process_mapper().key_of(cache.handle)
        assert key in process_mapper()
        # another process attaches by id and sees the bytes written here
        code = (
            "import sys; from kvbroker_client import BrokerClient\n"
            f"with BrokerClient({fake_broker.target!r}) as c:\n"
            "    print(c.attach('kv').tensor('float16', (4, 8)).sum().item())\n"
        )
        child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                               env={**os.environ, "PYTHONWARNINGS": "ignore"})  # fmt: skip
        assert child.returncode == 0, child.stderr
        assert float(child.stdout.split()[-1]) == 64.0


def test_attached_cache_views_default_to_its_recorded_dtype_and_shape(fake_broker, host_segment) -> None:
    fake_broker.broker.segment = host_segment
    fake_broker.broker.caches = [pb.Cache(cache_id="kv", nbytes=96, dtype=pb.DTYPE_INT32, shape=[3, 8])]
    with BrokerClient(fake_broker.target) as client:
        t = client.attach("kv").tensor()
    assert t.dtype is torch.int32 and t.shape == (3, 8)


def test_pinned_refreshes_the_handle_and_unpins(fake_broker, host_segment) -> None:
    fake_broker.broker.segment = host_segment
    with BrokerClient(fake_broker.target) as client, client.allocate(size_bytes=64, cache_id="p") as cache:
        assert cache.epoch == 0
        with cache.pinned("int8") as t:
            assert t.dtype is torch.int8 and t.shape == (64,)
            assert cache.is_pinned and cache.epoch == 7 and cache.handle.epoch == 7
        assert not cache.is_pinned
        with pytest.raises(PreconditionFailed, match="not pinned"):
            cache.unpin()
    assert [name for name, _, _ in fake_broker.broker.calls] == ["Allocate", "Pin", "Unpin", "Unpin", "Release"]


def test_an_evicted_record_refuses_views(fake_broker) -> None:
    fake_broker.broker.caches = [pb.Cache(cache_id="gone", nbytes=64, state=pb.CACHE_STATE_EVICTED)]
    with BrokerClient(fake_broker.target) as client:
        with pytest.raises(CacheEvicted):
            client.attach("gone").tensor()


def test_async_client_has_the_same_surface(fake_broker, host_segment) -> None:
    fake_broker.broker.segment = host_segment
    fake_broker.broker.caches = [pb.Cache(cache_id=f"c{i}") for i in range(3)]

    async def scenario() -> None:
        async with AsyncBrokerClient(fake_broker.target, timeout_s=5) as client:
            async with await client.allocate(dtype=torch.int16, shape=[4], cache_id="a") as cache:
                assert cache.tensor().shape == (4,)
                async with cache.pinned() as t:
                    assert t.dtype is torch.int16 and cache.is_pinned
            assert cache.released and await cache.release() is False
            assert len(await client.list_caches(page_size=2)) == 4
            assert (await client.defragment(dry_run=True)).dry_run
            await client.stats()
            held = await client.attach("c0")
        assert held.released  # close released it

    asyncio.run(scenario())
    names = [name for name, _, _ in fake_broker.broker.calls]
    assert names[:4] == ["Allocate", "Pin", "Unpin", "Release"] and names[-1] == "Release"


# -- the kvcached guide's vocabulary (issue 10, "the seeds' API") ------------------------


@pytest.mark.parametrize(
    "kwargs, size",
    [
        ({"size_mb": 512}, 512 << 20),
        ({"size_mb": 0.5}, 512 << 10),
        ({"size_gb": 1.5}, 3 << 29),
        ({"size": "512MiB"}, 512 << 20),
        ({"size": "512 mib"}, 512 << 20),
        ({"size": "2Gi"}, 2 << 30),
        ({"size": "1.5GB"}, 1_500_000_000),
        ({"size": "64KiB"}, 64 << 10),
        ({"size": "4096"}, 4096),
        ({"size": 4096}, 4096),
        ({"size_bytes": 4096}, 4096),
    ],
)
def test_sizes_as_the_guide_and_the_config_write_them(kwargs, size) -> None:
    assert allocate_request("vista", **kwargs).size_bytes == size


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"size": "512 potatoes"}, "size"),
        ({"size": "MiB"}, "size"),
        ({"size": -1}, "size"),
        ({"size": True}, "size"),
        ({"size_mb": -1}, "size_mb"),
        ({"size_mb": float("nan")}, "size_mb"),
        ({"size_gb": "1"}, "size_gb"),
        ({"size_mb": 1, "size_bytes": 1}, "size_bytes/size_mb"),
        ({"priority": "urgent"}, "priority"),
    ],
)
def test_sizes_and_priorities_that_are_not_name_the_argument(kwargs, field) -> None:
    with pytest.raises(InvalidRequest, match=f"^{field}: "):
        allocate_request(**kwargs)


def test_priority_names_are_documented_numbers() -> None:
    from kvbroker_client import PRIORITIES

    assert PRIORITIES == {"low": -100, "normal": 0, "high": 100}
    for name, value in PRIORITIES.items():
        assert allocate_request(priority=name).priority == value
        assert allocate_request(priority=name.upper()).priority == value
    assert allocate_request(priority=7).priority == 7
    assert not allocate_request().HasField("priority"), "none given: the pool's"


def test_summary_gives_the_guides_figures_in_its_units() -> None:
    from kvbroker.v1 import broker_pb2 as pb
    from kvbroker_client import summarize

    GiB = 1 << 30

    def usage(capacity, allocated, fragmentation, caches):
        return pb.Usage(total_capacity_bytes=capacity, total_allocated_bytes=allocated,
                        utilization_ratio=allocated / capacity, fragmentation_ratio=fragmentation,
                        active_caches=caches, allocation_count=9, eviction_count=2)  # fmt: skip

    stats = pb.StatsResponse(
        total_capacity_bytes=32 * GiB, total_allocated_bytes=8 * GiB, utilization_ratio=0.25,
        fragmentation_ratio=0.03, active_caches=24, allocation_count=156, eviction_count=8,
        free_bytes=24 * GiB, pinned_bytes=GiB, largest_free_extent_bytes=4 * GiB,
        devices=[pb.DeviceStats(device=f"GPU-{i}", usage=usage(8 * GiB, 2 * GiB, 0.02 * i, 6)) for i in range(4)],
        pools=[pb.PoolStats(pool="vista", usage=usage(4 * GiB, GiB, 0.1, 3), min_bytes=GiB // 2,
                            max_bytes=4 * GiB, priority=10, eviction_policy="adaptive")],
    )  # fmt: skip
    summary = summarize(stats)
    assert summary["total_capacity_gb"] == 32.0 and summary["total_allocated_gb"] == 8.0
    assert summary["total_utilization_pct"] == 25.0
    assert summary["avg_fragmentation_pct"] == pytest.approx(3.0), "the mean of 0, 2, 4 and 6 %"
    assert (summary["total_active_caches"], summary["total_allocation_count"], summary["total_eviction_count"]) == (
        24, 156, 8)
    assert (summary["num_devices"], summary["total_free_gb"], summary["total_pinned_gb"]) == (4, 24.0, 1.0)
    assert summary["device_stats"]["GPU-1"] == {
        "capacity_gb": 8.0, "allocated_gb": 2.0, "utilization_pct": 25.0, "fragmentation_pct": 2.0,
        "active_caches": 6,
    }  # fmt: skip
    vista = summary["pool_stats"]["vista"]
    assert (vista["max_gb"], vista["min_gb"], vista["priority"], vista["eviction_policy"]) == (4.0, 0.5, 10, "adaptive")
    assert summarize(pb.StatsResponse())["avg_fragmentation_pct"] == 0.0
