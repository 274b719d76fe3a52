"""RPC latency, throughput and zero-copy hand-off of a running kvbroker (DESIGN.md section 10).

Everything runs in one invocation, against one daemon that this script starts:

    python -m kvbroker serve --devices host --listen 127.0.0.1:0 \\
        --unix-socket <tmpdir>/kvbroker.sock --host-capacity 3GiB

(``--listen 127.0.0.1:0``: the kernel picks a free TCP port, so two runs never clash;
every RPC goes through the Unix socket, as a co-located worker's would.) The script waits
for ``grpc.health.v1.Health`` to report SERVING, and at the end stops the daemon with
SIGTERM and checks that it exits 0. The daemon's log goes to a temporary file and is
printed only if the daemon fails.

1. One caller: latency of each method, as ratios to the floor
--------------------------------------------------------------

One sync ``grpc`` channel over the Unix socket and the generated stubs (no client class),
the same channel for every method. Every call carries what ``kvbroker_client`` sends: the
``kvbroker-session-id`` metadata and a 10 s deadline, the floor included, so the only
difference between the floor and a broker method is the work behind the method.

- **floor**: ``grpc.health.v1.Health/Check`` on the daemon: an empty RPC through the
  same grpc.aio server, the same Python handler machinery and the same socket.
- **allocate**: ``Allocate`` of 1 MiB in pool ``default`` (timed alone); the matching
  ``Release`` follows at once and is timed separately (**release**); **allocate+release**
  is the pair from the start of Allocate to the end of Release. After the warm-up the
  pool's 256 MiB segment exists, so this is the steady state: no segment creation.
- **attach**: ``Attach`` of one live 1 MiB cache (the holder set makes it idempotent).
- **stats**: ``Stats``.

Warm-up rounds first (not recorded), then ``--iterations`` rounds. Each round calls
floor, allocate(+release), attach, stats in that order, so noise from other jobs on the
machine hits every method alike. Times are ``time.perf_counter_ns`` around the stub call;
the garbage collector is off during the loop. Percentiles are nearest-rank. Each method's
P50/P90/P99 is divided by the floor's same percentile.

2. One and eight callers: throughput and latency
------------------------------------------------

N callers (N = 1, then 8), each a **separate process** with its own channel and its own
session id, run the floor and allocate(+release) in alternating timed windows (the same
wall-clock windows for every caller, from a shared ``CLOCK_MONOTONIC`` start). A call
counts if it ends inside its window; throughput is calls / window seconds summed over
callers. For allocate, a "call" is an Allocate (timed) followed by its Release
(untimed), so ``rpc_per_s`` counts both RPCs and ``pairs_per_s`` the pairs.

Why processes and not threads: the deployment this models is N worker processes on one
node, each with its own channel; and a sync grpc client in Python spends about 0.35 ms of
CPU per call, much of it holding the GIL (research/baselines.md section 1 and the CPU
table below), so N threads in one process serialize their client-side work on one GIL
and the percentiles include GIL waits. Measured side by side on the 2-vCPU machine
(``--callers-mode threads`` runs the same loop in threads; two alternating runs, other
jobs sharing the machine): at 8 callers, threads gave 583-635 allocate pairs/s at P50
7.0-7.3 ms, processes 710-763 pairs/s at P50 4.9-5.4 ms; the floor was 1,200-1,240 vs
1,140-1,340 RPC/s. So threads understate allocate throughput by about 20 % and add
about 2 ms to its P50; processes are the default. Either way both cores are saturated at
8 callers (the daemon's grpc.aio machinery alone costs about 0.6 ms of CPU per RPC), so
the 8-caller percentiles are queueing under load, not service time.

3. Hand-off: a second process holds a usable tensor (1 MiB and 1 GiB)
---------------------------------------------------------------------

This process (the producer) allocates a 1 MiB and a 1 GiB cache in pool ``default`` (the
1 GiB one gets its own segment; the 1 MiB one lives in the shared 256 MiB segment), maps
them and writes a salted 4 KiB-periodic byte pattern. Then a fresh Python process (the
consumer; ``--handoff-runs`` of them, default 3, median reported) with its own session
id:

- warms its channels and torch (Health and an Attach of another cache, a small stream,
  a small reduction: connections up, method paths warm, the measured segments never
  mapped);
- before every measured call, settles: ``gc.collect()`` then 20 ms without RPCs, the
  state of a worker that was busy elsewhere (see "cold floor" below);
- **attach hold**: from just before the ``Attach`` RPC to holding a float16 tensor over
  the cache: the RPC plus ``SegmentMapper(populate=False).view(handle, float16, ...)``,
  the first mapping of that segment in that process (breakdown: ``rpc_ms``, ``map_ms``).
  The 1 MiB cache is attached first, so it also pays the first-use cost of the mapping
  code in the process;
- **first read**: one full read pass over the tensor (an int64 sum over the bytes: the
  page faults of a first touch are paid here), then the checksum and a few pattern bytes
  are checked against what the producer wrote;
- **remap**: then a few more attach + map + read cycles per cache, each with a new
  ``SegmentMapper`` (a new mmap, empty page tables), for more samples of the same path;
- **stream**: the same bytes through a gRPC server-streaming call from a throwaway gRPC
  server that this script runs (sync ``grpc.server``, a generic handler with identity
  serializers, 4 MiB ``bytes`` chunks prepared before the clock starts, over a Unix
  socket): from just before the call to having every byte in one buffer (a tensor
  allocated and touched before the clock starts, so the copy approach gets its best
  case), then the same read pass and checks.

``attach_1gib_ms`` is the 1 GiB attach hold (first in process, median over consumers);
``*_usable_ms`` adds the first read; ``stream_vs_attach_*_ratio`` = stream / attach hold.

Targets (section 10)
--------------------

Allocate P50 <= 1.2x and P99 <= 2x the floor's, one caller; 1 GiB attach hold <= 2 ms.

Output
------

A table on stdout. With ``--json``, stdout holds exactly one JSON object (the table goes
to stderr) with at least ``floor_p50_ms``, ``allocate_p50_ms``, ``allocate_p99_ms``,
``allocate_p50_ratio``, ``allocate_p99_ratio`` and ``attach_1gib_ms``, plus every other
figure, the per-caller-count results (``callers``), the hand-off (``handoff``) and
``targets``. ``--check`` exits 1 when a target is missed. The exit code is also 1 when
the daemon did not exit 0 on SIGTERM or a check of the handed-off bytes failed.

Usage::

    cd /work/main && PYTHONPATH=.:client .venv/bin/python benchmarks/rpc_latency.py \\
        [--quick] [--iterations N] [--json] [--check] [--callers-mode processes|threads]

Run time on 2 vCPUs: about 1.5 minutes in full (plus up to ``--wait-idle`` seconds), about
30 s with ``--quick``.

Also measured
-------------

- **CPU per call**: batches of back-to-back calls of each method (not interleaved), the
  daemon's user+system CPU from ``/proc/<pid>/stat`` (10 ms ticks, hence the batch size)
  and this process's ``time.process_time``. ``extra`` is the daemon CPU above the floor's:
  the cost of the method's own work, which noise from other jobs hardly moves.
- **Cold floor**: in the consumer, ``Health/Check`` after the same 20 ms of idleness as the
  hand-off calls. An isolated RPC costs more than one in a hot loop (about 1.5-2 ms vs
  0.6-0.9 ms here: the threads on both sides have gone to sleep), so the attach hold is
  also shown as a ratio to this cold floor.
- **Machine noise**: before each phase the script waits (``--wait-idle`` seconds in all,
  default 10) for the machine to be less than 15 % busy, and records what it saw
  (``noise``). Other jobs share the development machine; figures move by 10 % or more.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import importlib.util
import json
import math
import os
import platform
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent import futures
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
for _path in (str(REPO / "client"), str(REPO)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

import grpc  # noqa: E402
from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402

from kvbroker.v1 import broker_pb2 as pb  # noqa: E402
from kvbroker.v1 import broker_pb2_grpc  # noqa: E402

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
SESSION_METADATA_KEY = "kvbroker-session-id"
CALL_TIMEOUT_S = 10.0
POOL = "default"
ALLOC_BYTES = 1 * MiB
HOST_CAPACITY = "3GiB"
STREAM_CHUNK_BYTES = 4 * MiB
STREAM_METHOD = "/kvbench.ByteStream/Get"
PATTERN_PERIOD = 4 * KiB
HANDOFF_SIZES = (("1mib", 1 * MiB), ("1gib", 1 * GiB))
#: Idle time before each measured hand-off call, and how many cold floor calls to take.
COLD_IDLE_S = 0.02
COLD_FLOOR_SAMPLES = 5
DAEMON_START_TIMEOUT_S = 120.0
DAEMON_STOP_TIMEOUT_S = 30.0
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 64 * MiB),
    ("grpc.max_send_message_length", 64 * MiB),
]

TARGET_ALLOCATE_P50_RATIO = 1.2
TARGET_ALLOCATE_P99_RATIO = 2.0
TARGET_ATTACH_1GIB_MS = 2.0


# -- small helpers ----------------------------------------------------------------------


def child_env() -> dict[str, str]:
    """The environment of every child process: the repo and the client importable."""
    env = dict(os.environ)
    paths = [str(REPO), str(REPO / "client")]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    return env


def metadata(session: str) -> tuple[tuple[str, str], ...]:
    return ((SESSION_METADATA_KEY, session),)


def new_session(role: str) -> str:
    return f"bench-{role}-{os.getpid()}-{secrets.token_hex(4)}"


def percentile(sorted_values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile of an ascending sequence."""
    if not sorted_values:
        return float("nan")
    rank = max(1, math.ceil(p / 100.0 * len(sorted_values)))
    return sorted_values[rank - 1]


def summarize_ns(samples_ns: Sequence[int]) -> dict[str, float]:
    """P50/P90/P99/mean/max in milliseconds of a list of nanosecond durations."""
    ms = sorted(s / 1e6 for s in samples_ns)
    if not ms:
        return {"n": 0}
    return {
        "n": len(ms),
        "p50_ms": percentile(ms, 50),
        "p90_ms": percentile(ms, 90),
        "p99_ms": percentile(ms, 99),
        "mean_ms": statistics.fmean(ms),
        "max_ms": ms[-1],
    }


def ratios(summary: dict[str, float], floor: dict[str, float]) -> dict[str, float]:
    return {f"p{p}_ratio": summary[f"p{p}_ms"] / floor[f"p{p}_ms"] for p in (50, 90, 99)}


def import_segment_mapper() -> tuple[type, str]:
    """``SegmentMapper``, from the package, or straight from its file.

    The client package's ``__init__`` also imports the client class, which may be in the
    middle of an edit; ``mapping.py`` itself depends only on torch and the wire code.
    """
    try:
        from kvbroker_client.mapping import SegmentMapper

        return SegmentMapper, "kvbroker_client.mapping"
    except ImportError:
        path = REPO / "client" / "kvbroker_client" / "mapping.py"
        spec = importlib.util.spec_from_file_location("_kvbench_mapping", path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        return module.SegmentMapper, str(path)


# -- the byte pattern of the hand-off ---------------------------------------------------


def pattern_row(salt: int) -> bytes:
    """One period of the pattern: byte j is (j * 7 + salt) mod 251 (never all equal)."""
    return bytes((j * 7 + salt) % 251 for j in range(PATTERN_PERIOD))


def pattern_checksum(salt: int, nbytes: int) -> int:
    """What ``tensor.view(int64).sum()`` gives over ``nbytes`` of the pattern: the sum of
    its little-endian int64 words, wrapping like torch's int64 adds."""
    row = pattern_row(salt)
    words = sum(int.from_bytes(row[i : i + 8], "little", signed=True) for i in range(0, len(row), 8))
    total = (words * (nbytes // PATTERN_PERIOD)) % (1 << 64)
    return total - (1 << 64) if total >= 1 << 63 else total


def sample_offsets(nbytes: int) -> list[int]:
    offsets = {0, 1, 4095, 4096, nbytes // 2 + 3, nbytes - 8, nbytes - 1}
    step = max(1, nbytes // 13)
    offsets.update(range(7, nbytes, step))
    return sorted(o for o in offsets if 0 <= o < nbytes)


def write_pattern(view_u8: Any, salt: int) -> None:
    """Fill a uint8 tensor with the pattern: one row, then doubling copies (memcpy)."""
    import torch

    n = view_u8.numel()
    assert n % PATTERN_PERIOD == 0, n
    view_u8[:PATTERN_PERIOD].copy_(torch.frombuffer(bytearray(pattern_row(salt)), dtype=torch.uint8))
    filled = PATTERN_PERIOD
    while filled < n:
        step = min(filled, n - filled)
        view_u8[filled : filled + step].copy_(view_u8[:step])
        filled += step


def check_bytes(view_u8: Any, salt: int, checksum: int) -> dict[str, Any]:
    row = pattern_row(salt)
    n = view_u8.numel()
    expected = pattern_checksum(salt, n)
    bad = [o for o in sample_offsets(n) if int(view_u8[o].item()) != row[o % PATTERN_PERIOD]]
    return {"checksum_ok": checksum == expected, "samples_ok": not bad, "bad_offsets": bad[:5]}


# -- machine noise ----------------------------------------------------------------------


def cpu_busy(sample_s: float = 0.5) -> float:
    """Fraction of all CPUs busy over ``sample_s`` (from /proc/stat); NaN off Linux."""

    def read() -> tuple[int, int]:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
        return idle, sum(fields[:8])

    try:
        idle0, total0 = read()
        time.sleep(sample_s)
        idle1, total1 = read()
    except OSError:
        return float("nan")
    return 1.0 - (idle1 - idle0) / max(1, total1 - total0)


def wait_idle(max_wait_s: float, threshold: float = 0.15) -> tuple[float, float]:
    """Wait (at most ``max_wait_s``) until the machine is < ``threshold`` busy, as the
    baselines did: other jobs share it. Returns (busy fraction last seen, seconds waited)."""
    started = time.monotonic()
    busy = cpu_busy()
    while busy >= threshold and time.monotonic() - started < max_wait_s:
        busy = cpu_busy()
    return busy, time.monotonic() - started


# -- the daemon -------------------------------------------------------------------------


class Daemon:
    """A kvbroker daemon in a child process, serving the host device on a Unix socket."""

    def __init__(self, workdir: str) -> None:
        self.socket_path = os.path.join(workdir, "kvbroker.sock")
        self.target = f"unix:{self.socket_path}"
        self.log_path = os.path.join(workdir, "daemon.log")
        self.proc: subprocess.Popen[bytes] | None = None
        self.command: list[str] = []
        self.exit_code: int | None = None
        self.start_seconds = float("nan")

    def _commands(self) -> list[list[str]]:
        flags = [
            "--devices", "host", "--listen", "127.0.0.1:0",
            "--unix-socket", self.socket_path, "--host-capacity", HOST_CAPACITY,
            "--metrics-listen", "127.0.0.1:0",
        ]
        via_daemon = [
            sys.executable, "-c",
            "import sys; from kvbroker.daemon import main; sys.exit(main(sys.argv[1:]))", *flags,
        ]
        if (REPO / "kvbroker" / "cli.py").exists():
            # The command line first; the bare daemon entry point if the CLI cannot start
            # (it imports the client package, which may be mid-edit).
            return [[sys.executable, "-m", "kvbroker", "serve", *flags], via_daemon]
        return [via_daemon]

    def start(self) -> None:
        errors = []
        for command in self._commands():
            started = time.monotonic()
            with open(self.log_path, "ab") as log:
                self.proc = subprocess.Popen(
                    command, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=child_env(), cwd=REPO
                )
            self.command = command
            if self._wait_serving(started + DAEMON_START_TIMEOUT_S):
                self.start_seconds = time.monotonic() - started
                return
            errors.append(f"{' '.join(command[:4])} ...: exited {self.proc.returncode}")
            self._kill()
        raise RuntimeError(f"the daemon did not start ({'; '.join(errors)}); log:\n{self.log_tail()}")

    def _wait_serving(self, deadline: float) -> bool:
        assert self.proc is not None
        request = health_pb2.HealthCheckRequest(service="")
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            if os.path.exists(self.socket_path):
                with grpc.insecure_channel(self.target) as channel:
                    try:
                        reply = health_pb2_grpc.HealthStub(channel).Check(request, timeout=1.0)
                        if reply.status == health_pb2.HealthCheckResponse.SERVING:
                            return True
                    except grpc.RpcError:
                        pass
            time.sleep(0.1)
        return False

    def stop(self) -> int | None:
        """SIGTERM, then wait; SIGKILL if it hangs (exit code None then)."""
        if self.proc is None or self.exit_code is not None:
            return self.exit_code
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.exit_code = self.proc.wait(DAEMON_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self._kill()
            self.exit_code = None
        return self.exit_code

    def _kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def log_tail(self, lines: int = 40) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return "(no log)"


# -- 1. one caller, interleaved ---------------------------------------------------------


def measure_single(target: str, *, rounds: int, warmup: int, attach_id: str, session: str) -> dict[str, list[int]]:
    """Interleaved rounds of floor, allocate (+ release), attach, stats; nanoseconds."""
    md = metadata(session)
    timeout = CALL_TIMEOUT_S
    with grpc.insecure_channel(target, options=CHANNEL_OPTIONS) as channel:
        check = health_pb2_grpc.HealthStub(channel).Check
        broker = broker_pb2_grpc.CacheBrokerStub(channel)
        allocate, release, attach, stats = broker.Allocate, broker.Release, broker.Attach, broker.Stats
        health_req = health_pb2.HealthCheckRequest(service="")
        alloc_req = pb.AllocateRequest(pool=POOL, size_bytes=ALLOC_BYTES)
        attach_req = pb.AttachRequest(cache_id=attach_id)
        stats_req = pb.StatsRequest()
        names = ("floor", "allocate", "release", "allocate_release", "attach", "stats")
        samples: dict[str, list[int]] = {name: [] for name in names}
        floor_s, alloc_s, rel_s, pair_s = samples["floor"], samples["allocate"], samples["release"], samples["allocate_release"]
        attach_s, stats_s = samples["attach"], samples["stats"]
        clock = time.perf_counter_ns
        gc.collect()
        gc.disable()
        try:
            for i in range(warmup + rounds):
                t0 = clock()
                health = check(health_req, timeout=timeout, metadata=md)
                t1 = clock()
                a0 = clock()
                allocated = allocate(alloc_req, timeout=timeout, metadata=md)
                a1 = clock()
                release_req = pb.ReleaseRequest(cache_id=allocated.cache.cache_id)
                r0 = clock()
                released = release(release_req, timeout=timeout, metadata=md)
                r1 = clock()
                b0 = clock()
                attach(attach_req, timeout=timeout, metadata=md)
                b1 = clock()
                s0 = clock()
                stats(stats_req, timeout=timeout, metadata=md)
                s1 = clock()
                if i < warmup:
                    if i == 0 and (
                        health.status != health_pb2.HealthCheckResponse.SERVING
                        or not allocated.handle.HasField("host")
                        or not released.freed
                    ):
                        raise RuntimeError(f"unexpected replies: {health} / {allocated} / {released}")
                    continue
                floor_s.append(t1 - t0)
                alloc_s.append(a1 - a0)
                rel_s.append(r1 - r0)
                pair_s.append(r1 - a0)
                attach_s.append(b1 - b0)
                stats_s.append(s1 - s0)
        finally:
            gc.enable()
    return samples


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a whole process (all threads), from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        data = f.read()
    fields = data[data.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure_cpu(target: str, daemon_pid: int, *, calls: int, attach_id: str, session: str) -> dict[str, Any]:
    """CPU per call of the daemon and of this client, method by method (not interleaved:
    CPU time, unlike latency, hardly depends on what other jobs do). ``allocate_release``
    is per pair. Two passes of ``calls / 2`` calls per method, summed."""
    md = metadata(session)
    timeout = CALL_TIMEOUT_S
    totals = {m: [0.0, 0.0, 0.0, 0] for m in ("floor", "allocate_release", "attach", "stats")}
    with grpc.insecure_channel(target, options=CHANNEL_OPTIONS) as channel:
        check = health_pb2_grpc.HealthStub(channel).Check
        broker = broker_pb2_grpc.CacheBrokerStub(channel)
        health_req = health_pb2.HealthCheckRequest(service="")
        alloc_req = pb.AllocateRequest(pool=POOL, size_bytes=ALLOC_BYTES)
        attach_req = pb.AttachRequest(cache_id=attach_id)
        stats_req = pb.StatsRequest()

        def pair() -> None:
            reply = broker.Allocate(alloc_req, timeout=timeout, metadata=md)
            broker.Release(pb.ReleaseRequest(cache_id=reply.cache.cache_id), timeout=timeout, metadata=md)

        methods: dict[str, Callable[[], Any]] = {
            "floor": lambda: check(health_req, timeout=timeout, metadata=md),
            "allocate_release": pair,
            "attach": lambda: broker.Attach(attach_req, timeout=timeout, metadata=md),
            "stats": lambda: broker.Stats(stats_req, timeout=timeout, metadata=md),
        }
        for fn in methods.values():  # warm
            for _ in range(20):
                fn()
        gc.collect()
        gc.disable()
        try:
            for _pass in range(2):
                for name, fn in methods.items():
                    n = calls // 2
                    d0, c0, w0 = process_cpu_seconds(daemon_pid), time.process_time(), time.perf_counter()
                    for _ in range(n):
                        fn()
                    d1, c1, w1 = process_cpu_seconds(daemon_pid), time.process_time(), time.perf_counter()
                    t = totals[name]
                    t[0] += d1 - d0
                    t[1] += c1 - c0
                    t[2] += w1 - w0
                    t[3] += n
        finally:
            gc.enable()
    out: dict[str, Any] = {}
    for name, (daemon_s, client_s, wall_s, n) in totals.items():
        out[name] = {
            "calls": n,
            "daemon_cpu_us": daemon_s / n * 1e6,
            "client_cpu_us": client_s / n * 1e6,
            "wall_us": wall_s / n * 1e6,
        }
    floor = out["floor"]
    for name, entry in out.items():
        rpcs = 2 if name == "allocate_release" else 1
        entry["daemon_cpu_extra_us"] = entry["daemon_cpu_us"] - rpcs * floor["daemon_cpu_us"]
    out["clock_tick_s"] = 1 / os.sysconf("SC_CLK_TCK")
    return out


# -- 2. N callers -----------------------------------------------------------------------


def caller_loop(spec: dict[str, Any], wait_go: Callable[[], int]) -> dict[str, Any]:
    """One caller: warm up, wait for the common start, run the timed windows.

    ``spec``: target, session, warmup (calls of each method), windows ([method, start_s,
    end_s] relative to the start). Returns per method the latencies (ns) of the calls
    that ended inside a window.
    """
    md = metadata(spec["session"])
    timeout = CALL_TIMEOUT_S
    with grpc.insecure_channel(spec["target"], options=CHANNEL_OPTIONS) as channel:
        check = health_pb2_grpc.HealthStub(channel).Check
        broker = broker_pb2_grpc.CacheBrokerStub(channel)
        allocate, release = broker.Allocate, broker.Release
        health_req = health_pb2.HealthCheckRequest(service="")
        alloc_req = pb.AllocateRequest(pool=POOL, size_bytes=ALLOC_BYTES)

        def floor_call() -> None:
            check(health_req, timeout=timeout, metadata=md)

        def allocate_call() -> int:
            s = time.monotonic_ns()
            reply = allocate(alloc_req, timeout=timeout, metadata=md)
            e = time.monotonic_ns()
            release(pb.ReleaseRequest(cache_id=reply.cache.cache_id), timeout=timeout, metadata=md)
            return e - s

        for _ in range(spec["warmup"]):
            floor_call()
            allocate_call()
        start_ns = wait_go()
        out: dict[str, list[int]] = {"floor": [], "allocate": []}
        clock = time.monotonic_ns
        gc.collect()
        gc.disable()
        try:
            for method, start_s, end_s in spec["windows"]:
                window_start = start_ns + int(start_s * 1e9)
                window_end = start_ns + int(end_s * 1e9)
                delay = (window_start - clock()) / 1e9
                if delay > 0:
                    time.sleep(delay)
                lat = out[method]
                if method == "floor":
                    while True:
                        s = clock()
                        if s >= window_end:
                            break
                        floor_call()
                        e = clock()
                        if e <= window_end:
                            lat.append(e - s)
                else:
                    while True:
                        s = clock()
                        if s >= window_end:
                            break
                        d = allocate_call()
                        if s + d <= window_end:
                            lat.append(d)
        finally:
            gc.enable()
    return out


def caller_process_main(spec_json: str) -> int:
    spec = json.loads(spec_json)

    def wait_go() -> int:
        print("READY", flush=True)
        line = sys.stdin.readline()
        if not line.startswith("GO "):
            raise SystemExit(f"caller: expected GO, got {line!r}")
        return int(line.split()[1])

    result = caller_loop(spec, wait_go)
    print(json.dumps(result), flush=True)
    return 0


def windows_for(reps: int, seconds: float, gap: float = 0.15) -> list[list[Any]]:
    """Alternating floor / allocate windows with a short gap for in-flight calls."""
    windows, t = [], 0.0
    for _ in range(reps):
        for method in ("floor", "allocate"):
            windows.append([method, t, t + seconds])
            t += seconds + gap
    return windows


def run_callers(target: str, n: int, *, mode: str, windows: list[list[Any]], warmup: int) -> dict[str, list[list[int]]]:
    """Run ``n`` callers (processes or threads) over the same windows; per-caller results."""
    specs = [
        {"target": target, "session": new_session(f"caller{i}"), "warmup": warmup, "windows": windows}
        for i in range(n)
    ]
    results: list[dict[str, list[int]]] = []
    if mode == "threads":
        start: list[int] = []

        def set_start() -> None:
            start.append(time.monotonic_ns() + 200_000_000)

        barrier = threading.Barrier(n, action=set_start)

        def wait_go() -> int:
            barrier.wait(timeout=120)
            return start[0]

        with futures.ThreadPoolExecutor(n) as pool:
            jobs = [pool.submit(caller_loop, spec, wait_go) for spec in specs]
            results = [job.result() for job in jobs]
    else:
        procs = [
            subprocess.Popen(
                [sys.executable, str(Path(__file__).resolve()), "--_caller", json.dumps(spec)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=child_env(), text=True, cwd=REPO,
            )
            for spec in specs
        ]
        try:
            for proc in procs:
                assert proc.stdout is not None
                line = proc.stdout.readline()
                if line.strip() != "READY":
                    raise RuntimeError(f"caller process failed before READY (exit {proc.wait()})")
            go = time.monotonic_ns() + 300_000_000
            for proc in procs:
                assert proc.stdin is not None
                proc.stdin.write(f"GO {go}\n")
                proc.stdin.flush()
            total = windows[-1][2] + 60
            for proc in procs:
                out, _ = proc.communicate(timeout=total)
                if proc.returncode != 0:
                    raise RuntimeError(f"caller process exited {proc.returncode}")
                results.append(json.loads(out.strip().splitlines()[-1]))
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
    return {method: [r[method] for r in results] for method in ("floor", "allocate")}


def summarize_callers(n: int, per_caller: dict[str, list[list[int]]], windows: list[list[Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"callers": n}
    for method in ("floor", "allocate"):
        seconds = sum(end - start for m, start, end in windows if m == method)
        lat = [x for caller in per_caller[method] for x in caller]
        summary = summarize_ns(lat)
        per_s = len(lat) / seconds
        if method == "allocate":
            summary["pairs_per_s"] = per_s
            summary["rpc_per_s"] = 2 * per_s
        else:
            summary["rpc_per_s"] = per_s
        summary["window_seconds"] = seconds
        out[method] = summary
    out["allocate"].update(ratios(out["allocate"], out["floor"]))
    return out


# -- 3. the hand-off --------------------------------------------------------------------


class ByteStreamServer:
    """A throwaway gRPC server that streams prepared byte chunks (the copy baseline)."""

    def __init__(self, socket_path: str, chunks: dict[str, list[bytes]]) -> None:
        self.target = f"unix:{socket_path}"
        self._chunks = chunks

        def get(request: bytes, context: grpc.ServicerContext):
            yield from self._chunks[request.decode()]

        handler = grpc.method_handlers_generic_handler(
            "kvbench.ByteStream", {"Get": grpc.unary_stream_rpc_method_handler(get)}
        )
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), options=CHANNEL_OPTIONS)
        self._server.add_generic_rpc_handlers((handler,))
        if not self._server.add_insecure_port(self.target):
            raise RuntimeError(f"cannot bind {self.target}")
        self._server.start()

    def stop(self) -> None:
        self._server.stop(grace=None).wait()


def handoff_process_main(spec_json: str) -> int:
    """The consumer: attach each cache, map it, read it; then the same bytes by stream."""
    spec = json.loads(spec_json)
    import torch

    SegmentMapper, _ = import_segment_mapper()
    md = metadata(new_session("consumer"))
    clock = time.perf_counter_ns
    result: dict[str, Any] = {"pid": os.getpid(), "attach": {}, "stream": {}}
    with grpc.insecure_channel(spec["target"], options=CHANNEL_OPTIONS) as channel, grpc.insecure_channel(
        spec["stream_target"], options=CHANNEL_OPTIONS
    ) as stream_channel:
        broker = broker_pb2_grpc.CacheBrokerStub(channel)
        health = health_pb2_grpc.HealthStub(channel)
        stream = stream_channel.unary_stream(STREAM_METHOD, request_serializer=None, response_deserializer=None)
        # Warm both channels: connected, methods used once; no measured segment mapped.
        for _ in range(5):
            health.Check(health_pb2.HealthCheckRequest(service=""), timeout=CALL_TIMEOUT_S, metadata=md)
            broker.Attach(pb.AttachRequest(cache_id=spec["warm_attach_id"]), timeout=CALL_TIMEOUT_S, metadata=md)
        for _ in range(3):
            for _chunk in stream(b"warmup", timeout=CALL_TIMEOUT_S):
                pass
        broker.Release(pb.ReleaseRequest(cache_id=spec["warm_attach_id"]), timeout=CALL_TIMEOUT_S, metadata=md)
        # Warm torch too (its first reduction starts the thread pool: milliseconds).
        for _ in range(3):
            torch.ones(1 << 16, dtype=torch.int64).sum().item()

        def settle() -> None:
            """Before every measured call: the state of a worker that was busy elsewhere
            (collected garbage, then 20 ms without RPCs, so neither side is spinning)."""
            gc.collect()
            time.sleep(COLD_IDLE_S)

        def cold_floor() -> float:
            request = health_pb2.HealthCheckRequest(service="")
            settle()
            gc.disable()
            try:
                t0 = clock()
                health.Check(request, timeout=CALL_TIMEOUT_S, metadata=md)
                t1 = clock()
            finally:
                gc.enable()
            return (t1 - t0) / 1e6

        def attach_and_read(cache: dict[str, Any], mapper: Any) -> dict[str, Any]:
            request = pb.AttachRequest(cache_id=cache["cache_id"])
            settle()
            gc.disable()
            try:
                t0 = clock()
                reply = broker.Attach(request, timeout=CALL_TIMEOUT_S, metadata=md)
                t1 = clock()
                tensor = mapper.view(reply.handle, torch.float16, (reply.handle.nbytes // 2,))
                t2 = clock()
                checksum = int(tensor.view(torch.int64).sum().item())
                t3 = clock()
            finally:
                gc.enable()
            checks = check_bytes(tensor.view(torch.uint8), cache["salt"], checksum)
            return {
                "hold_ms": (t2 - t0) / 1e6,
                "rpc_ms": (t1 - t0) / 1e6,
                "map_ms": (t2 - t1) / 1e6,
                "first_read_ms": (t3 - t2) / 1e6,
                "usable_ms": (t3 - t0) / 1e6,
                "segment_bytes": reply.handle.host.size_bytes,
                **checks,
            }

        # The same isolated call with no work behind it: the cold floor.
        result["cold_floor_ms"] = [cold_floor() for _ in range(COLD_FLOOR_SAMPLES)]
        # The measurement: the first attach of each segment in this process.
        mapper = SegmentMapper(populate=False)
        for cache in spec["caches"]:
            result["attach"][cache["label"]] = attach_and_read(cache, mapper)
        del mapper
        # More samples of the same path, each with a new mapper: a new mmap whose page
        # tables are empty again, as in a fresh process (only this process is warm).
        result["remap"] = {cache["label"]: [] for cache in spec["caches"]}
        for _ in range(spec["remaps"]):
            for cache in spec["caches"]:
                result["remap"][cache["label"]].append(attach_and_read(cache, SegmentMapper(populate=False)))
        for cache in spec["caches"]:
            broker.Release(pb.ReleaseRequest(cache_id=cache["cache_id"]), timeout=CALL_TIMEOUT_S, metadata=md)

        for cache in spec["caches"]:
            label, nbytes, salt = cache["label"], cache["nbytes"], cache["salt"]
            dst = torch.empty(nbytes, dtype=torch.uint8)
            dst.zero_()  # allocated and touched before the clock: the copy's best case
            base = dst.data_ptr()
            settle()
            gc.disable()
            try:
                t0 = clock()
                offset = 0
                for chunk in stream(label.encode(), timeout=120.0):
                    ctypes.memmove(base + offset, chunk, len(chunk))
                    offset += len(chunk)
                t1 = clock()
                checksum = int(dst.view(torch.int64).sum().item())
                t2 = clock()
            finally:
                gc.enable()
            checks = check_bytes(dst, salt, checksum) if offset == nbytes else {"checksum_ok": False, "samples_ok": False}
            result["stream"][label] = {
                "hold_ms": (t1 - t0) / 1e6,
                "first_read_ms": (t2 - t1) / 1e6,
                "usable_ms": (t2 - t0) / 1e6,
                "bytes": offset,
                **checks,
            }
            del dst
    print(json.dumps(result), flush=True)
    return 0


def run_handoff(daemon: Daemon, workdir: str, *, runs: int, remaps: int, warm_attach_id: str) -> dict[str, Any]:
    """Producer side: allocate and fill the caches, serve the stream, run the consumers."""
    SegmentMapper, mapper_source = import_segment_mapper()
    session = new_session("producer")
    md = metadata(session)
    mapper = SegmentMapper(populate=False)
    caches, views = [], []
    chunks: dict[str, list[bytes]] = {"warmup": [b"\x01" * (64 * KiB)]}
    stream_server = None
    with grpc.insecure_channel(daemon.target, options=CHANNEL_OPTIONS) as channel:
        broker = broker_pb2_grpc.CacheBrokerStub(channel)
        try:
            setup_started = time.monotonic()
            for label, nbytes in HANDOFF_SIZES:
                t0 = time.perf_counter()
                reply = broker.Allocate(
                    # retain: these outlive this session's lease (the benchmark holds no
                    # Watch stream and no heartbeat), and are force-released at the end.
                    pb.AllocateRequest(pool=POOL, size_bytes=nbytes, model_name="rpc-latency-bench", retain=True),
                    timeout=120.0, metadata=md,
                )
                allocate_s = time.perf_counter() - t0
                salt = secrets.randbelow(250) + 1
                view = mapper.view(reply.handle)
                write_pattern(view, salt)
                views.append(view)
                base = view.data_ptr()
                chunks[label] = [
                    ctypes.string_at(base + off, min(STREAM_CHUNK_BYTES, nbytes - off))
                    for off in range(0, nbytes, STREAM_CHUNK_BYTES)
                ]
                caches.append({
                    "label": label, "cache_id": reply.cache.cache_id, "nbytes": nbytes, "salt": salt,
                    "segment_bytes": reply.handle.host.size_bytes, "segment_id": reply.handle.segment_id,
                    "allocate_s": allocate_s,
                })
            stream_server = ByteStreamServer(os.path.join(workdir, "bytestream.sock"), chunks)
            setup_s = time.monotonic() - setup_started
            spec = {
                "target": daemon.target, "stream_target": stream_server.target,
                "warm_attach_id": warm_attach_id, "caches": caches, "remaps": remaps,
            }
            samples = []
            for _ in range(runs):
                proc = subprocess.run(
                    [sys.executable, str(Path(__file__).resolve()), "--_handoff", json.dumps(spec)],
                    stdin=subprocess.DEVNULL, capture_output=True, text=True, env=child_env(), cwd=REPO, timeout=300,
                )
                if proc.returncode != 0:
                    raise RuntimeError(f"hand-off consumer exited {proc.returncode}:\n{proc.stderr[-3000:]}")
                samples.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        finally:
            if stream_server is not None:
                stream_server.stop()
            chunks.clear()
            del views
            for cache in caches:
                broker.Release(pb.ReleaseRequest(cache_id=cache["cache_id"], force=True), timeout=CALL_TIMEOUT_S, metadata=md)

    def median(kind: str, label: str, key: str) -> float:
        return statistics.median(s[kind][label][key] for s in samples)

    out: dict[str, Any] = {"runs": runs, "setup_seconds": setup_s, "mapper": mapper_source, "caches": caches, "samples": samples}
    out["cold_floor_ms"] = statistics.median(x for s in samples for x in s["cold_floor_ms"])
    out["cold_floor_n"] = sum(len(s["cold_floor_ms"]) for s in samples)
    all_ok = True
    for label, _nbytes in HANDOFF_SIZES:
        entry: dict[str, Any] = {}
        for key in ("hold_ms", "rpc_ms", "map_ms", "first_read_ms", "usable_ms"):
            entry[f"attach_{key}"] = median("attach", label, key)
        for key in ("hold_ms", "first_read_ms", "usable_ms"):
            entry[f"stream_{key}"] = median("stream", label, key)
        remaps_ = [r for s in samples for r in s["remap"][label]]
        if remaps_:
            entry["remap_hold_ms"] = statistics.median(r["hold_ms"] for r in remaps_)
            entry["remap_rpc_ms"] = statistics.median(r["rpc_ms"] for r in remaps_)
            entry["remap_map_ms"] = statistics.median(r["map_ms"] for r in remaps_)
            entry["remap_first_read_ms"] = statistics.median(r["first_read_ms"] for r in remaps_)
            entry["remap_n"] = len(remaps_)
        entry["attach_hold_vs_cold_floor_ratio"] = entry["attach_hold_ms"] / out["cold_floor_ms"]
        entry["stream_vs_attach_hold_ratio"] = entry["stream_hold_ms"] / entry["attach_hold_ms"]
        entry["stream_vs_attach_usable_ratio"] = entry["stream_usable_ms"] / entry["attach_usable_ms"]
        ok = all(
            s[kind][label]["checksum_ok"] and s[kind][label]["samples_ok"] for s in samples for kind in ("attach", "stream")
        ) and all(r["checksum_ok"] and r["samples_ok"] for r in remaps_)
        entry["bytes_ok"] = ok
        all_ok = all_ok and ok
        out[label] = entry
    out["bytes_ok"] = all_ok
    return out


# -- output -----------------------------------------------------------------------------


def render(result: dict[str, Any]) -> str:
    lines = []
    single = result["single"]
    floor = single["floor"]
    lines.append(
        f"kvbroker RPC latency: one caller, Unix socket, sync grpc client, {single['floor']['n']} "
        f"interleaved rounds after {result['config']['warmup']} warm-up rounds"
    )
    header = f"{'method':<18}{'n':>7}{'P50 ms':>9}{'P90 ms':>9}{'P99 ms':>9}{'x P50':>8}{'x P90':>8}{'x P99':>8}{'RPC/s':>9}"
    lines += [header, "-" * len(header)]
    for name in ("floor", "allocate", "release", "allocate_release", "attach", "stats"):
        s = single[name]
        r = ratios(s, floor)
        lines.append(
            f"{name:<18}{s['n']:>7}{s['p50_ms']:>9.3f}{s['p90_ms']:>9.3f}{s['p99_ms']:>9.3f}"
            f"{r['p50_ratio']:>8.2f}{r['p90_ratio']:>8.2f}{r['p99_ratio']:>8.2f}{1000 / s['mean_ms']:>9.0f}"
        )
    lines.append("(x = ratio to the floor's same percentile; RPC/s = 1 / mean latency of that method alone)")
    lines.append("")
    cpu = result["cpu"]
    lines.append(f"CPU per call, back-to-back batches ({cpu['floor']['calls']} calls each; /proc tick {cpu['clock_tick_s'] * 1e3:.0f} ms)")
    header = f"{'method':<18}{'daemon us':>11}{'extra us':>10}{'client us':>11}{'wall us':>9}"
    lines += [header, "-" * len(header)]
    for name in ("floor", "allocate_release", "attach", "stats"):
        c = cpu[name]
        lines.append(
            f"{name:<18}{c['daemon_cpu_us']:>11.0f}{c['daemon_cpu_extra_us']:>10.0f}{c['client_cpu_us']:>11.0f}{c['wall_us']:>9.0f}"
        )
    lines.append("(extra = daemon CPU above the floor's, per RPC; allocate_release is one pair = two RPCs)")
    lines.append("")
    mode = result["config"]["callers_mode"]
    lines.append(f"Throughput: N callers ({mode}, one channel each), alternating timed windows")
    header = f"{'callers':>7}  {'method':<10}{'n':>8}{'RPC/s':>9}{'pairs/s':>9}{'P50 ms':>9}{'P90 ms':>9}{'P99 ms':>9}{'x P50':>8}{'x P99':>8}"
    lines += [header, "-" * len(header)]
    for n, entry in result["callers"].items():
        for method in ("floor", "allocate"):
            s = entry[method]
            pairs = f"{s['pairs_per_s']:>9.0f}" if "pairs_per_s" in s else f"{'':>9}"
            rr = f"{s['p50_ratio']:>8.2f}{s['p99_ratio']:>8.2f}" if "p50_ratio" in s else f"{'':>8}{'':>8}"
            lines.append(
                f"{n:>7}  {method:<10}{s['n']:>8}{s['rpc_per_s']:>9.0f}{pairs}{s['p50_ms']:>9.3f}"
                f"{s['p90_ms']:>9.3f}{s['p99_ms']:>9.3f}{rr}"
            )
    lines.append("(allocate = Allocate timed + Release untimed; RPC/s counts both RPCs)")
    lines.append("")
    h = result["handoff"]
    lines.append(
        f"Hand-off to a fresh process (median of {h['runs']}): Attach + SegmentMapper(populate=False) "
        "vs. gRPC server stream of the same bytes (4 MiB chunks); every cell a median of its own"
    )
    header = f"{'size':<6}{'path':<8}{'hold ms':>10}{'(rpc':>8}{'+ map)':>8}{'1st read':>10}{'usable ms':>11}{'bytes ok':>10}"
    lines += [header, "-" * len(header)]
    for label, _nbytes in HANDOFF_SIZES:
        e = h[label]
        size = label.replace("mib", " MiB").replace("gib", " GiB")
        lines.append(
            f"{size:<6}{'attach':<8}{e['attach_hold_ms']:>10.3f}{e['attach_rpc_ms']:>8.3f}{e['attach_map_ms']:>8.3f}"
            f"{e['attach_first_read_ms']:>10.2f}{e['attach_usable_ms']:>11.2f}{str(e['bytes_ok']):>10}"
        )
        if "remap_hold_ms" in e:
            lines.append(
                f"{'':<6}{'remap':<8}{e['remap_hold_ms']:>10.3f}{e['remap_rpc_ms']:>8.3f}{e['remap_map_ms']:>8.3f}"
                f"{e['remap_first_read_ms']:>10.2f}{'':>11}{'':>10}   (n={e['remap_n']}, new mapper each)"
            )
        lines.append(
            f"{'':<6}{'stream':<8}{e['stream_hold_ms']:>10.2f}{'':>8}{'':>8}"
            f"{e['stream_first_read_ms']:>10.2f}{e['stream_usable_ms']:>11.2f}"
        )
        lines.append(
            f"{'':<6}{'ratio':<8}{e['stream_vs_attach_hold_ratio']:>9.0f}x{'':>8}{'':>8}{'':>10}"
            f"{e['stream_vs_attach_usable_ratio']:>10.1f}x   (stream / attach)"
        )
    alloc_s = {c["label"]: c["allocate_s"] for c in h["caches"]}
    lines.append(
        f"producer's Allocate: 1 MiB {alloc_s['1mib'] * 1e3:.1f} ms (existing segment), 1 GiB "
        f"{alloc_s['1gib'] * 1e3:.0f} ms (a new 1 GiB segment, created and prefaulted by the daemon)"
    )
    lines.append(
        f"cold floor (Health/Check after the same 20 ms idle, n={h['cold_floor_n']}): {h['cold_floor_ms']:.3f} ms; "
        f"1 GiB attach hold = {h['1gib']['attach_hold_vs_cold_floor_ratio']:.2f}x the cold floor"
    )
    lines.append("")
    lines.append("Targets")
    for name, t in result["targets"].items():
        lines.append(f"  {name:<22} {t['value']:>8.3f} {t['op']} {t['target']:<5}  {'met' if t['met'] else 'MISSED'}")
    d = result["daemon"]
    lines.append(
        f"daemon: started in {d['start_seconds']:.1f} s ({d['entry']}), SIGTERM exit code {d['exit_code']}; "
        f"total run {result['run_seconds']:.0f} s"
    )
    return "\n".join(lines)


# -- main -------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer iterations and shorter windows (smoke run)")
    parser.add_argument("--iterations", type=int, help="measured rounds of the one-caller loop (default 4000; quick 300)")
    parser.add_argument("--warmup", type=int, help="warm-up rounds (default 400; quick 50)")
    parser.add_argument("--handoff-runs", type=int, help="fresh consumer processes (default 3; quick 1)")
    parser.add_argument("--callers-mode", choices=("processes", "threads"), default="processes",
                        help="how the N callers run (default processes; see the module docstring)")
    parser.add_argument("--wait-idle", type=float, default=10.0, metavar="SECONDS",
                        help="before each phase, wait for the machine to be < 15%% busy, at most this "
                        "many seconds in all (other jobs share it; default 10; 0: do not wait)")
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout; the table on stderr")
    parser.add_argument("--check", action="store_true", help="exit 1 if a target is missed")
    parser.add_argument("--_caller", help=argparse.SUPPRESS)
    parser.add_argument("--_handoff", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.iterations is None:
        args.iterations = 300 if args.quick else 4000
    if args.warmup is None:
        args.warmup = 50 if args.quick else 400
    if args.handoff_runs is None:
        args.handoff_runs = 1 if args.quick else 3
    if args.iterations < 1 or args.warmup < 1 or args.handoff_runs < 1:
        parser.error("--iterations, --warmup and --handoff-runs must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args._caller:
        return caller_process_main(args._caller)
    if args._handoff:
        return handoff_process_main(args._handoff)

    started = time.monotonic()
    log = sys.stderr if args.json else sys.stdout

    def progress(message: str) -> None:
        print(f"[{time.monotonic() - started:6.1f} s] {message}", file=sys.stderr, flush=True)

    workdir = tempfile.mkdtemp(prefix="kvb-bench-")
    daemon = Daemon(workdir)
    result: dict[str, Any] = {
        "config": {
            "quick": args.quick, "iterations": args.iterations, "warmup": args.warmup,
            "handoff_runs": args.handoff_runs, "callers_mode": args.callers_mode,
            "allocate_bytes": ALLOC_BYTES, "pool": POOL, "host_capacity": HOST_CAPACITY,
            "transport": "unix socket", "client": "sync grpc + generated stubs",
            "floor_method": "grpc.health.v1.Health/Check",
        },
        "machine": {
            "cpus": os.cpu_count(), "python": platform.python_version(), "grpcio": grpc.__version__,
            "platform": platform.platform(),
        },
    }
    failed = []
    noise: dict[str, Any] = {}
    result["noise"] = noise
    wait_budget = [max(0.0, args.wait_idle)]

    def settle(phase: str) -> None:
        """Wait for a quiet machine (within what is left of the --wait-idle budget)."""
        if wait_budget[0] > 0:
            busy, waited = wait_idle(wait_budget[0])
            wait_budget[0] -= waited
        else:
            busy, waited = cpu_busy(0.2), 0.0
        noise[phase] = {"busy_before": round(busy, 3), "waited_s": round(waited, 1)}
        if busy >= 0.15:
            progress(f"the machine is {busy:.0%} busy (other jobs); measuring {phase} anyway")

    try:
        progress("starting the daemon")
        daemon.start()
        progress(f"daemon serving on {daemon.socket_path} (pid {daemon.proc.pid if daemon.proc else '?'})")
        session = new_session("single")
        with grpc.insecure_channel(daemon.target) as channel:
            broker = broker_pb2_grpc.CacheBrokerStub(channel)
            attach_target = broker.Allocate(
                pb.AllocateRequest(pool=POOL, size_bytes=ALLOC_BYTES, model_name="rpc-latency-bench", retain=True),
                timeout=120.0, metadata=metadata(session),
            )
        attach_id = attach_target.cache.cache_id

        settle("single")
        progress(f"one caller: {args.warmup} warm-up + {args.iterations} measured rounds")
        samples = measure_single(
            daemon.target, rounds=args.iterations, warmup=args.warmup, attach_id=attach_id, session=session
        )
        single = {name: summarize_ns(values) for name, values in samples.items()}
        for name, summary in single.items():
            summary.update(ratios(summary, single["floor"]))
        result["single"] = single

        progress("CPU per call (daemon and client), method by method")
        result["cpu"] = measure_cpu(
            daemon.target, daemon.proc.pid, calls=400 if args.quick else 1200, attach_id=attach_id, session=session
        )

        reps, seconds = (1, 0.75) if args.quick else (3, 1.0)
        windows = windows_for(reps, seconds)
        result["callers"] = {}
        for n in (1, 8):
            settle(f"callers_{n}")
            progress(f"{n} caller(s), {args.callers_mode}: {len(windows)} windows of {seconds} s")
            per_caller = run_callers(
                daemon.target, n, mode=args.callers_mode, windows=windows, warmup=20 if args.quick else 100
            )
            result["callers"][str(n)] = summarize_callers(n, per_caller, windows)

        settle("handoff")
        progress(f"hand-off: allocate + fill 1 MiB and 1 GiB, {args.handoff_runs} consumer process(es)")
        result["handoff"] = run_handoff(
            daemon, workdir, runs=args.handoff_runs, remaps=2 if args.quick else 3, warm_attach_id=attach_id
        )
        if not result["handoff"]["bytes_ok"]:
            failed.append("the handed-off bytes did not match the pattern")

        with grpc.insecure_channel(daemon.target) as channel:
            broker = broker_pb2_grpc.CacheBrokerStub(channel)
            broker.Release(pb.ReleaseRequest(cache_id=attach_id, force=True), timeout=CALL_TIMEOUT_S, metadata=metadata(session))
            stats = broker.Stats(pb.StatsRequest(), timeout=CALL_TIMEOUT_S)
            result["daemon_final"] = {"active_caches": stats.active_caches, "allocation_count": stats.allocation_count}
            if stats.active_caches:
                failed.append(f"{stats.active_caches} caches still live at the end")
    finally:
        progress("stopping the daemon (SIGTERM)")
        exit_code = daemon.stop()
        result["daemon"] = {
            "exit_code": exit_code, "start_seconds": daemon.start_seconds,
            "entry": "python -m kvbroker serve" if "-m" in daemon.command else "kvbroker.daemon.main",
        }
        if exit_code != 0:
            failed.append(f"the daemon exited {exit_code} on SIGTERM")
            print(f"daemon log (tail):\n{daemon.log_tail()}", file=sys.stderr)
        with contextlib.suppress(OSError):
            for name in os.listdir(workdir):
                os.unlink(os.path.join(workdir, name))
            os.rmdir(workdir)

    single = result["single"]
    handoff = result["handoff"]
    result.update({
        "floor_p50_ms": single["floor"]["p50_ms"],
        "floor_p90_ms": single["floor"]["p90_ms"],
        "floor_p99_ms": single["floor"]["p99_ms"],
    })
    for name in ("allocate", "release", "allocate_release", "attach", "stats"):
        for p in (50, 90, 99):
            result[f"{name}_p{p}_ms"] = single[name][f"p{p}_ms"]
            result[f"{name}_p{p}_ratio"] = single[name][f"p{p}_ratio"]
    for label, _nbytes in HANDOFF_SIZES:
        e = handoff[label]
        result[f"attach_{label}_ms"] = e["attach_hold_ms"]
        result[f"attach_{label}_first_read_ms"] = e["attach_first_read_ms"]
        result[f"attach_{label}_usable_ms"] = e["attach_usable_ms"]
        result[f"stream_{label}_ms"] = e["stream_hold_ms"]
        result[f"stream_{label}_usable_ms"] = e["stream_usable_ms"]
        result[f"stream_vs_attach_{label}_ratio"] = e["stream_vs_attach_hold_ratio"]
        result[f"attach_{label}_rpc_ms"] = e["attach_rpc_ms"]
        result[f"attach_{label}_map_ms"] = e["attach_map_ms"]
        if "remap_hold_ms" in e:
            result[f"attach_{label}_remap_ms"] = e["remap_hold_ms"]
    result["cold_floor_ms"] = handoff["cold_floor_ms"]
    result["attach_1gib_vs_cold_floor_ratio"] = handoff["1gib"]["attach_hold_vs_cold_floor_ratio"]
    for name in ("floor", "allocate_release", "attach", "stats"):
        result[f"{name}_daemon_cpu_us"] = result["cpu"][name]["daemon_cpu_us"]
        result[f"{name}_daemon_cpu_extra_us"] = result["cpu"][name]["daemon_cpu_extra_us"]
    for n, entry in result["callers"].items():
        result[f"floor_rpc_per_s_{n}"] = entry["floor"]["rpc_per_s"]
        result[f"allocate_pairs_per_s_{n}"] = entry["allocate"]["pairs_per_s"]
    result["targets"] = {
        "allocate_p50_ratio": {"value": result["allocate_p50_ratio"], "op": "<=", "target": TARGET_ALLOCATE_P50_RATIO},
        "allocate_p99_ratio": {"value": result["allocate_p99_ratio"], "op": "<=", "target": TARGET_ALLOCATE_P99_RATIO},
        "attach_1gib_ms": {"value": result["attach_1gib_ms"], "op": "<=", "target": TARGET_ATTACH_1GIB_MS},
    }
    for t in result["targets"].values():
        t["met"] = t["value"] <= t["target"]
    result["targets_met"] = all(t["met"] for t in result["targets"].values())
    result["run_seconds"] = time.monotonic() - started

    print(render(result), file=log, flush=True)
    if args.json:
        print(json.dumps(result, sort_keys=True))
    for message in failed:
        print(f"rpc_latency: {message}", file=sys.stderr)
    if failed or (args.check and not result["targets_met"]):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
