"""Prometheus: the catalogue as metric families, served on ``/metrics`` by prometheus_client.

``BrokerCollector`` is a custom collector (prometheus_client's documented way to export
values that live in the domain): every scrape takes one snapshot on the event loop and
builds the families from ``readings.read``, so gauges are never stale and nothing is
booked twice. The registry also carries prometheus_client's process, platform and GC
collectors (``process_*``, ``python_*``).

The HTTP server is prometheus_client's own (``start_http_server``): a daemon thread per
scrape, off the event loop; a scrape costs the loop one snapshot. Binding happens at
start, so an address in use stops the daemon's start like a gRPC address would.
"""

from __future__ import annotations

from collections.abc import Iterator
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CollectorRegistry,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
    start_http_server,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from kvbroker.telemetry.catalogue import Kind, MetricSpec
from kvbroker.telemetry.histogram import HistogramValue
from kvbroker.telemetry.readings import Point, SnapshotSource, read


def _le(bound: float) -> str:
    return repr(float(bound))


def family(spec: MetricSpec, points: list[Point]) -> Metric:
    """One catalogue metric's points as a prometheus_client metric family."""
    labels = list(spec.labels)
    if spec.kind is Kind.GAUGE:
        metric = GaugeMetricFamily(spec.name, spec.help, labels=labels, unit=spec.unit)
    elif spec.kind is Kind.COUNTER:
        metric = CounterMetricFamily(spec.name, spec.help, labels=labels, unit=spec.unit)
    elif spec.kind is Kind.INFO:
        metric = InfoMetricFamily(spec.name.removesuffix("_info"), spec.help)
        for point in points:
            metric.add_metric([], dict(zip(labels, point.labels, strict=True)))
        return metric
    else:
        metric = HistogramMetricFamily(spec.name, spec.help, labels=labels, unit=spec.unit)
        for point in points:
            h: HistogramValue = point.value  # type: ignore[assignment]
            buckets = [(_le(b), n) for b, n in zip(h.bounds, h.cumulative(), strict=False)]
            buckets.append(("+Inf", h.count))
            metric.add_metric(list(point.labels), buckets, h.sum)
        return metric
    for point in points:
        metric.add_metric(list(point.labels), point.value)
    return metric


class BrokerCollector(Collector):
    """Every catalogue metric, from one snapshot per scrape."""

    def __init__(self, source: SnapshotSource) -> None:
        self._source = source

    def collect(self) -> Iterator[Metric]:
        for spec, points in read(self._source.take_threadsafe()):
            yield family(spec, points)

    def describe(self) -> list[Metric]:
        return []  # registration must not scrape


def registry_for(source: SnapshotSource) -> CollectorRegistry:
    """A registry with the broker's metrics and the process, platform and GC ones."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(BrokerCollector(source))
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry


def split_listen(listen: str) -> tuple[str, int]:
    """``"127.0.0.1:9464"`` or ``"[::1]:9464"`` -> (host, port)."""
    host, _, port = listen.rpartition(":")
    return host.strip("[]"), int(port)


class MetricsServer:
    """``/metrics`` over HTTP on ``listen``, until ``stop``."""

    def __init__(self, registry: CollectorRegistry, listen: str) -> None:
        host, port = split_listen(listen)
        try:
            self._httpd: WSGIServer
            self._httpd, self._thread = start_http_server(port, addr=host, registry=registry)
        except OSError as err:
            raise RuntimeError(f"cannot serve metrics on {listen}: {err.strerror or err}") from None
        self.port: int = self._httpd.server_port
        self.host = host

    def stop(self) -> None:
        """Stop serving (blocks up to half a second: the server's poll interval)."""
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(5)
