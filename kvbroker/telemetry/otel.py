"""OpenTelemetry: traces and metrics over OTLP, switched on by the standard ``OTEL_*``
environment variables only.

Which exporters run (``OtelSettings.from_env``):

- ``OTEL_SDK_DISABLED=true`` turns everything off.
- ``OTEL_TRACES_EXPORTER`` / ``OTEL_METRICS_EXPORTER``: ``otlp``, ``console`` or
  ``none``. Unset, a signal is exported over OTLP when an endpoint is set
  (``OTEL_EXPORTER_OTLP_ENDPOINT`` or the signal's ``OTEL_EXPORTER_OTLP_<SIGNAL>_ENDPOINT``),
  and not at all otherwise: with no ``OTEL_*`` variable, nothing is exported, no
  OpenTelemetry module is even imported, and nothing is slowed.
- ``OTEL_EXPORTER_OTLP_PROTOCOL`` (or the per-signal one): ``grpc`` (the default) or
  ``http/protobuf``. Endpoint, headers, TLS and timeouts are read by the OTLP exporters
  themselves from their usual variables; ``OTEL_BSP_*`` tune span batching, and
  ``OTEL_METRIC_EXPORT_INTERVAL`` (ms, default 60000) the metric pushes.
- The resource: ``service.name`` from ``OTEL_SERVICE_NAME``, else from
  ``OTEL_RESOURCE_ATTRIBUTES``, else ``kvbroker``; ``service.version`` and
  ``service.instance.id`` (the daemon's instance id); any other
  ``OTEL_RESOURCE_ATTRIBUTES``.

Metrics are not recorded a second time through the SDK's instruments: ``MetricsPusher``
converts the same catalogue points the Prometheus exporter serves (``readings.read``)
into OTLP data (cumulative temporality, start time = daemon start) and hands them to the
SDK's OTLP exporter from its own thread.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from kvbroker import __version__
from kvbroker.telemetry.catalogue import Kind
from kvbroker.telemetry.histogram import HistogramValue
from kvbroker.telemetry.readings import Snapshot, read

log = logging.getLogger(__name__)

EXPORTERS = ("otlp", "console")
PROTOCOLS = ("grpc", "http/protobuf")


@dataclass(frozen=True)
class OtelSettings:
    """What to export; ``None`` means the signal is off."""

    traces: str | None = None
    metrics: str | None = None
    traces_protocol: str = "grpc"
    metrics_protocol: str = "grpc"
    metric_interval_s: float = 60.0

    @property
    def enabled(self) -> bool:
        return bool(self.traces or self.metrics)

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> OtelSettings:
        """Read the standard variables. Raises ``ValueError`` naming a variable whose
        value is not supported."""
        if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
            return cls()

        def exporter(signal: str) -> str | None:
            key = f"OTEL_{signal}_EXPORTER"
            value = environ.get(key, "").strip().lower()
            if not value:
                endpoint = environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or environ.get(
                    f"OTEL_EXPORTER_OTLP_{signal}_ENDPOINT"
                )
                return "otlp" if endpoint else None
            names = [n.strip() for n in value.split(",") if n.strip()]
            if names == ["none"]:
                return None
            for name in names:
                if name not in EXPORTERS:
                    raise ValueError(f"{key}: {name!r} is not supported (otlp, console or none)")
            if len(names) > 1:
                log.warning("%s lists %s; only %s is used", key, value, names[0])
            return names[0]

        def protocol(signal: str, exporter: str | None) -> str:
            key = f"OTEL_EXPORTER_OTLP_{signal}_PROTOCOL"
            key = key if environ.get(key) else "OTEL_EXPORTER_OTLP_PROTOCOL"
            value = (environ.get(key) or "grpc").strip()
            if exporter == "otlp" and value not in PROTOCOLS:
                raise ValueError(f"{key}: {value!r} is not supported (grpc or http/protobuf)")
            return value

        interval = environ.get("OTEL_METRIC_EXPORT_INTERVAL", "60000")
        try:
            interval_s = float(interval) / 1000
        except ValueError:
            raise ValueError(f"OTEL_METRIC_EXPORT_INTERVAL: expected milliseconds, got {interval!r}") from None
        if interval_s <= 0:
            raise ValueError("OTEL_METRIC_EXPORT_INTERVAL: must be positive")
        traces, metrics = exporter("TRACES"), exporter("METRICS")
        return cls(traces, metrics, protocol("TRACES", traces), protocol("METRICS", metrics), interval_s)


def make_resource(instance_id: str, environ: Mapping[str, str]) -> Any:
    """The OpenTelemetry resource of this daemon run (see the module docstring)."""
    from opentelemetry.sdk.resources import OTELResourceDetector, Resource

    detected = OTELResourceDetector().detect().attributes  # reads os.environ
    name = environ.get("OTEL_SERVICE_NAME") or detected.get("service.name") or "kvbroker"
    return Resource.create(
        {"service.name": name, "service.version": __version__, "service.instance.id": instance_id}
    )


def make_tracer_provider(settings: OtelSettings, resource: Any) -> Any:
    """A tracer provider that batches spans to the configured exporter."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

    if settings.traces == "console":
        exporter = ConsoleSpanExporter()
    elif settings.traces_protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter()
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter()
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


def make_metric_exporter(settings: OtelSettings) -> Any:
    if settings.metrics == "console":
        from opentelemetry.sdk.metrics.export import ConsoleMetricExporter

        return ConsoleMetricExporter()
    if settings.metrics_protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter

        return OTLPMetricExporter()
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter

    return OTLPMetricExporter()


def metrics_data(snapshot: Snapshot, resource: Any, now_ns: int) -> Any:
    """The catalogue's points as OTLP ``MetricsData`` (cumulative, since daemon start)."""
    from opentelemetry.sdk.metrics.export import (
        AggregationTemporality,
        Gauge,
        Histogram,
        HistogramDataPoint,
        Metric,
        MetricsData,
        NumberDataPoint,
        ResourceMetrics,
        ScopeMetrics,
        Sum,
    )
    from opentelemetry.sdk.util.instrumentation import InstrumentationScope

    start_ns = int(snapshot.recorded.started_at * 1e9)
    cumulative = AggregationTemporality.CUMULATIVE
    metrics = []
    for spec, points in read(snapshot):
        if not points:
            continue
        attrs = [dict(zip(spec.labels, p.labels, strict=True)) for p in points]
        if spec.kind is Kind.HISTOGRAM:
            histograms: list[HistogramValue] = [p.value for p in points]  # type: ignore[misc]
            data: Any = Histogram(
                [
                    HistogramDataPoint(a, start_ns, now_ns, h.count, h.sum, list(h.counts), list(h.bounds), h.min, h.max)
                    for a, h in zip(attrs, histograms, strict=True)
                ],
                cumulative,
            )
        else:
            numbers = [NumberDataPoint(a, start_ns, now_ns, p.value) for a, p in zip(attrs, points, strict=True)]
            data = Sum(numbers, cumulative, True) if spec.kind is Kind.COUNTER else Gauge(numbers)
        metrics.append(Metric(spec.otel_name, spec.help, spec.otel_unit, data))
    scope = InstrumentationScope("kvbroker", __version__)
    return MetricsData([ResourceMetrics(resource, [ScopeMetrics(scope, metrics, "")], "")])


class MetricsPusher:
    """Exports a snapshot every ``interval_s`` from a daemon thread, and once more at
    ``stop`` (so short runs and shutdowns lose nothing).

    Args:
        exporter: an OTLP (or console) metric exporter.
        resource: the daemon's resource.
        take: returns a snapshot; called from the pusher's thread.
        interval_s: seconds between pushes.
    """

    def __init__(self, exporter: Any, resource: Any, take: Callable[[], Snapshot], interval_s: float) -> None:
        self._exporter = exporter
        self._resource = resource
        self._take = take
        self._interval_s = interval_s
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kvbroker-otlp-metrics", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def push(self, snapshot: Snapshot) -> None:
        try:
            result = self._exporter.export(metrics_data(snapshot, self._resource, time.time_ns()))
            if getattr(result, "name", "SUCCESS") != "SUCCESS":
                log.warning("OTLP metric export failed (%s)", result.name)
        except Exception:
            log.exception("OTLP metric export failed")

    def _run(self) -> None:
        while not self._stopping.wait(self._interval_s):
            try:
                self.push(self._take())
            except Exception:
                log.exception("cannot take a metrics snapshot")

    def stop(self, final: Snapshot | None) -> None:
        """Stop the thread, push ``final`` (taken by the caller on the loop), shut the
        exporter down. Blocking: call it off the event loop."""
        self._stopping.set()
        self._thread.join(30)
        if final is not None:
            self.push(final)
        self._exporter.shutdown()
