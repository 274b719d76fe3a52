"""One real daemon for the telemetry tests (tests/support/daemon.py): host device, metrics on a free port, OTLP
traces and metrics to a real receiver in this process; and a fixed set of operations
run once against it, whose effects the tests then look for in every exporter."""

from __future__ import annotations

import shutil
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import pytest

from kvbroker.v1 import broker_pb2 as pb
from kvbroker.v1 import broker_pb2_grpc
from tests.support.daemon import Daemon, running_daemon

from .otlp_receiver import OtlpReceiver

MiB = 1 << 20

#: A W3C traceparent sent with one Allocate: the server span must join this trace.
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_SPAN_ID = "00f067aa0ba902b7"

CONFIG = """
[devices]
host_capacity = "256MiB"

[[pools]]
name = "default"
segment_bytes = "64MiB"

[[pools]]
name = "small"
max_bytes = "16MiB"
segment_bytes = "16MiB"
block_bytes = "1MiB"
gc_threshold = 1.0  # no background reclamation: these caches must stay until pinned

[[pools]]
name = "frag"
max_bytes = "8MiB"
segment_bytes = "8MiB"
block_bytes = "1MiB"
gc_threshold = 1.0
"""


def need_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: scripts/test.sh installs Debian's prometheus package")
    return path


@dataclass
class Telemetered:
    daemon: Daemon
    metrics_url: str
    receiver: OtlpReceiver
    instance_id: str
    defrag: pb.DefragmentResponse

    def scrape(self) -> str:
        with urllib.request.urlopen(self.metrics_url, timeout=10) as reply:
            return reply.read().decode()


def _expect(code: grpc.StatusCode, call) -> None:
    with pytest.raises(grpc.RpcError) as info:
        call()
    assert info.value.code() == code, info.value.details()


def run_operations(stub: broker_pb2_grpc.CacheBrokerStub) -> pb.DefragmentResponse:
    """The known operations (anonymous holder). What each one must show:

    - default: one 1 MiB cache allocated (a new segment) and released.
    - an Allocate naming no pool: NOT_FOUND, counted with pool "".
    - small (16 MiB quota): 3 x 8 MiB, the third evicts the first by LRU; 32 MiB is
      over the quota (RESOURCE_EXHAUSTED); with both caches pinned, an 8 MiB request
      waits 300 ms and times out (DEADLINE_EXCEEDED).
    - frag: 4 x 2 MiB, the 1st and 3rd released, then a Defragment moves the others.
    """
    traceparent = (("traceparent", f"00-{TRACE_ID}-{PARENT_SPAN_ID}-01"),)
    cache = stub.Allocate(pb.AllocateRequest(pool="default", size_bytes=MiB), metadata=traceparent).cache
    stub.Release(pb.ReleaseRequest(cache_id=cache.cache_id))
    _expect(grpc.StatusCode.NOT_FOUND, lambda: stub.Allocate(pb.AllocateRequest(pool="nosuch", size_bytes=MiB)))
    for name in ("s1", "s2", "s3"):
        stub.Allocate(pb.AllocateRequest(pool="small", cache_id=name, size_bytes=8 * MiB))
    _expect(grpc.StatusCode.RESOURCE_EXHAUSTED,
            lambda: stub.Allocate(pb.AllocateRequest(pool="small", size_bytes=32 * MiB)))  # fmt: skip
    for name in ("s2", "s3"):
        stub.Pin(pb.PinRequest(cache_id=name))
    _expect(grpc.StatusCode.DEADLINE_EXCEEDED,
            lambda: stub.Allocate(pb.AllocateRequest(pool="small", size_bytes=8 * MiB, wait_timeout_ms=300)))  # fmt: skip
    for name in ("f1", "f2", "f3", "f4"):
        stub.Allocate(pb.AllocateRequest(pool="frag", cache_id=name, size_bytes=2 * MiB))
    for name in ("f1", "f3"):
        stub.Release(pb.ReleaseRequest(cache_id=name))
    result = stub.Defragment(pb.DefragmentRequest(pool="frag"))
    assert result.caches_moved == 2 and result.bytes_moved == 4 * MiB
    return result


@pytest.fixture(scope="package")
def telemetered(tmp_path_factory) -> Iterator[Telemetered]:
    receiver = OtlpReceiver().start()
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
        "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment=test",
        "OTEL_METRIC_EXPORT_INTERVAL": "500",
        "OTEL_BSP_SCHEDULE_DELAY": "100",
    }
    try:
        with running_daemon(tmp_path_factory.mktemp("telemetry"), config=CONFIG, metrics=True, env=env) as daemon:
            assert daemon.metrics_url is not None
            with grpc.insecure_channel(daemon.target) as channel:
                stub = broker_pb2_grpc.CacheBrokerStub(channel)
                defrag = run_operations(stub)
                instance_id = stub.Stats(pb.StatsRequest()).instance_id
            yield Telemetered(daemon, daemon.metrics_url, receiver, instance_id, defrag)
    finally:
        receiver.stop()
