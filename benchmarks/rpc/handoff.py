"""Case 3 of benchmarks/rpc_latency.py: the hand-off. This process allocates and fills a
1 MiB and a 1 GiB cache; fresh consumer processes attach, map and read them, and receive
the same bytes over a gRPC stream for comparison. See benchmarks/rpc_latency.py, section 3.

A consumer runs ``python -m benchmarks.rpc.handoff SPEC_JSON`` and prints one JSON line.
"""

from __future__ import annotations

import ctypes
import gc
import importlib.util
import json
import os
import secrets
import statistics
import subprocess
import sys
import time
from concurrent import futures
from typing import TYPE_CHECKING, Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from benchmarks.harness import CALL_TIMEOUT_S, REPO, GiB, KiB, MiB, child_env, metadata, new_session
from benchmarks.rpc.common import CHANNEL_OPTIONS, POOL
from kvbroker.v1 import broker_pb2 as pb
from kvbroker.v1 import broker_pb2_grpc

if TYPE_CHECKING:
    from tests.support.daemon import Daemon

STREAM_CHUNK_BYTES = 4 * MiB
STREAM_METHOD = "/kvbench.ByteStream/Get"
PATTERN_PERIOD = 4 * KiB
HANDOFF_SIZES = (("1mib", 1 * MiB), ("1gib", 1 * GiB))
#: Idle time before each measured hand-off call, and how many cold floor calls to take.
COLD_IDLE_S = 0.02
COLD_FLOOR_SAMPLES = 5


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



# -- consumer and producer --------------------------------------------------------------


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
    md = metadata(new_session("consumer"), spec["target"])
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
    # Sessionless: the producer makes no call for long stretches (the consumers run), so
    # a lease-only session would end under it; its caches are retained and force-released.
    md: tuple[tuple[str, str], ...] = ()
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
                    [sys.executable, "-m", "benchmarks.rpc.handoff", json.dumps(spec)],
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


if __name__ == "__main__":
    sys.exit(handoff_process_main(sys.argv[1]))
