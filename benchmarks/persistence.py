"""Checkpoint and restore throughput against a plain fsync'd write and read of the same
bytes to the same directory, in one run.

One daemon (``python -m kvbroker serve --devices host``, started by
tests/support/daemon.py through benchmarks/harness.py) with one persistent pool; this
script fills ``--total`` bytes of caches (``--caches`` of them) with random bytes through
their mappings, then per round:

- **checkpoint**: the ``Checkpoint`` RPC, timed from the call to its answer (the daemon
  pins, copies into a staging buffer, writes the safetensors file, fsyncs and hashes
  every cache, writes the manifest and ``CURRENT``).
- **plain write**: the same number of bytes, from one buffer in 16 MiB blocks, to one
  file in the same directory, then ``fsync`` (what ``dd conv=fsync bs=16M`` does).
- **restore**: the daemon is killed (SIGKILL, so no shutdown checkpoint runs), the page
  cache of the generation's files is dropped (``POSIX_FADV_DONTNEED``: clean pages after
  the fsync), a new daemon starts, and the restore's own duration is read from its log
  line (``restored N caches (B bytes) ... in S s``: allocating the caches again, reading,
  hashing and copying every file into device memory).
- **plain read**: the plain file's page cache dropped the same way, then read in 16 MiB
  blocks into one buffer.

Throughput is bytes / seconds; the ratios are the broker's throughput divided by the
plain figure of the same round (medians over ``--rounds``). Target (issue 13): each
ratio at least 0.5.

Usage::

    PYTHONPATH=.:client .venv/bin/python benchmarks/persistence.py [--total 1GiB] [--caches 16] [--rounds 3] [--dir DIR] [--json]

``--json`` prints one object with ``checkpoint_vs_write_ratio`` and
``restore_vs_read_ratio`` (and every figure) on stdout; the table goes to stderr.

Then the offload tier's latencies (``benchmarks/offload.py``): ``offload_ms_1mib``,
``restore_ms_1mib``, ``offload_ms_256mib``, ``restore_ms_256mib`` (the host tier; the
disk tier's with a ``disk_`` prefix), over ``--offload-rounds`` (0 skips them).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the checkout: benchmarks, tests, kvbroker

import grpc  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import harness  # noqa: E402
from kvbroker.config import parse_size  # noqa: E402
from kvbroker.v1 import broker_pb2 as pb  # noqa: E402
from kvbroker.v1 import broker_pb2_grpc  # noqa: E402

BLOCK = 16 * harness.MiB
TARGET_RATIO = 0.5
_RESTORED = re.compile(r"restored (\d+) caches \((\d+) bytes\) of checkpoint generation \d+ in ([\d.]+) s")

CONFIG = """
[devices]
host_capacity = "{capacity}"

[persistence]
dir = "{dir}"
checkpoint_interval_seconds = 0

[[pools]]
name = "kept"
persistent = true
segment_bytes = "{segment}"
"""


def drop_cache(path: Path) -> None:
    """Drop a file's clean pages from the page cache, so the next read hits the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def plain_write(path: Path, buffer: np.ndarray, total: int) -> float:
    started = time.perf_counter()
    with open(path, "wb", buffering=0) as f:
        written = 0
        while written < total:
            n = min(BLOCK, total - written)
            written += f.write(memoryview(buffer)[:n])
        os.fsync(f.fileno())
    return time.perf_counter() - started


def plain_read(path: Path, buffer: np.ndarray) -> float:
    drop_cache(path)
    started = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while f.readinto(memoryview(buffer)[:BLOCK]):
            pass
    return time.perf_counter() - started


def discard_killed(daemon) -> None:
    """SIGKILL the daemon, then remove the host segments it leaves in its shm directory
    (garbage once it is dead; the next daemon gets a fresh private directory and would
    never reclaim them, so each round would leak ``--total`` bytes of /dev/shm)."""
    daemon.process.kill()
    daemon.process.wait(timeout=60)
    for name in daemon.shm_objects():
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(daemon.shm_dir, name))
    daemon.stop()  # also removes its socket directory and its (now empty) private shm directory


def fill(target: str, caches: int, each: int) -> None:
    import torch

    from kvbroker_client import BrokerClient

    rng = np.random.default_rng(13)
    with BrokerClient(target, timeout_s=60) as client:
        for _ in range(caches):
            cache = client.allocate("kept", size_bytes=each, retain=True)
            data = rng.integers(0, 256, each, dtype=np.uint8)
            cache.tensor(torch.uint8, (each,)).copy_(torch.from_numpy(data))


def checkpoint(target: str) -> tuple[float, pb.CheckpointResponse]:
    with grpc.insecure_channel(target) as channel:
        stub = broker_pb2_grpc.CacheBrokerStub(channel)
        started = time.perf_counter()
        reply = stub.Checkpoint(pb.CheckpointRequest(), timeout=600)
        return time.perf_counter() - started, reply


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--total", default="1GiB", help="bytes of caches (default 1GiB)")
    parser.add_argument("--caches", type=int, default=16, help="how many caches share --total (default 16)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds; the ratios are medians (default 3)")
    parser.add_argument("--dir", default="", help="directory for the checkpoints and the plain file (default: a temporary one under the current directory)")
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    parser.add_argument("--offload-sizes", default="1MiB,256MiB", help="cache sizes of the offload figures")
    parser.add_argument("--offload-rounds", type=int, default=3, help="rounds of the offload figures (0: none)")
    args = parser.parse_args(argv)
    total = parse_size("--total", args.total)
    each = total // args.caches
    total = each * args.caches
    log = harness.progress_logger()
    base = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="kvb-persist-bench-", dir=os.getcwd()))
    ckpt_dir = base / "checkpoints"
    plain = base / "plain.bin"
    segment = max(64 * harness.MiB, -(-each // (2 * harness.MiB)) * 2 * harness.MiB)
    config = CONFIG.format(capacity=total + 2 * segment, dir=ckpt_dir, segment=segment)
    buffer = np.random.default_rng(7).integers(0, 256, BLOCK, dtype=np.uint8)
    rounds = []
    workdir = Path(tempfile.mkdtemp(prefix="kvb-persist-daemon-"))
    try:
        from tests.support.daemon import start_daemon

        daemon = start_daemon(workdir, config=config, ready_timeout=600)
        try:
            log(f"filling {args.caches} caches of {each} bytes")
            fill(daemon.target, args.caches, each)
            for r in range(args.rounds):
                write_s = plain_write(plain, buffer, total)
                ckpt_s, reply = checkpoint(daemon.target)
                assert reply.caches == args.caches, reply
                read_s = plain_read(plain, np.empty(BLOCK, dtype=np.uint8))
                discard_killed(daemon)
                for f in (ckpt_dir / f"gen-{reply.generation:06d}").iterdir():
                    drop_cache(f)
                daemon = start_daemon(workdir, config=config, ready_timeout=600)
                found = _RESTORED.findall(daemon.log())
                assert found and int(found[-1][0]) == args.caches, daemon.log_tail()
                restore_s = float(found[-1][2])
                rounds.append({"write_s": write_s, "checkpoint_s": ckpt_s, "read_s": read_s, "restore_s": restore_s})
                log(f"round {r + 1}: checkpoint {ckpt_s:.2f} s vs write {write_s:.2f} s; "
                    f"restore {restore_s:.2f} s vs read {read_s:.2f} s")  # fmt: skip
        finally:
            daemon.stop()
    finally:
        import shutil

        shutil.rmtree(workdir, ignore_errors=True)
        if not args.dir:
            shutil.rmtree(base, ignore_errors=True)
    med = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
    gib = total / harness.GiB
    ckpt_ratio = statistics.median(r["write_s"] / r["checkpoint_s"] for r in rounds)
    restore_ratio = statistics.median(r["read_s"] / r["restore_s"] for r in rounds)
    result = {
        "total_bytes": total, "caches": args.caches, "rounds": args.rounds,
        "checkpoint_gib_per_s": gib / med["checkpoint_s"], "plain_write_gib_per_s": gib / med["write_s"],
        "restore_gib_per_s": gib / med["restore_s"], "plain_read_gib_per_s": gib / med["read_s"],
        "checkpoint_vs_write_ratio": ckpt_ratio, "restore_vs_read_ratio": restore_ratio,
        "target_ratio": TARGET_RATIO, "rounds_detail": rounds,
    }  # fmt: skip
    table = "\n".join([
        f"{args.caches} caches, {total / harness.GiB:.2f} GiB, median of {args.rounds} rounds",
        f"  checkpoint {result['checkpoint_gib_per_s']:.2f} GiB/s   plain fsync'd write {result['plain_write_gib_per_s']:.2f} GiB/s"
        f"   ratio {ckpt_ratio:.2f} (target >= {TARGET_RATIO})",
        f"  restore    {result['restore_gib_per_s']:.2f} GiB/s   plain read (page cache dropped) {result['plain_read_gib_per_s']:.2f} GiB/s"
        f"   ratio {restore_ratio:.2f} (target >= {TARGET_RATIO})",
    ])  # fmt: skip
    if args.offload_rounds:
        from benchmarks import offload

        sizes = [parse_size("--offload-sizes", size) for size in args.offload_sizes.split(",")]
        result.update(offload.measure(sizes, args.offload_rounds, log=log, directory=str(base.parent)))
        table += "\n" + offload.table(result, sizes)
    harness.emit(result, table, as_json=args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
