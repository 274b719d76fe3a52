"""Telemetry: one metric catalogue exported to Prometheus (``/metrics``) and over OTLP,
RPC spans, and the latency figures of ``kvbroker stats``.

    catalogue    every metric: name, kind, unit, help, labels (the one source of names)
    histogram    fixed-bucket histograms, cumulative and windowed
    recorder     series fed by hooks: allocations, waits, compactions, sessions, RPCs
    readings     one snapshot on the event loop -> every catalogue metric's points
    prometheus   a custom collector over readings, served by prometheus_client
    otel         OTEL_* settings, resource, tracer provider, OTLP metric pushes
    observer     the engine's Observer: hooks -> recorder, spans -> tracer
    interceptor  grpc.aio interceptor: RPC durations and codes, server spans
    service      assembly and lifecycle for the daemon

Imports the engine (for the Observer seam) and the core, never the server: the daemon
wires the interceptor into the gRPC server.
"""
