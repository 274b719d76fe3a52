"""Prometheus: the catalogue as metric families, served on ``/metrics`` by prometheus_client,
and ``/healthz`` beside it.

``BrokerCollector`` is a custom collector (prometheus_client's documented way to export
values that live in the domain): every scrape takes one snapshot on the event loop and
builds the families from ``readings.read``, so gauges are never stale and nothing is
booked twice. The registry also carries prometheus_client's process, platform and GC
collectors (``process_*``, ``python_*``).

The HTTP server is prometheus_client's WSGI app and threading server (a thread per
request, off the event loop; a scrape costs the loop one snapshot) behind a router:
``/metrics`` (and ``/metrics/``) is the exposition, ``/healthz`` answers 200 ``SERVING``
while the daemon serves gRPC and 503 ``NOT_SERVING`` before and while it shuts down (a
probe for Kubernetes or a load balancer that speaks HTTP, not gRPC health), and every
other path is 404 (prometheus_client alone serves the metrics on every path, which made
any URL look like a working endpoint). Binding happens at start, so an address in use
stops the daemon's start like a gRPC address would.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import (
    CollectorRegistry,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
    make_wsgi_app,
)
from prometheus_client.exposition import ThreadingWSGIServer
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


METRICS_PATHS = frozenset({"/metrics", "/metrics/"})
HEALTH_PATH = "/healthz"


def routes(metrics_app: Callable, serving: Callable[[], bool]) -> Callable:
    """The WSGI app of the metrics listener: ``/metrics``, ``/healthz``, else 404."""

    def app(environ: dict[str, Any], start_response: Callable) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path in METRICS_PATHS:
            return metrics_app(environ, start_response)
        if path == HEALTH_PATH:
            ok = serving()
            start_response("200 OK" if ok else "503 Service Unavailable", [("Content-Type", "text/plain")])
            return [b"SERVING\n" if ok else b"NOT_SERVING\n"]
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [f"not found: the kvbroker metrics listener serves {sorted(METRICS_PATHS)[0]} and {HEALTH_PATH}\n".encode()]

    return app


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        """No line per request on stderr (the daemon's log is for events)."""


class MetricsServer:
    """``/metrics`` and ``/healthz`` over HTTP on ``listen``, until ``stop``.

    Args:
        serving: whether the daemon serves now (``/healthz``).
    """

    def __init__(self, registry: CollectorRegistry, listen: str, serving: Callable[[], bool] = lambda: True) -> None:
        host, port = split_listen(listen)

        class Server(ThreadingWSGIServer):
            address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

        try:
            self._httpd: WSGIServer = make_server(
                host, port, routes(make_wsgi_app(registry), serving), Server, handler_class=_QuietHandler
            )
        except OSError as err:
            raise RuntimeError(f"cannot serve metrics on {listen}: {err.strerror or err}") from None
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="kvbroker-metrics", daemon=True)
        self._thread.start()
        self.port: int = self._httpd.server_port
        self.host = host

    def stop(self) -> None:
        """Stop serving (blocks up to half a second: the server's poll interval)."""
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(5)
