"""Case 1 of benchmarks/rpc_latency.py: one caller, each method's latency as a ratio to
the floor (an empty health check on the same channel), and the CPU each call costs the
daemon and the client. See benchmarks/rpc_latency.py, section 1, and "Also measured"."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from benchmarks.harness import CALL_TIMEOUT_S, gc_paused, metadata
from benchmarks.rpc.common import ALLOC_BYTES, CHANNEL_OPTIONS, POOL
from kvbroker.v1 import broker_pb2 as pb
from kvbroker.v1 import broker_pb2_grpc


def measure_single(target: str, *, rounds: int, warmup: int, attach_id: str, session: str) -> dict[str, list[int]]:
    """Interleaved rounds of floor, allocate (+ release), attach, stats; nanoseconds."""
    md = metadata(session, target)
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
        with gc_paused():
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
    md = metadata(session, target)
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
        with gc_paused():
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

