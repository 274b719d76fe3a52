"""Case 4 of benchmarks/rpc_latency.py: Release and Attach latency while another caller's
Allocate creates a new 1 GiB segment.

Why: creating a host segment is slow (``HostMemory.create`` in kvbroker/memory/host.py:
``posix_fallocate`` and a prefault of every page, about 0.6 s per GiB on the 2-core dev
box), and the engine holds its lock across it (``Engine._allocate_locked`` awaits
``memory.create`` inside ``async with self._lock``, kvbroker/engine.py). Every call
that takes the lock then waits for the creation, even one that touches nothing of it. The
figures here are that cost; once creation runs outside the lock they should fall to the
floor's order.

Setup: a daemon of its own (``--host-capacity 3GiB``), so the settings below cannot
change the other cases:

- ``[sessions] segment_idle_seconds = 0``: an empty segment goes back to the device at
  the engine's next tick (every 0.25 s at most);
- pool ``default`` (64 MiB segments): the measured caller's 1 MiB caches;
- pool ``create`` (``segment_bytes = 1GiB``): the creator's 1 GiB caches, one segment each.

**Creator**: a separate process (``python -m benchmarks.rpc.during_create --creator
SPEC``), its own channel, the anonymous holder (no session: it maps nothing, so an empty
segment is not held for a mapper and retires at once; kvbroker/core/broker.py ignores the
anonymous holder's mappings). Each cycle: Allocate 1 GiB in ``create`` (the pool has no
segment, so the daemon creates one), Release it, then wait until ``Stats`` shows the pool
without a segment (polled every 25 ms, 10 s deadline), so the next Allocate creates a new
segment again. It records each Allocate's start and end (``time.monotonic_ns``: one
CLOCK_MONOTONIC for every process of the machine) and the segment id it got.

**Measured caller**: this process, one sync channel over the Unix socket with the session
metadata and the 10 s deadline of every other case. Rounds of: floor (``Health/Check``),
release (``Release`` of the 1 MiB cache allocated in the round before), attach
(``Attach`` of one live 1 MiB cache), allocate (``Allocate`` of 1 MiB in ``default``: an
existing segment); each call timed. Warm-up rounds first; then the creator starts and
the rounds go on until it is done (bounded by a round cap and a deadline).

**Figures**: a call is *during create* when its interval overlaps one of the creator's
Allocate intervals. Reported: P50/P99 of release, attach and allocate during create and
outside any creation (``idle``), the floor's P50/P99 over every measured round, and
``release_p99_during_create_ratio`` / ``attach_p99_during_create_ratio``: each P99 during
create divided by the floor's P99 of the same run. With calls in sequence on one channel,
each creation blocks at most one call of the caller (the one in flight when it starts),
so the during-create samples are few (about one per creation) and their P99 is close to
their maximum: the longest wait behind a creation.

Standalone: ``python -m benchmarks.rpc.during_create [--creations N] [--json]``.
"""

from __future__ import annotations

import argparse
import bisect
import json
import statistics
import subprocess
import sys
import time
from typing import TYPE_CHECKING, Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from benchmarks.harness import (
    CALL_TIMEOUT_S, REPO, GiB, child_env, daemon, emit, format_ratio, gc_paused, metadata, new_session,
    safe_ratio, summarize_ns,
)  # fmt: skip
from benchmarks.rpc.common import ALLOC_BYTES, CHANNEL_OPTIONS
from tests.support.wait import wait_until

if TYPE_CHECKING:
    from tests.support.daemon import Daemon

CREATE_POOL = "create"
MEASURED_POOL = "default"
CREATE_BYTES = 1 * GiB
HOST_CAPACITY = "3GiB"
CONFIG = """
[sessions]
segment_idle_seconds = 0.0

[[pools]]
name = "default"
segment_bytes = "64MiB"

[[pools]]
name = "create"
segment_bytes = "1GiB"
"""
RETIRE_POLL_S = 0.025
RETIRE_TIMEOUT_S = 10.0
CREATE_TIMEOUT_S = 120.0
#: The most rounds the measured caller runs, whatever the creator does.
MAX_ROUNDS = 2_000_000
METHODS = ("floor", "release", "attach", "allocate")


def _pb():
    """The generated modules, imported late: ``--creator`` runs in a fresh process."""
    from kvbroker.v1 import broker_pb2, broker_pb2_grpc

    return broker_pb2, broker_pb2_grpc


# -- the creator process ------------------------------------------------------------------


def creator_main(spec_json: str) -> int:
    """Allocate, release and wait for the segment to go, ``creations`` times; print the
    Allocate intervals as one JSON line. READY after the warm-up, then waits for GO."""
    pb, pb_grpc = _pb()
    spec = json.loads(spec_json)
    with grpc.insecure_channel(spec["target"], options=CHANNEL_OPTIONS) as channel:
        broker = pb_grpc.CacheBrokerStub(channel)
        health = health_pb2_grpc.HealthStub(channel)

        def pool_segments() -> int:
            stats = broker.Stats(pb.StatsRequest(), timeout=CALL_TIMEOUT_S)
            return next(p.usage.segments for p in stats.pools if p.pool == CREATE_POOL)

        def wait_no_segment() -> None:
            wait_until(lambda: pool_segments() == 0, RETIRE_TIMEOUT_S,
                       f"pool {CREATE_POOL!r} gives its empty segment back", interval=RETIRE_POLL_S)  # fmt: skip

        for _ in range(5):
            health.Check(health_pb2.HealthCheckRequest(), timeout=CALL_TIMEOUT_S)
        wait_no_segment()
        print("READY", flush=True)
        if sys.stdin.readline().strip() != "GO":
            raise SystemExit("creator: expected GO")
        intervals, segments = [], []
        request = pb.AllocateRequest(pool=CREATE_POOL, size_bytes=CREATE_BYTES)
        for _ in range(spec["creations"]):
            start = time.monotonic_ns()
            reply = broker.Allocate(request, timeout=CREATE_TIMEOUT_S)
            end = time.monotonic_ns()
            intervals.append([start, end])
            segments.append(reply.handle.segment_id)
            broker.Release(pb.ReleaseRequest(cache_id=reply.cache.cache_id), timeout=CALL_TIMEOUT_S)
            wait_no_segment()
    print(json.dumps({"intervals": intervals, "segments": segments}), flush=True)
    return 0


# -- the measured caller ------------------------------------------------------------------


def measure(target: str, *, creations: int, warmup: int) -> dict[str, Any]:
    """Run the creator and the measured rounds; returns the raw samples and intervals."""
    pb, pb_grpc = _pb()
    md = metadata(new_session("during-create"), target)
    timeout = CALL_TIMEOUT_S
    creator = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.rpc.during_create", "--creator",
         json.dumps({"target": target, "creations": creations})],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=child_env(), cwd=REPO,
    )  # fmt: skip
    samples: dict[str, list[tuple[int, int]]] = {m: [] for m in METHODS}
    try:
        with grpc.insecure_channel(target, options=CHANNEL_OPTIONS) as channel:
            check = health_pb2_grpc.HealthStub(channel).Check
            broker = pb_grpc.CacheBrokerStub(channel)
            health_req = health_pb2.HealthCheckRequest()
            alloc_req = pb.AllocateRequest(pool=MEASURED_POOL, size_bytes=ALLOC_BYTES)
            live = broker.Allocate(
                pb.AllocateRequest(pool=MEASURED_POOL, size_bytes=ALLOC_BYTES, retain=True), timeout=timeout, metadata=md
            ).cache.cache_id
            attach_req = pb.AttachRequest(cache_id=live)
            pending = broker.Allocate(alloc_req, timeout=timeout, metadata=md).cache.cache_id
            clock = time.monotonic_ns

            def one_round(record: bool) -> None:
                nonlocal pending
                t0 = clock()
                check(health_req, timeout=timeout, metadata=md)
                t1 = clock()
                broker.Release(pb.ReleaseRequest(cache_id=pending), timeout=timeout, metadata=md)
                t2 = clock()
                broker.Attach(attach_req, timeout=timeout, metadata=md)
                t3 = clock()
                pending = broker.Allocate(alloc_req, timeout=timeout, metadata=md).cache.cache_id
                t4 = clock()
                if record:
                    samples["floor"].append((t0, t1))
                    samples["release"].append((t1, t2))
                    samples["attach"].append((t2, t3))
                    samples["allocate"].append((t3, t4))

            for _ in range(warmup):
                one_round(False)
            assert creator.stdout is not None and creator.stdin is not None
            if creator.stdout.readline().strip() != "READY":
                raise RuntimeError(f"the creator failed before READY (exit {creator.wait()})")
            creator.stdin.write("GO\n")
            creator.stdin.flush()
            deadline = time.monotonic() + creations * (RETIRE_TIMEOUT_S + CREATE_TIMEOUT_S / 10) + 60
            with gc_paused():
                rounds = 0
                while creator.poll() is None and rounds < MAX_ROUNDS and time.monotonic() < deadline:
                    one_round(True)
                    rounds += 1
            broker.Release(pb.ReleaseRequest(cache_id=pending), timeout=timeout, metadata=md)
            broker.Release(pb.ReleaseRequest(cache_id=live, force=True), timeout=timeout, metadata=md)
        out, _ = creator.communicate(timeout=CREATE_TIMEOUT_S + RETIRE_TIMEOUT_S)
        if creator.returncode != 0:
            raise RuntimeError(f"the creator exited {creator.returncode}")
        created = json.loads(out.strip().splitlines()[-1])
    finally:
        if creator.poll() is None:
            creator.kill()
            creator.wait()
    return {"samples": samples, "intervals": created["intervals"], "segments": created["segments"], "rounds": rounds}


def overlaps(intervals: list[list[int]], starts: list[int], start: int, end: int) -> bool:
    """Whether [start, end] overlaps one of ``intervals`` (sorted and disjoint: the
    creator runs one Allocate at a time), whose starts are ``starts``."""
    i = bisect.bisect_right(starts, end) - 1
    return i >= 0 and intervals[i][1] >= start


def summarize(raw: dict[str, Any]) -> dict[str, Any]:
    """The figures of one run (see the module docstring)."""
    intervals = sorted(raw["intervals"])
    starts = [a for a, _ in intervals]
    out: dict[str, Any] = {
        "creations": len(intervals),
        "distinct_segments": len(set(raw["segments"])),
        "create_ms_p50": statistics.median((b - a) / 1e6 for a, b in intervals) if intervals else float("nan"),
        "create_ms_max": max(((b - a) / 1e6 for a, b in intervals), default=float("nan")),
        "rounds": raw["rounds"],
    }
    for method in METHODS:
        during = [e - s for s, e in raw["samples"][method] if overlaps(intervals, starts, s, e)]
        idle = [e - s for s, e in raw["samples"][method] if not overlaps(intervals, starts, s, e)]
        out[f"{method}_during_create"] = summarize_ns(during)
        out[f"{method}_idle"] = summarize_ns(idle)
        out[method] = summarize_ns([e - s for s, e in raw["samples"][method]])
    floor = out["floor"]
    for method in ("release", "attach", "allocate"):
        during = out[f"{method}_during_create"]
        for p in (50, 99):
            out[f"{method}_p{p}_during_create_ratio"] = safe_ratio(during.get(f"p{p}_ms"), floor.get(f"p{p}_ms"))
    return out


def top_level_keys(case: dict[str, Any]) -> dict[str, float]:
    """The flat keys this case adds to rpc_latency's JSON object."""
    keys: dict[str, float] = {}
    for method in ("release", "attach"):
        during = case[f"{method}_during_create"]
        keys[f"{method}_p50_during_create_ms"] = during.get("p50_ms", float("nan"))
        keys[f"{method}_p99_during_create_ms"] = during.get("p99_ms", float("nan"))
        keys[f"{method}_p50_during_create_ratio"] = case[f"{method}_p50_during_create_ratio"]
        keys[f"{method}_p99_during_create_ratio"] = case[f"{method}_p99_during_create_ratio"]
    keys["during_create_floor_p50_ms"] = case["floor"].get("p50_ms", float("nan"))
    keys["during_create_floor_p99_ms"] = case["floor"].get("p99_ms", float("nan"))
    keys["during_create_creations"] = case["creations"]
    return keys


def run_case(target: str, *, creations: int, warmup: int) -> dict[str, Any]:
    return summarize(measure(target, creations=creations, warmup=warmup))


def render_during_create(case: dict[str, Any]) -> str:
    lines = [
        f"Release and Attach while another caller's Allocate creates a 1 GiB segment ({case['creations']} "
        f"creations, {case['distinct_segments']} distinct segments, creation P50 {case['create_ms_p50']:.0f} ms, "
        f"max {case['create_ms_max']:.0f} ms; {case['rounds']} rounds)",
    ]
    header = f"{'method':<10}{'when':<15}{'n':>7}{'P50 ms':>10}{'P99 ms':>10}{'x P50':>9}{'x P99':>9}"
    lines += [header, "-" * len(header)]
    floor = case["floor"]
    lines.append(f"{'floor':<10}{'whole run':<15}{floor['n']:>7}{floor['p50_ms']:>10.3f}{floor['p99_ms']:>10.3f}")
    for method in ("release", "attach", "allocate"):
        for when in ("during_create", "idle"):
            s = case[f"{method}_{when}"]
            if not s["n"]:
                lines.append(f"{method:<10}{when.replace('_', ' '):<15}{0:>7}")
                continue
            r50, r99 = safe_ratio(s["p50_ms"], floor["p50_ms"]), safe_ratio(s["p99_ms"], floor["p99_ms"])
            lines.append(
                f"{method:<10}{when.replace('_', ' '):<15}{s['n']:>7}{s['p50_ms']:>10.3f}{s['p99_ms']:>10.3f}"
                f"{format_ratio(r50):>9}{format_ratio(r99):>9}"
            )
    lines.append("(x = ratio to the floor's same percentile over the whole run; during create = the call "
                 "overlapped a creator's Allocate)")  # fmt: skip
    return "\n".join(lines)


def case_daemon() -> Any:
    """The daemon this case needs (see the module docstring), as a context manager."""
    return daemon(config=CONFIG, host_capacity=HOST_CAPACITY, metrics=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--creations", type=int, default=30, help="1 GiB segments to create (default 30)")
    parser.add_argument("--warmup", type=int, default=200, help="warm-up rounds (default 200)")
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout; the table on stderr")
    parser.add_argument("--creator", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.creator:
        return creator_main(args.creator)
    running: Daemon
    with case_daemon() as running:
        case = run_case(running.target, creations=args.creations, warmup=args.warmup)
    result = {**top_level_keys(case), "during_create": case, "daemon_exit_code": running.exit_code}
    emit(result, render_during_create(case), as_json=args.json)
    return 0 if running.exit_code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
