"""RPC latency, throughput and zero-copy hand-off of a running kvbroker (DESIGN.md section 10).

Everything runs in one invocation, against one daemon that this script starts with the
tests' launcher (tests/support/daemon.py, through benchmarks/harness.py)::

    python -m kvbroker serve --devices host --listen 127.0.0.1:0 \\
        --unix-socket <tmpdir>/kvbroker.sock --host-capacity 3GiB --metrics-listen 127.0.0.1:<free>

(``--listen 127.0.0.1:0``: the kernel picks a free TCP port, so two runs never clash;
every RPC goes through the Unix socket, as a co-located worker's would.) The launcher
waits for ``grpc.health.v1.Health`` to report SERVING, and at the end stops the daemon
with SIGTERM; the script checks that it exits 0. The daemon's log goes to a temporary
file and its tail is printed only if the daemon fails. Case 4 runs against a second
daemon of its own (its settings would change the other cases).

Each case is a module of benchmarks/rpc/: ``single`` (1 and the CPU figures), ``callers``
(2), ``handoff`` (3), ``during_create`` (4), ``report`` (the table).

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

4. Release and Attach while another caller's Allocate creates a segment
-----------------------------------------------------------------------

A separate process allocates a 1 GiB cache in a pool whose ``segment_bytes`` (1 GiB)
makes the daemon create a new segment for it, releases it and waits until the segment
has gone back to the device, ``--creations`` times; meanwhile this process runs rounds of
floor, Release, Attach and Allocate on one channel. ``release_p99_during_create_ratio``
and ``attach_p99_during_create_ratio``: the P99 of the calls that overlapped a creation,
divided by the floor's P99 of the same run (benchmarks/rpc/during_create.py has the
details; it also runs alone: ``python -m benchmarks.rpc.during_create``).

Targets (section 10)
--------------------

Allocate P50 <= 1.2x and P99 <= 2x the floor's, one caller; 1 GiB attach hold <= 2 ms.

Output
------

A table on stdout. With ``--json``, stdout holds exactly one JSON object (the table goes
to stderr) with at least ``floor_p50_ms``, ``allocate_p50_ms``, ``allocate_p99_ms``,
``allocate_p50_ratio``, ``allocate_p99_ratio`` and ``attach_1gib_ms``, plus every other
figure, the per-caller-count results (``callers``), the hand-off (``handoff``), case 4
(``during_create``, and the flat ``*_during_create_*`` keys) and ``targets``. ``--check`` exits 1 when a target is missed. The exit code is also 1 when
the daemon did not exit 0 on SIGTERM or a check of the handed-off bytes failed.

Usage::

    cd /work/main && PYTHONPATH=.:client .venv/bin/python benchmarks/rpc_latency.py \\
        [--quick] [--iterations N] [--json] [--check] [--callers-mode processes|threads]
        [--creations N]

Run time on 2 vCPUs: about 2 minutes in full (plus up to ``--wait-idle`` seconds), about
45 s with ``--quick``.

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
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the checkout: benchmarks, tests, kvbroker

import grpc  # noqa: E402

from benchmarks import harness  # noqa: E402
from benchmarks.harness import CALL_TIMEOUT_S, metadata, new_session, ratios, summarize_ns  # noqa: E402
from benchmarks.rpc import during_create  # noqa: E402
from benchmarks.rpc.callers import run_callers, summarize_callers, windows_for  # noqa: E402
from benchmarks.rpc.common import ALLOC_BYTES, HOST_CAPACITY, POOL  # noqa: E402
from benchmarks.rpc.handoff import HANDOFF_SIZES, run_handoff  # noqa: E402
from benchmarks.rpc.report import render  # noqa: E402
from benchmarks.rpc.single import measure_cpu, measure_single  # noqa: E402
from kvbroker.v1 import broker_pb2 as pb  # noqa: E402
from kvbroker.v1 import broker_pb2_grpc  # noqa: E402

TARGET_ALLOCATE_P50_RATIO = 1.2
TARGET_ALLOCATE_P99_RATIO = 2.0
TARGET_ATTACH_1GIB_MS = 2.0


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer iterations and shorter windows (smoke run)")
    parser.add_argument("--iterations", type=int, help="measured rounds of the one-caller loop (default 4000; quick 300)")
    parser.add_argument("--warmup", type=int, help="warm-up rounds (default 400; quick 50)")
    parser.add_argument("--handoff-runs", type=int, help="fresh consumer processes (default 3; quick 1)")
    parser.add_argument("--creations", type=int,
                        help="1 GiB segments created during case 4 (default 30; quick 10; 0 skips case 4)")
    parser.add_argument("--callers-mode", choices=("processes", "threads"), default="processes",
                        help="how the N callers run (default processes; see the module docstring)")
    parser.add_argument("--wait-idle", type=float, default=10.0, metavar="SECONDS",
                        help="before each phase, wait for the machine to be < 15%% busy, at most this "
                        "many seconds in all (other jobs share it; default 10; 0: do not wait)")
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout; the table on stderr")
    parser.add_argument("--check", action="store_true", help="exit 1 if a target is missed")
    args = parser.parse_args(argv)
    if args.iterations is None:
        args.iterations = 300 if args.quick else 4000
    if args.warmup is None:
        args.warmup = 50 if args.quick else 400
    if args.handoff_runs is None:
        args.handoff_runs = 1 if args.quick else 3
    if args.creations is None:
        args.creations = 10 if args.quick else 30
    if args.iterations < 1 or args.warmup < 1 or args.handoff_runs < 1 or args.creations < 0:
        parser.error("--iterations, --warmup and --handoff-runs must be >= 1, --creations >= 0")
    return args


def run_main_cases(
    args: argparse.Namespace, result: dict[str, Any], failed: list[str],
    settle: Callable[[str], None], progress: Callable[[str], None],
) -> None:  # fmt: skip
    """Cases 1 to 3, against one daemon (default settings, metrics on)."""
    workdir = tempfile.mkdtemp(prefix="kvb-bench-")  # the hand-off's byte-stream socket
    progress("starting the daemon")
    try:
        with harness.daemon(host_capacity=HOST_CAPACITY, metrics=True) as daemon:
            progress(f"daemon serving on {daemon.unix_socket} (pid {daemon.pid})")
            session = new_session("single")
            with grpc.insecure_channel(daemon.target) as channel:
                broker = broker_pb2_grpc.CacheBrokerStub(channel)
                attach_target = broker.Allocate(
                    pb.AllocateRequest(pool=POOL, size_bytes=ALLOC_BYTES, model_name="rpc-latency-bench", retain=True),
                    timeout=120.0, metadata=metadata(session, daemon.target),
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
                daemon.target, daemon.pid, calls=400 if args.quick else 1200, attach_id=attach_id, session=session
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
                # Sessionless: the session's lease ran out during the hand-off case; the
                # cache was retained for that, and a forced release frees it.
                broker.Release(pb.ReleaseRequest(cache_id=attach_id, force=True), timeout=CALL_TIMEOUT_S)
                stats = broker.Stats(pb.StatsRequest(), timeout=CALL_TIMEOUT_S)
                result["daemon_final"] = {"active_caches": stats.active_caches, "allocation_count": stats.allocation_count}
                if stats.active_caches:
                    failed.append(f"{stats.active_caches} caches still live at the end")
            progress("stopping the daemon (SIGTERM)")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    exit_code = daemon.exit_code
    result["daemon"] = {"exit_code": exit_code, "start_seconds": daemon.ready_seconds, "entry": "python -m kvbroker serve"}
    if exit_code != 0:
        failed.append(f"the daemon exited {exit_code} on SIGTERM")
        print(f"daemon log (tail):\n{daemon.log_tail()}", file=sys.stderr)


def run_during_create(args: argparse.Namespace, result: dict[str, Any], failed: list[str],
                      settle: Callable[[str], None], progress: Callable[[str], None]) -> None:  # fmt: skip
    """Case 4, against a daemon of its own."""
    settle("during_create")
    progress(f"during create: a second daemon; {args.creations} creations of a 1 GiB segment")
    with during_create.case_daemon() as daemon:
        case = during_create.run_case(daemon.target, creations=args.creations, warmup=args.warmup)
        progress("stopping the second daemon (SIGTERM)")
    result["during_create"] = {**case, "daemon_exit_code": daemon.exit_code}
    result.update(during_create.top_level_keys(case))
    if case["distinct_segments"] != case["creations"]:
        failed.append(f"during create: {case['creations']} allocations made {case['distinct_segments']} segments")
    if daemon.exit_code != 0:
        failed.append(f"the during-create daemon exited {daemon.exit_code} on SIGTERM")
        print(f"daemon log (tail):\n{daemon.log_tail()}", file=sys.stderr)


def flat_keys(result: dict[str, Any]) -> None:
    """The flat figures of the JSON object, from the nested ones."""
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


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    progress = harness.progress_logger(started)
    result: dict[str, Any] = {
        "config": {
            "quick": args.quick, "iterations": args.iterations, "warmup": args.warmup,
            "handoff_runs": args.handoff_runs, "callers_mode": args.callers_mode,
            "allocate_bytes": ALLOC_BYTES, "pool": POOL, "host_capacity": HOST_CAPACITY,
            "transport": "unix socket", "client": "sync grpc + generated stubs",
            "floor_method": "grpc.health.v1.Health/Check", "creations": args.creations,
        },
        "machine": {
            "cpus": os.cpu_count(), "python": platform.python_version(), "grpcio": grpc.__version__,
            "platform": platform.platform(),
        },
    }  # fmt: skip
    failed: list[str] = []
    noise: dict[str, Any] = {}
    result["noise"] = noise
    wait_budget = [max(0.0, args.wait_idle)]

    def settle(phase: str) -> None:
        """Wait for a quiet machine (within what is left of the --wait-idle budget)."""
        if wait_budget[0] > 0:
            busy, waited = harness.wait_idle(wait_budget[0])
            wait_budget[0] -= waited
        else:
            busy, waited = harness.cpu_busy(0.2), 0.0
        noise[phase] = {"busy_before": round(busy, 3), "waited_s": round(waited, 1)}
        if busy >= 0.15:
            progress(f"the machine is {busy:.0%} busy (other jobs); measuring {phase} anyway")

    run_main_cases(args, result, failed, settle, progress)
    if args.creations:
        run_during_create(args, result, failed, settle, progress)
    flat_keys(result)
    result["run_seconds"] = time.monotonic() - started

    harness.emit(result, render(result), as_json=args.json, sort_keys=True)
    for message in failed:
        print(f"rpc_latency: {message}", file=sys.stderr)
    if failed or (args.check and not result["targets_met"]):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
