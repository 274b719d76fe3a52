"""One daemon run's telemetry, assembled: the recorder, the engine's observer, the RPC
interceptor, the ``/metrics`` server and the OpenTelemetry exporters.

Lifecycle (driven by ``kvbroker.daemon``): ``Telemetry.create`` before the engine (the
engine takes ``observer``, the gRPC server takes ``interceptors``); ``start`` once the
engine exists and before the gRPC server starts (it binds the metrics address, so a
clash stops the start); ``stop`` after the gRPC server stopped (a last metrics push,
spans flushed, the HTTP server closed).

Off means off: with ``metrics_listen`` empty and no ``OTEL_*`` exporter configured,
``observer`` is the engine's ``NullObserver``, there is no interceptor, and no thread or
socket is opened. (``kvbroker stats`` then shows no latencies: they come from the same
recorder.)
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any

import grpc

from kvbroker.engine import Engine, NullObserver, Observer
from kvbroker.telemetry.interceptor import TelemetryInterceptor
from kvbroker.telemetry.observer import TelemetryObserver
from kvbroker.telemetry.otel import (
    MetricsPusher,
    OtelSettings,
    make_metric_exporter,
    make_resource,
    make_tracer_provider,
)
from kvbroker.telemetry.prometheus import MetricsServer, registry_for
from kvbroker.telemetry.readings import SnapshotSource
from kvbroker.telemetry.recorder import Recorder

log = logging.getLogger(__name__)


class Telemetry:
    """Build with ``create``; see the module docstring for the order of calls."""

    def __init__(self, *, metrics_listen: str, otel: OtelSettings, recorder: Recorder | None,
                 resource: Any = None, tracer_provider: Any = None) -> None:  # fmt: skip
        self.metrics_listen = metrics_listen
        self.otel = otel
        self.recorder = recorder
        self._resource = resource
        self._tracer_provider = tracer_provider
        tracer = tracer_provider.get_tracer("kvbroker") if tracer_provider is not None else None
        self.observer: Observer = TelemetryObserver(recorder, tracer) if recorder is not None else NullObserver()
        self.interceptors: tuple[grpc.aio.ServerInterceptor, ...] = (
            (TelemetryInterceptor(recorder, tracer),) if recorder is not None else ()
        )
        self.metrics_server: MetricsServer | None = None
        self._source: SnapshotSource | None = None
        self._pusher: MetricsPusher | None = None
        #: Read by ``/healthz``; the daemon sets it once gRPC serves and clears it at shutdown.
        self.serving = False

    @classmethod
    def create(cls, *, instance_id: str, pools: tuple[str, ...], metrics_listen: str,
               environ: Mapping[str, str], methods: tuple[str, ...] = ()) -> Telemetry:  # fmt: skip
        """Read the ``OTEL_*`` variables and build what is enabled (nothing is bound or
        started yet). ``methods``: the CacheBroker methods (their error counters start at
        0). Raises ``ValueError`` naming an unsupported ``OTEL_*`` value."""
        otel = OtelSettings.from_env(environ)
        if not metrics_listen and not otel.enabled:
            return cls(metrics_listen="", otel=otel, recorder=None)
        resource = make_resource(instance_id, environ) if otel.enabled else None
        provider = make_tracer_provider(otel, resource) if otel.traces else None
        return cls(metrics_listen=metrics_listen, otel=otel, recorder=Recorder(pools, methods=methods),
                   resource=resource, tracer_provider=provider)  # fmt: skip

    async def start(self, engine: Engine) -> None:
        """Serve ``/metrics`` and start pushing OTLP metrics. Call on the engine's loop.

        Raises:
            RuntimeError: the metrics address could not be bound (named in the message).
        """
        if self.recorder is None:
            return
        self._source = SnapshotSource(engine.stats, self.recorder, asyncio.get_running_loop(), engine.live)
        if self.metrics_listen:
            self.metrics_server = MetricsServer(
                registry_for(self._source), self.metrics_listen, serving=lambda: self.serving
            )
            log.info("metrics on http://%s:%d/metrics (health: /healthz)",
                     self.metrics_server.host, self.metrics_server.port)  # fmt: skip
        if self.otel.metrics:
            self._pusher = MetricsPusher(
                make_metric_exporter(self.otel), self._resource, self._source.take_threadsafe,
                self.otel.metric_interval_s,
            )  # fmt: skip
            self._pusher.start()
        if self.otel.enabled:
            log.info("OpenTelemetry: traces %s, metrics %s", self.otel.traces or "off", self.otel.metrics or "off")

    async def stop(self) -> None:
        """Flush and close everything ``start`` opened. Idempotent."""
        if self._pusher is not None:
            final = self._source.take() if self._source is not None else None
            pusher, self._pusher = self._pusher, None
            await asyncio.to_thread(pusher.stop, final)
        if self._tracer_provider is not None:
            provider, self._tracer_provider = self._tracer_provider, None
            await asyncio.to_thread(provider.shutdown)
        if self.metrics_server is not None:
            server, self.metrics_server = self.metrics_server, None
            await asyncio.to_thread(server.stop)
