"""Case 2 of benchmarks/rpc_latency.py: N callers, each a separate process with its own
channel and session, run the floor and allocate(+release) in alternating timed windows
that start at one CLOCK_MONOTONIC instant. See benchmarks/rpc_latency.py, section 2.

A caller process runs ``python -m benchmarks.rpc.callers SPEC_JSON``: it prints READY
after its warm-up, reads ``GO <start ns>``, and prints its latencies as one JSON line.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent import futures
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from benchmarks.harness import CALL_TIMEOUT_S, REPO, child_env, gc_paused, metadata, new_session, ratios, summarize_ns
from benchmarks.rpc.common import ALLOC_BYTES, CHANNEL_OPTIONS, POOL
from kvbroker.v1 import broker_pb2 as pb
from kvbroker.v1 import broker_pb2_grpc


def caller_loop(spec: dict[str, Any], wait_go: Callable[[], int]) -> dict[str, Any]:
    """One caller: warm up, wait for the common start, run the timed windows.

    ``spec``: target, session, warmup (calls of each method), windows ([method, start_s,
    end_s] relative to the start). Returns per method the latencies (ns) of the calls
    that ended inside a window.
    """
    md = metadata(spec["session"], spec["target"])
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
        with gc_paused():
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
                [sys.executable, "-m", "benchmarks.rpc.callers", json.dumps(spec)],
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


if __name__ == "__main__":
    sys.exit(caller_process_main(sys.argv[1]))
