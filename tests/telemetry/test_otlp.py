"""OTLP from a real daemon to a real OTLP/gRPC receiver: spans of known RPCs with their
names, attributes and parent links; metrics from the catalogue; and nothing at all when
no OTEL_* variable is set."""

from __future__ import annotations

import os
import subprocess
import sys

from opentelemetry.proto.trace.v1 import trace_pb2

from kvbroker.telemetry.catalogue import CATALOGUE, Kind

from .conftest import MiB, PARENT_SPAN_ID, TRACE_ID, Telemetered
from .otlp_receiver import OtlpReceiver, attributes

ALLOCATE = "kvbroker.v1.CacheBroker/Allocate"


def _spans(receiver: OtlpReceiver, name: str, count: int) -> list:
    def found():
        spans = [s for _, s in receiver.spans() if s.name == name]
        return spans if len(spans) >= count else None

    return receiver.wait_for(found)


def _children(receiver: OtlpReceiver, parent) -> dict[str, list]:
    out: dict[str, list] = {}
    for _, span in receiver.spans():
        if span.parent_span_id == parent.span_id and span.trace_id == parent.trace_id:
            out.setdefault(span.name, []).append(span)
    return out


def test_resource_names_the_service_version_and_instance(telemetered: Telemetered) -> None:
    resource, _ = telemetered.receiver.wait_for(lambda: telemetered.receiver.spans())[0]
    assert resource["service.name"] == "kvbroker"
    assert resource["service.version"] == __import__("kvbroker").__version__
    assert resource["service.instance.id"] == telemetered.instance_id
    assert resource["deployment.environment"] == "test"  # from OTEL_RESOURCE_ATTRIBUTES


def test_an_allocate_span_joins_the_callers_trace_with_inner_spans(telemetered: Telemetered) -> None:
    receiver = telemetered.receiver
    _spans(receiver, ALLOCATE, 8)
    (server,) = [s for _, s in receiver.spans() if s.trace_id.hex() == TRACE_ID and s.name == ALLOCATE]
    assert server.parent_span_id.hex() == PARENT_SPAN_ID
    assert server.kind == trace_pb2.Span.SPAN_KIND_SERVER
    attrs = attributes(server.attributes)
    assert attrs["rpc.system"] == "grpc" and attrs["rpc.method"] == "Allocate"
    assert attrs["rpc.service"] == "kvbroker.v1.CacheBroker" and attrs["rpc.grpc.status_code"] == 0
    children = receiver.wait_for(lambda: (c := _children(receiver, server)) and "kvbroker.segment_create" in c and c)
    (placement,) = children["kvbroker.placement"]
    p = attributes(placement.attributes)
    assert (p["kvbroker.pool"], p["kvbroker.nbytes"], p["kvbroker.device"], p["kvbroker.outcome"]) == (
        "default", MiB, "host", "new_segment"
    )
    (create,) = children["kvbroker.segment_create"]
    assert attributes(create.attributes)["kvbroker.device"] == "host"
    assert server.start_time_unix_nano <= placement.start_time_unix_nano <= placement.end_time_unix_nano
    assert placement.end_time_unix_nano <= server.end_time_unix_nano


def test_an_eviction_shows_as_a_child_span(telemetered: Telemetered) -> None:
    receiver = telemetered.receiver
    (eviction,) = receiver.wait_for(lambda: [s for _, s in receiver.spans() if s.name == "kvbroker.eviction"])
    assert attributes(eviction.attributes) == {"kvbroker.pool": "small", "kvbroker.caches": 1}
    (server,) = [s for _, s in receiver.spans() if s.span_id == eviction.parent_span_id]
    assert server.name == ALLOCATE


def test_errors_are_recorded_on_spans(telemetered: Telemetered) -> None:
    receiver = telemetered.receiver
    spans = _spans(receiver, ALLOCATE, 8)
    failed = {attributes(s.attributes)["rpc.grpc.status_code"]: s for s in spans if s.status.code == s.status.STATUS_CODE_ERROR}
    assert set(failed) == {5, 8, 4}  # NOT_FOUND, RESOURCE_EXHAUSTED, DEADLINE_EXCEEDED
    assert failed[5].status.message.startswith("NOT_FOUND: pool 'nosuch' does not exist")
    (placement,) = _children(receiver, failed[5])["kvbroker.placement"]
    assert placement.status.code == placement.status.STATUS_CODE_ERROR
    (event,) = placement.events
    assert event.name == "exception"
    assert attributes(event.attributes)["exception.type"] == "kvbroker.core.errors.NotFound"


def test_a_defragment_has_compaction_and_copy_spans(telemetered: Telemetered) -> None:
    receiver = telemetered.receiver
    (server,) = _spans(receiver, "kvbroker.v1.CacheBroker/Defragment", 1)
    (compaction,) = receiver.wait_for(lambda: _children(receiver, server).get("kvbroker.compaction"))
    assert attributes(compaction.attributes) == {"kvbroker.caches": 2, "kvbroker.nbytes": 4 * MiB}
    (copy,) = _children(receiver, compaction)["kvbroker.copy"]
    assert attributes(copy.attributes) == {"kvbroker.device": "host", "kvbroker.nbytes": 4 * MiB}


def test_metrics_arrive_with_the_catalogues_names_units_and_values(telemetered: Telemetered) -> None:
    receiver = telemetered.receiver
    # Every metric with a series by now (no session has ended, no checkpoint ran, no cache
    # was restored from an offload tier, no pool is paged: those have none).
    none_yet = {"kvbroker_sessions_reclaimed_total", "kvbroker_checkpoint_duration_seconds",
                "kvbroker_restore_duration_seconds"}
    expected = {spec.otel_name for spec in CATALOGUE
                if spec.name not in none_yet and not spec.name.startswith("kvbroker_paged_pool_")}
    by_name = receiver.wait_for(
        lambda: (m := {metric.name: metric for _, metric in receiver.metrics()}).keys() >= expected and m
    )
    for spec in CATALOGUE:
        if spec.otel_name not in expected:
            continue
        metric = by_name[spec.otel_name]
        assert (metric.unit, metric.description) == (spec.otel_unit, spec.help)
        kind = metric.WhichOneof("data")
        assert kind == {Kind.GAUGE: "gauge", Kind.INFO: "gauge", Kind.COUNTER: "sum", Kind.HISTOGRAM: "histogram"}[spec.kind]
        if kind == "sum":
            assert metric.sum.is_monotonic and metric.sum.aggregation_temporality == 2  # cumulative
    allocations = {
        tuple(sorted(attributes(p.attributes).items())): p.as_int or p.as_double
        for p in by_name["kvbroker.allocations"].sum.data_points
    }
    assert allocations[(("outcome", "ok"), ("pool", "small"))] == 3
    assert allocations[(("outcome", "timeout"), ("pool", "small"))] == 1
    (small,) = [p for p in by_name["kvbroker.pool.capacity"].gauge.data_points
                if attributes(p.attributes) == {"pool": "small"}]  # fmt: skip
    assert (small.as_int or small.as_double) == 16 * MiB
    (wait,) = by_name["kvbroker.allocation.wait"].histogram.data_points
    assert wait.count == 1 and 0.3 <= wait.sum < 2.0 and len(wait.bucket_counts) == len(wait.explicit_bounds) + 1


def test_nothing_is_exported_or_imported_without_otel_variables() -> None:
    code = (
        "import os, sys\n"
        "from kvbroker.telemetry.service import Telemetry\n"
        "t = Telemetry.create(instance_id='x', pools=('default',), metrics_listen='127.0.0.1:0', environ=os.environ)\n"
        "assert t.otel.traces is None and t.otel.metrics is None, t.otel\n"
        "assert not [m for m in sys.modules if m.startswith('opentelemetry')], 'opentelemetry imported'\n"
        "off = Telemetry.create(instance_id='x', pools=('default',), metrics_listen='', environ=os.environ)\n"
        "assert off.interceptors == () and type(off.observer).__name__ == 'NullObserver'\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
