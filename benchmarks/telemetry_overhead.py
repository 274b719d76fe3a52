"""What telemetry costs an Allocate: the same daemon with telemetry off and on, one run.

Three daemons run side by side (each ``python -m kvbroker serve --devices host``, its own
Unix socket, ``--listen 127.0.0.1:0``):

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
import gc
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent import futures
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "client")]

from kvbroker.v1 import broker_pb2 as pb  # noqa: E402
from kvbroker.v1 import broker_pb2_grpc  # noqa: E402

MODES = ("off", "prometheus", "otel")
TARGET_P50_RATIO = 1.10


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
    def __init__(self, mode: str, tmp: Path, sink: Sink) -> None:
        self.mode = mode
        self.socket = str(tmp / f"{mode}.sock")
        self.log_path = tmp / f"{mode}.log"
        self.metrics_port = free_port() if mode != "off" else None
        env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "KVBROKER_"))}
        env["PYTHONPATH"] = f"{REPO}:{REPO / 'client'}"
        if mode == "otel":
            env.update(OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{sink.port}", OTEL_METRIC_EXPORT_INTERVAL="1000")
        metrics = f"127.0.0.1:{self.metrics_port}" if self.metrics_port else ""
        cmd = [sys.executable, "-m", "kvbroker", "serve", "--devices", "host", "--listen", "127.0.0.1:0",
               "--unix-socket", self.socket, "--host-capacity", "512MiB", "--metrics-listen", metrics]  # fmt: skip
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        self.channel = grpc.insecure_channel(f"unix://{self.socket}")
        self.stub = broker_pb2_grpc.CacheBrokerStub(self.channel)
        deadline = time.monotonic() + 60
        health = health_pb2_grpc.HealthStub(self.channel)
        while True:
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"daemon {mode} did not start:\n{self.log_path.read_text()}")
            try:
                health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                break
            except grpc.RpcError:
                time.sleep(0.1)

    def stop(self) -> int:
        self.channel.close()
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(30)


def percentile(sorted_ns: list[int], q: float) -> float:
    """Nearest-rank percentile, in milliseconds."""
    k = max(0, min(len(sorted_ns) - 1, int(-(-q * len(sorted_ns) // 1)) - 1))
    return sorted_ns[k] / 1e6


def scrape_forever(urls: list[str], stop: threading.Event, counter: list[int]) -> None:
    while not stop.wait(1.0):
        for url in urls:
            with urllib.request.urlopen(url, timeout=10) as reply:
                reply.read()
            counter[0] += 1


def run(iterations: int, warmup: int) -> dict:
    sink = Sink()
    with tempfile.TemporaryDirectory(prefix="kvb-telemetry-bench-") as tmp:
        daemons = [Daemon(mode, Path(tmp), sink) for mode in MODES]
        metadata = (("kvbroker-session-id", "bench-telemetry"),)
        request = pb.AllocateRequest(pool="default", size_bytes=1 << 20)
        samples: dict[str, list[int]] = {d.mode: [] for d in daemons}
        stop, scrapes = threading.Event(), [0]
        urls = [f"http://127.0.0.1:{d.metrics_port}/metrics" for d in daemons if d.metrics_port]
        scraper = threading.Thread(target=scrape_forever, args=(urls, stop, scrapes), daemon=True)
        exit_codes = {}
        rng = random.Random(0)
        try:
            gc.disable()
            for i in range(warmup + iterations):
                if i == warmup:
                    scraper.start()
                rng.shuffle(daemons)
                for d in daemons:
                    started = time.perf_counter_ns()
                    reply = d.stub.Allocate(request, metadata=metadata, timeout=10)
                    elapsed = time.perf_counter_ns() - started
                    d.stub.Release(pb.ReleaseRequest(cache_id=reply.cache.cache_id), metadata=metadata, timeout=10)
                    if i >= warmup:
                        samples[d.mode].append(elapsed)
        finally:
            gc.enable()
            stop.set()
            if scraper.is_alive():
                scraper.join(15)
            for d in daemons:
                exit_codes[d.mode] = d.stop()
        time.sleep(0.2)
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
    print(table(result), file=sys.stderr if args.json else sys.stdout)
    if args.json:
        print(json.dumps(result, indent=2))
    failed = any(code != 0 for code in result["exit_codes"].values())
    return 1 if failed or (args.check and not result["target_met"]) else 0


if __name__ == "__main__":
    sys.exit(main())
