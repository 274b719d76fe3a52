"""How the daemon's per-call costs grow with the number of live caches (issue 9.5:
nothing proportional to all caches on the event loop).

One daemon (host device, a Unix socket, telemetry off), one pool of 4 KiB caches
(``block_bytes`` 4 KiB, 64 MiB segments). The same four measurements are taken twice in
one run: with ``SMALL`` (1,000) live caches, then with ``--caches`` (default 100,000):

- **list_page**: the first ``ListCaches`` page of 1,000 caches, median of ``--repeats``
  calls. (Also reported, not a ratio: ``list_all_pages_ms``, walking every page by token.)
- **stats**: one ``Stats`` call, median of ``5 x --repeats`` calls.
- **session_end**: 500 sessions, each a ``Watch`` stream with 3 caches of its own, end at
  once (their streams are cancelled, as when 500 worker processes die); the figure is
  the time from the cancellation until ``Stats`` shows their caches freed, divided by
  500 (per session).
- **alloc_release**: one caller (anonymous), ``--pairs`` Allocate + Release pairs of a
  4 KiB cache back to back; the figure is the time per pair.

The live caches are held by the anonymous holder (calls without a session id), so no
session holds them and they never expire; they are allocated by ``--workers`` processes,
each pipelining ``WINDOW`` calls on its own channel (setup time is reported).

Each ratio is the figure at ``--caches`` over the figure at 1,000 (for alloc_release,
time per pair; so above 1 always means slower). Target: every ratio <= 2.

Usage::

    PYTHONPATH=.:client .venv/bin/python benchmarks/scale.py [--caches 100000] [--json]

``--json``: stdout holds one JSON object (the table goes to stderr) with
``list_page_ratio``, ``stats_ratio``, ``session_end_ratio``, ``alloc_release_ratio`` and
the raw figures (``levels``, in milliseconds), ``setup_seconds`` and ``caches``. Exit code
1 when the daemon fails or does not exit 0 on SIGTERM; ``--check`` also when a ratio is
above 2.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for path in (str(REPO), str(REPO / "client")):
    if path not in sys.path:
        sys.path.insert(0, path)

import grpc  # noqa: E402
from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402

from kvbroker.v1 import broker_pb2 as pb  # noqa: E402
from kvbroker.v1 import broker_pb2_grpc  # noqa: E402

SMALL = 1_000
CACHE_BYTES = 4 * 1024
POOL = "scale"
SESSIONS = 500
CACHES_PER_SESSION = 3
PAGE = 1_000
WINDOW = 64
TARGET_RATIO = 2.0
SESSION_KEY = "kvbroker-session-id"
SECRET_KEY = "kvbroker-session-secret"

CONFIG = """
[devices]
host_capacity = "{capacity}"

[sessions]
lease_seconds = 60

[[pools]]
name = "scale"
max_bytes = "{capacity}"
segment_bytes = "64MiB"
block_bytes = "4KiB"
gc_threshold = 1.0
"""


def child_env() -> dict[str, str]:
    paths = [str(REPO), str(REPO / "client"), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- the daemon -------------------------------------------------------------------------


class Daemon:
    def __init__(self, workdir: str, capacity: str) -> None:
        self.workdir = workdir
        self.socket_path = os.path.join(workdir, "kvbroker.sock")
        self.target = f"unix:{self.socket_path}"
        self.log_path = os.path.join(workdir, "daemon.log")
        self.config_path = os.path.join(workdir, "kvbroker.toml")
        with open(self.config_path, "w") as f:
            f.write(CONFIG.format(capacity=capacity))
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        command = [
            sys.executable, "-m", "kvbroker", "serve", "--devices", "host", "--config", self.config_path,
            "--listen", f"127.0.0.1:{port}", "--unix-socket", self.socket_path, "--metrics-listen", "",
            "--grace-seconds", "2", "--log-level", "WARNING",
        ]
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(command, cwd=REPO, env=child_env(), stdout=out, stderr=out)
        deadline = time.monotonic() + 60
        with grpc.insecure_channel(self.target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"the daemon exited {self.proc.returncode}:\n{self.log_tail()}")
                try:
                    if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    time.sleep(0.1)
        raise RuntimeError(f"the daemon did not serve within 60 s:\n{self.log_tail()}")

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return None

    def log_tail(self, lines: int = 30) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return "(no log)"


# -- populating -------------------------------------------------------------------------


def populate_worker(target: str, start: int, count: int) -> None:
    """In a child process: allocate caches s<start>..s<start+count-1>, WINDOW in flight."""
    with grpc.insecure_channel(target) as channel:
        allocate = broker_pb2_grpc.CacheBrokerStub(channel).Allocate
        pending = []
        for i in range(start, start + count):
            request = pb.AllocateRequest(pool=POOL, size_bytes=CACHE_BYTES, cache_id=f"s{i:07d}")
            pending.append(allocate.future(request, timeout=120))
            if len(pending) >= WINDOW:
                pending.pop(0).result()
        for future in pending:
            future.result()


def populate(target: str, start: int, count: int, workers: int) -> float:
    """Allocate ``count`` more anonymous caches over ``workers`` processes; seconds."""
    if count <= 0:
        return 0.0
    started = time.monotonic()
    share = -(-count // workers)
    procs = []
    for w in range(workers):
        first = start + w * share
        n = min(share, start + count - first)
        if n > 0:
            procs.append(subprocess.Popen(
                [sys.executable, __file__, "--_populate", target, str(first), str(n)], cwd=REPO, env=child_env(),
            ))
    codes = [p.wait() for p in procs]
    if any(codes):
        raise RuntimeError(f"a populating process failed: exit codes {codes}")
    return time.monotonic() - started


# -- measurements -----------------------------------------------------------------------


def median_ms(samples: Sequence[float]) -> float:
    return statistics.median(samples) * 1000


def measure_list_page(stub, repeats: int) -> float:
    """The first page of 1,000 (at the small level, that is every cache)."""
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        reply = stub.ListCaches(pb.ListCachesRequest(pool=POOL, page_size=PAGE), timeout=120)
        samples.append(time.perf_counter() - started)
        assert len(reply.caches) == PAGE, len(reply.caches)
    return median_ms(samples)


def measure_list_walk(stub) -> float:
    """Every page of 1,000, by page token, from the first to the last (ms in all)."""
    started = time.perf_counter()
    token, pages = "", 0
    while True:
        reply = stub.ListCaches(pb.ListCachesRequest(pool=POOL, page_size=PAGE, page_token=token), timeout=600)
        pages += 1
        if not reply.next_page_token:
            break
        token = reply.next_page_token
    return (time.perf_counter() - started) * 1000


def measure_stats(stub, repeats: int) -> float:
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        stub.Stats(pb.StatsRequest(), timeout=60)
        samples.append(time.perf_counter() - started)
    return median_ms(samples)


def measure_alloc_release(stub, pairs: int, tag: str) -> float:
    md = ()  # the anonymous holder, as the live caches: no session to keep alive
    for i in range(20):  # warm-up
        stub.Allocate(pb.AllocateRequest(pool=POOL, size_bytes=CACHE_BYTES, cache_id=f"w-{tag}-{i}"), timeout=60, metadata=md)
        stub.Release(pb.ReleaseRequest(cache_id=f"w-{tag}-{i}"), timeout=60, metadata=md)
    started = time.perf_counter()
    for i in range(pairs):
        cache_id = f"p-{tag}-{i}"
        stub.Allocate(pb.AllocateRequest(pool=POOL, size_bytes=CACHE_BYTES, cache_id=cache_id), timeout=60, metadata=md)
        stub.Release(pb.ReleaseRequest(cache_id=cache_id), timeout=60, metadata=md)
    return (time.perf_counter() - started) / pairs * 1000


def measure_session_end(target: str, stub, tag: str) -> float:
    """500 Watch sessions with 3 caches each; cancel every stream at once; ms per session
    until Stats shows their caches freed."""
    before = stub.Stats(pb.StatsRequest(), timeout=60).total_allocated_bytes
    channels = [grpc.insecure_channel(target) for _ in range(10)]
    streams = []
    try:
        for i in range(SESSIONS):
            channel = channels[i % len(channels)]
            watch = channel.unary_stream(
                "/kvbroker.v1.CacheBroker/Watch",
                request_serializer=pb.WatchRequest.SerializeToString, response_deserializer=pb.WatchEvent.FromString,
            )
            session = f"bench-{tag}-{i}"
            call = watch(pb.WatchRequest(client_name="scale"), metadata=((SESSION_KEY, session),), timeout=600)
            first = next(call)
            assert first.kind == pb.EVENT_KIND_SESSION_OPENED, first
            md = ((SESSION_KEY, session),)
            if getattr(first, "session_secret", ""):  # a broker that issues session secrets
                md += ((SECRET_KEY, first.session_secret),)
            streams.append((call, session, channel, md))
        pending = []
        for call, session, channel, md in streams:
            allocate = broker_pb2_grpc.CacheBrokerStub(channel).Allocate
            for k in range(CACHES_PER_SESSION):
                request = pb.AllocateRequest(pool=POOL, size_bytes=CACHE_BYTES, cache_id=f"{session}-{k}")
                pending.append(allocate.future(request, timeout=120, metadata=md))
                if len(pending) >= WINDOW:
                    pending.pop(0).result()
        for future in pending:
            future.result()
        expected = before + SESSIONS * CACHES_PER_SESSION * CACHE_BYTES
        held = stub.Stats(pb.StatsRequest(), timeout=60).total_allocated_bytes
        assert held == expected, (held, expected)

        started = time.perf_counter()
        for call, *_ in streams:
            call.cancel()
        deadline = time.monotonic() + 600
        while stub.Stats(pb.StatsRequest(), timeout=60).total_allocated_bytes != before:
            if time.monotonic() > deadline:
                raise RuntimeError("the 500 sessions did not end within 600 s")
            time.sleep(0.002)
        return (time.perf_counter() - started) / SESSIONS * 1000
    finally:
        for call, *_ in streams:
            call.cancel()
        for channel in channels:
            channel.close()


def measure_level(target: str, repeats: int, pairs: int, tag: str) -> dict[str, float]:
    with grpc.insecure_channel(target) as channel:
        stub = broker_pb2_grpc.CacheBrokerStub(channel)
        live = stub.Stats(pb.StatsRequest(), timeout=60).active_caches
        figures = {"live_caches": live}
        figures["list_page_ms"] = measure_list_page(stub, repeats)
        figures["stats_ms"] = measure_stats(stub, repeats * 5)
        figures["session_end_ms"] = measure_session_end(target, stub, tag)
        figures["alloc_release_ms"] = measure_alloc_release(stub, pairs, tag)
        figures["list_page_ms_again"] = measure_list_page(stub, repeats)  # drift check
        figures["list_all_pages_ms"] = measure_list_walk(stub)
    return figures


# -- main -------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--caches", type=int, default=100_000, help="live caches at the large level (default 100000)")
    parser.add_argument("--workers", type=int, default=4, help="processes that allocate the live caches")
    parser.add_argument("--repeats", type=int, default=20, help="ListCaches pages per level (Stats: 5x)")
    parser.add_argument("--pairs", type=int, default=1_000, help="Allocate+Release pairs per level")
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    parser.add_argument("--check", action="store_true", help="exit 1 when a ratio is above 2")
    parser.add_argument("--_populate", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not args._populate and args.caches < 2 * SMALL:
        parser.error(f"--caches must be at least {2 * SMALL}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args._populate:
        target, start, count = args._populate
        populate_worker(target, int(start), int(count))
        return 0

    extra = SESSIONS * CACHES_PER_SESSION + 64
    capacity_mib = -(-((args.caches + extra) * CACHE_BYTES) // (1 << 20)) + 128
    result: dict = {"caches": args.caches, "small": SMALL, "levels": {}}
    with tempfile.TemporaryDirectory(prefix="kvb-scale-") as workdir:
        daemon = Daemon(workdir, f"{capacity_mib}MiB")
        daemon.start()
        failed = False
        try:
            setup = populate(daemon.target, 0, SMALL, args.workers)
            log(f"{SMALL} caches in {setup:.1f} s; measuring")
            result["levels"][str(SMALL)] = measure_level(daemon.target, args.repeats, args.pairs, "small")
            grown = populate(daemon.target, SMALL, args.caches - SMALL, args.workers)
            result["setup_seconds"] = setup + grown
            log(f"{args.caches} caches in {setup + grown:.1f} s ({(args.caches - SMALL) / grown:.0f} allocations/s); measuring")
            result["levels"][str(args.caches)] = measure_level(daemon.target, args.repeats, args.pairs, "large")
        except BaseException:
            failed = True
            log(daemon.log_tail())
            raise
        finally:
            code = daemon.stop()
            result["daemon_exit_code"] = code
            if code != 0 and not failed:
                log(f"the daemon exited {code}:\n{daemon.log_tail()}")

    small, large = result["levels"][str(SMALL)], result["levels"][str(args.caches)]
    for key in ("list_page", "stats", "session_end", "alloc_release"):
        result[f"{key}_ratio"] = large[f"{key}_ms"] / small[f"{key}_ms"]

    lines = [
        f"kvbroker scale: {SMALL} vs {args.caches} live caches of 4 KiB (setup {result['setup_seconds']:.1f} s)",
        f"{'':28}{SMALL:>12}{args.caches:>12}{'ratio':>9}",
    ]
    for key, label in (
        ("list_page", "ListCaches page of 1000"),
        ("stats", "Stats"),
        ("session_end", "session end (per session)"),
        ("alloc_release", "Allocate+Release pair"),
    ):
        ratio = result[f"{key}_ratio"]
        flag = "" if ratio <= TARGET_RATIO else "  > 2x"
        lines.append(f"{label:28}{small[key + '_ms']:>10.3f}ms{large[key + '_ms']:>10.3f}ms{ratio:>8.2f}x{flag}")
    table = "\n".join(lines)
    if args.json:
        log(table)
        print(json.dumps(result, indent=2, sort_keys=True))
    else:
        print(table)
    bad = result["daemon_exit_code"] != 0
    if args.check:
        bad = bad or any(result[f"{k}_ratio"] > TARGET_RATIO for k in ("list_page", "stats", "session_end", "alloc_release"))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
