"""What telemetry costs an Allocate: the same daemon with telemetry off and on, one run.

Three daemons run side by side (each ``python -m kvbroker serve --devices host``, its own
Unix socket, ``--listen 127.0.0.1:0``, started by tests/support/daemon.py through
benchmarks/harness.py):

- **off**: ``--metrics-listen ''`` and no ``OTEL_*`` variable: no interceptor, the
  engine's ``NullObserver``, no thread or socket of telemetry's.
- **prometheus**: the default configuration, ``/metrics`` on a free port, scraped every
  second by a thread of this script while it measures (a scrape interval 15x shorter than
  Prometheus's default, so scrapes land among the timed calls).
- **otel**: the same plus ``OTEL_EXPORTER_OTLP_ENDPOINT`` to an OTLP/gRPC sink in this
  process (a span per RPC with its inner spans, batched; metrics pushed every second).

One sync ``grpc`` channel per daemon over its Unix socket, the generated stubs, the
``kvbroker-session-id`` metadata and a 10 s deadline on every call (what
``kvbroker_client`` sends). Each round allocates 1 MiB in pool ``default`` (timed with
``perf_counter_ns``) and releases it (untimed) on each daemon, in an order shuffled every
round, so machine noise hits all three alike and no daemon always follows another (the
otel daemon ends its spans just after answering, which slows whichever call comes next
on 2 cores); warm-up rounds first (not recorded), the garbage collector off during the
loop. Percentiles are nearest-rank. The ratio is on/off at the same percentile.

Target (the telemetry issue): the prometheus/off ratio at P50 <= 1.10.

Usage::

    PYTHONPATH=.:client .venv/bin/python benchmarks/telemetry_overhead.py [--iterations N] [--quick] [--json] [--check]

``--json`` prints one JSON object on stdout (the table goes to stderr); ``--check`` exits 1
when the target is missed. About 30 s on 2 vCPUs (10 s with ``--quick``).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import sys
import threading
import time
import urllib.request
from concurrent import futures
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the checkout: benchmarks, tests, kvbroker

import grpc  # noqa: E402

from benchmarks import harness  # noqa: E402
from kvbroker.v1 import broker_pb2 as pb  # noqa: E402
from kvbroker.v1 import broker_pb2_grpc  # noqa: E402

MODES = ("off", "prometheus", "otel")
TARGET_P50_RATIO = 1.10


class Sink:
    """A minimal OTLP/gRPC receiver that counts what it gets."""

    def __init__(self) -> None:
        from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

        self.spans = 0
        self.metric_exports = 0
        sink = self

        class Traces(trace_service_pb2_grpc.TraceServiceServicer):
            def Export(self, request, context):
                sink.spans += sum(len(ss.spans) for rs in request.resource_spans for ss in rs.scope_spans)
                return trace_service_pb2.ExportTraceServiceResponse()

        class Metrics(metrics_service_pb2_grpc.MetricsServiceServicer):
            def Export(self, request, context):
                sink.metric_exports += 1
                return metrics_service_pb2.ExportMetricsServiceResponse()

        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Traces(), self.server)
        metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(Metrics(), self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()


class Daemon:
    """One daemon of a telemetry mode (tests/support/daemon.py starts it: host device,
    gRPC on 127.0.0.1 port 0 and a private Unix socket, no inherited OTEL_*/KVBROKER_*
    variable), and one channel to it."""

    def __init__(self, mode: str, sink: Sink, stack: contextlib.ExitStack) -> None:
        self.mode = mode
        env = {}
        if mode == "otel":
            env = {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{sink.port}", "OTEL_METRIC_EXPORT_INTERVAL": "1000"}
        self.daemon = stack.enter_context(harness.daemon(host_capacity="512MiB", metrics=mode != "off", env=env))
        self.metrics_url = self.daemon.metrics_url
        self.channel = grpc.insecure_channel(self.daemon.target)
        self.stub = broker_pb2_grpc.CacheBrokerStub(self.channel)

    def stop(self) -> int:
        self.channel.close()
        return self.daemon.stop()


def percentile(sorted_ns: list[int], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..1), in milliseconds."""
    return harness.percentile(sorted_ns, q * 100) / 1e6


def scrape_forever(urls: list[str], stop: threading.Event, counter: list[int]) -> None:
    while not stop.wait(1.0):
        for url in urls:
            with urllib.request.urlopen(url, timeout=10) as reply:
                reply.read()
            counter[0] += 1


def run(iterations: int, warmup: int) -> dict:
    sink = Sink()
    with contextlib.ExitStack() as stack:
        daemons = [Daemon(mode, sink, stack) for mode in MODES]
        metadata = {d.mode: harness.metadata("bench-telemetry", d.daemon.target) for d in daemons}
        request = pb.AllocateRequest(pool="default", size_bytes=1 << 20)
        samples: dict[str, list[int]] = {d.mode: [] for d in daemons}
        stop, scrapes = threading.Event(), [0]
        urls = [d.metrics_url for d in daemons if d.metrics_url]
        scraper = threading.Thread(target=scrape_forever, args=(urls, stop, scrapes), daemon=True)
        exit_codes = {}
        rng = harness.seeded_rng(0)
        try:
            gc.disable()
            for i in range(warmup + iterations):
                if i == warmup:
                    scraper.start()
                rng.shuffle(daemons)
                for d in daemons:
                    started = time.perf_counter_ns()
                    reply = d.stub.Allocate(request, metadata=metadata[d.mode], timeout=10)
                    elapsed = time.perf_counter_ns() - started
                    d.stub.Release(pb.ReleaseRequest(cache_id=reply.cache.cache_id), metadata=metadata[d.mode], timeout=10)
                    if i >= warmup:
                        samples[d.mode].append(elapsed)
        finally:
            gc.enable()
            stop.set()
            if scraper.is_alive():
                scraper.join(15)
            for d in daemons:
                exit_codes[d.mode] = d.stop()  # a daemon flushes its exporters before it exits
        sink.server.stop(None)
    result: dict = {"iterations": iterations, "scrapes": scrapes[0], "otlp_spans": sink.spans,
                    "otlp_metric_exports": sink.metric_exports, "exit_codes": exit_codes}  # fmt: skip
    for mode in MODES:
        ns = sorted(samples[mode])
        result[f"{mode}_p50_ms"] = percentile(ns, 0.50)
        result[f"{mode}_p99_ms"] = percentile(ns, 0.99)
    for mode in MODES[1:]:
        for q in ("p50", "p99"):
            result[f"{mode}_{q}_ratio"] = result[f"{mode}_{q}_ms"] / result[f"off_{q}_ms"]
    result["target_p50_ratio"] = TARGET_P50_RATIO
    result["target_met"] = result["prometheus_p50_ratio"] <= TARGET_P50_RATIO
    return result


def table(r: dict) -> str:
    lines = [f"Allocate 1 MiB, {r['iterations']} interleaved rounds; {r['scrapes']} scrapes, "
             f"{r['otlp_spans']} spans and {r['otlp_metric_exports']} metric pushes received", "",
             f"{'telemetry':<12}{'P50 ms':>9}{'P99 ms':>9}{'P50 ratio':>11}{'P99 ratio':>11}"]  # fmt: skip
    for mode in MODES:
        ratios = ("", "") if mode == "off" else (f"{r[f'{mode}_p50_ratio']:.3f}", f"{r[f'{mode}_p99_ratio']:.3f}")
        lines.append(f"{mode:<12}{r[f'{mode}_p50_ms']:>9.3f}{r[f'{mode}_p99_ms']:>9.3f}{ratios[0]:>11}{ratios[1]:>11}")
    verdict = "met" if r["target_met"] else "MISSED"
    lines += ["", f"target: prometheus P50 ratio <= {TARGET_P50_RATIO:.2f}: {verdict}"]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=3000)
    parser.add_argument("--warmup", type=int, default=300)
    parser.add_argument("--quick", action="store_true", help="800 rounds")
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout, the table on stderr")
    parser.add_argument("--check", action="store_true", help="exit 1 when the target is missed")
    args = parser.parse_args()
    result = run(800 if args.quick else args.iterations, min(args.warmup, 100) if args.quick else args.warmup)
    harness.emit(result, table(result), as_json=args.json, indent=2)
    failed = any(code != 0 for code in result["exit_codes"].values())
    return 1 if failed or (args.check and not result["target_met"]) else 0


if __name__ == "__main__":
    sys.exit(main())
