"""Offload and restore latency of one cache, through a real daemon (issue 13).

``benchmarks/persistence.py`` calls ``measure`` (its ``--json`` carries the figures); run
alone it prints them. One daemon (host device) per tier with one pool that holds
exactly one cache of the measured size and offloads to that tier. Per round and size:

- **allocate** (the baseline): an allocation into free room, timed from the call to the
  answer (placement, zeroing, the handle).
- **offload**: a second allocation that finds the pool full of the first (unpinned,
  filled with random bytes): the broker copies the first out to the tier, frees its
  extent and places the second; timed from the call to the answer, so it is the
  latency a client that pushes a cache out sees (the allocation included).
- **restore**: the second released, an Attach of the first (OFFLOADED): placement and
  the copy back in, timed from the call to the answer; its bytes are checked.

Figures are medians in milliseconds; ``offload_vs_allocate_ratio_*`` divides the offload
by the baseline allocation of the same size in the same run.

Usage::

    PYTHONPATH=.:client .venv/bin/python benchmarks/offload.py [--sizes 1MiB,256MiB] [--rounds 5] [--json]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the checkout: benchmarks, tests, kvbroker

import numpy as np  # noqa: E402

from benchmarks import harness  # noqa: E402
from kvbroker.config import parse_size  # noqa: E402

CONFIG = """
[devices]
host_capacity = "{capacity}"

[persistence]
dir = "{dir}"
host_max_bytes = "{budget}"
disk_max_bytes = "{budget}"

[[pools]]
name = "o"
max_bytes = "{size}"
segment_bytes = "{size}"
block_bytes = "{block}"
gc_threshold = 1.0
offload = "{tier}"
"""


def _key(size: int) -> str:
    return f"{size // harness.MiB}mib" if size % harness.MiB == 0 else f"{size}b"


def _round(target: str, size: int) -> dict[str, float]:
    import torch

    from kvbroker.v1 import broker_pb2 as pb
    from kvbroker_client import BrokerClient

    rng = np.random.default_rng(size)
    data = torch.from_numpy(rng.integers(0, 256, size, dtype=np.uint8))
    with BrokerClient(target, timeout_s=600) as client, BrokerClient(target, timeout_s=600) as other:
        started = time.perf_counter()
        first = client.allocate("o", size_bytes=size)
        allocate_s = time.perf_counter() - started
        first.tensor(torch.uint8, (size,)).copy_(data)
        started = time.perf_counter()
        second = other.allocate("o", size_bytes=size)
        offload_s = time.perf_counter() - started
        assert {c.cache_id: c.state for c in other.list_caches(pool="o")}[first.cache_id] == pb.CACHE_STATE_OFFLOADED
        second.release()
        started = time.perf_counter()
        first.refresh()  # one Attach: the restore
        restore_s = time.perf_counter() - started
        assert torch.equal(first.tensor(torch.uint8, (size,)), data), "restored bytes differ"
        first.release()
    return {"allocate_s": allocate_s, "offload_s": offload_s, "restore_s": restore_s}


def measure(sizes: list[int], rounds: int, tiers: tuple[str, ...] = ("host", "disk"),
            log: Callable[[str], None] = lambda line: None, directory: str = "") -> dict[str, float]:  # fmt: skip
    """Median offload and restore milliseconds per tier and size (the host tier's under
    ``offload_ms_<size>``/``restore_ms_<size>``, the disk tier's with ``disk_``)."""
    result: dict[str, float] = {}
    for tier in tiers:
        for size in sizes:
            with tempfile.TemporaryDirectory(prefix="kvb-offload-bench-", dir=directory or None) as state:
                config = CONFIG.format(capacity=2 * size + 64 * harness.MiB, dir=state, budget=2 * size,
                                       size=size, block=min(size, 2 * harness.MiB), tier=tier)  # fmt: skip
                with harness.daemon(config=config, ready_timeout=600) as daemon:
                    samples = [_round(daemon.target, size) for _ in range(rounds)]
            med = {k: statistics.median(s[k] for s in samples) * 1000 for k in samples[0]}
            prefix = "" if tier == "host" else "disk_"
            key = _key(size)
            result[f"{prefix}offload_ms_{key}"] = med["offload_s"]
            result[f"{prefix}restore_ms_{key}"] = med["restore_s"]
            result[f"{prefix}allocate_ms_{key}"] = med["allocate_s"]
            result[f"{prefix}offload_vs_allocate_ratio_{key}"] = med["offload_s"] / med["allocate_s"]
            log(f"{tier} {key}: offload {med['offload_s']:.2f} ms, restore {med['restore_s']:.2f} ms "
                f"(allocate into free room {med['allocate_s']:.2f} ms)")  # fmt: skip
    return result


def table(result: dict[str, float], sizes: list[int]) -> str:
    lines = ["offload tier (medians, ms):  offload  restore  allocate (baseline)"]
    for prefix, tier in (("", "host"), ("disk_", "disk")):
        for size in sizes:
            key = _key(size)
            if f"{prefix}offload_ms_{key}" in result:
                lines.append(f"  {tier:4} {key:>7}  {result[f'{prefix}offload_ms_{key}']:8.2f} "
                             f"{result[f'{prefix}restore_ms_{key}']:8.2f} {result[f'{prefix}allocate_ms_{key}']:9.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1MiB,256MiB", help="cache sizes (default 1MiB,256MiB)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds per size; figures are medians (default 5)")
    parser.add_argument("--tiers", default="host,disk", help="tiers to measure (default host,disk)")
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    args = parser.parse_args(argv)
    sizes = [parse_size("--sizes", s) for s in args.sizes.split(",")]
    result = measure(sizes, args.rounds, tuple(args.tiers.split(",")), harness.progress_logger())
    harness.emit(result, table(result, sizes), as_json=args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
