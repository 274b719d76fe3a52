"""Compaction: copy bandwidth, bytes moved per pressure-path compaction, overhead.

Three measurements, all in one run on one machine (figures are ratios against a baseline
measured in the same run, since the machines are shared):

1. Copy bandwidth of a full ``Defragment``
-------------------------------------------

A daemon (host device, 3 GiB, one pool whose one segment is the whole device, 1 MiB
blocks) is filled with caches of seeded random sizes (8 to 96 MiB) through the client;
a seeded random 45 % of them are released, more until the full pack's dry run plans at
least 1 GiB of moves; then one ``Defragment`` of the pool runs. Its bandwidth is the
moved bytes over the daemon's own ``duration_seconds`` (plan, copy, commit; the RPC's
wall time on the client is reported beside it). Baseline: one ``ctypes.memmove`` of the
same number of bytes between two buffers touched beforehand, single-threaded, as the
issue measured it, run right after each Defragment (so both see the same load on a
shared machine). Repeated ``--repeats`` times (fill, punch, defragment, memmove).
**copy_vs_memmove_ratio** = the median over the runs of Defragment bandwidth / memmove
bandwidth (target >= 0.65). The daemon copies with its default ``copy_threads`` (the cores available, at
most 8), so on a many-core host the ratio can exceed 1.

2. Bytes moved per pressure-path compaction
--------------------------------------------

The fragmentation benchmark's trace (benchmarks/frag/trace.py: 4 GiB, one segment, 64
KiB blocks, log-uniform 1 to 512 MiB, load 2.0) replayed on the pure core with
compaction and no eviction (benchmarks/frag/replay.py), once with the targeted planner
(the default) and once with the full pack (``Broker(targeted_compaction=False)``), until
the first refusal or the arrival cap. **targeted_vs_full_bytes_ratio** = mean bytes per
compaction, targeted over full, over all seeds (target <= 0.25);
**utilization_targeted** = mean utilization at the first refusal with the targeted
planner (target >= 0.97; ``utilization_full`` beside it). The replays diverge after the
first compaction (different layouts), so the number of compactions differs too; the
total bytes ratio is reported as ``targeted_vs_full_total_bytes_ratio``.

3. Defragmentation overhead (the seeds' figure)
-----------------------------------------------

The same trace (first seed, ``--overhead-arrivals``) replayed with bytes: the core plus
a real ``HostMemory`` (one 4 GiB shm segment, created and touched before the clock),
doing per request what the daemon does on the host device: place the cache (core), zero
its extent (the pool's default ``scrub``: every placement here reuses bytes), release it
at its departure; a request answered with a compaction plan has its moves copied
(``HostMemory.copy``, the daemon's default ``copy_threads``) and committed, then is
asked again. The compactions' time counts the allocate call that planned, the copy and
the commit.

The trace's clock is in abstract units (arrivals at rate 1, caches living about 100
units): a replay's wall time needs a time scale. ``--arrivals-per-second`` (default
10: a busy server, caches living about 10 s) paces it: the replay's wall time is the
trace's span at that rate, or the replay's own work when that is longer (it then runs
back to back). **overhead_fraction** = compaction time / that wall time (target <
0.05). ``overhead_fraction_back_to_back`` = compaction time / the work alone (the replay
doing nothing but placing, zeroing and compacting: an upper bound), and
``overhead_fraction_full`` the paced figure with the full pack.

CUDA variant (``--cuda``, GPU hosts only): a fragmented layout on one device copied by
``CudaMemory.copy`` (device-to-device ``copy_`` on its side stream, staging allocated
before the first byte) against one plain ``torch`` ``copy_`` of the same bytes on the
same device: ``cuda_copy_vs_torch_ratio``.

Usage::

    PYTHONPATH=.:client .venv/bin/python benchmarks/compaction.py [--quick] [--json]
        [--seeds N] [--arrivals N] [--overhead-arrivals N] [--arrivals-per-second R]
        [--repeats N] [--skip-defrag] [--skip-overhead-full] [--cuda]
"""

from __future__ import annotations

import argparse
import ctypes
import mmap
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the checkout: benchmarks, kvbroker

from benchmarks import harness  # noqa: E402
from benchmarks.frag.allocators import CoreAllocator  # noqa: E402
from benchmarks.frag.replay import replay  # noqa: E402
from benchmarks.frag.trace import CAPACITY, UTILIZATION_TARGET, make_trace  # noqa: E402
from benchmarks.harness import GiB, MiB, emit, progress_logger, seeded_rng  # noqa: E402

COPY_RATIO_TARGET = 0.65
BYTES_RATIO_TARGET = 0.25
OVERHEAD_TARGET = 0.05
DEFRAG_CAPACITY = 3 * GiB
DEFRAG_MIN_MOVED = 1 * GiB
DEFRAG_CONFIG = f"""
[devices]
kind = "host"
host_capacity = {DEFRAG_CAPACITY}

[[pools]]
name = "bench"
devices = ["host"]
block_bytes = "1MiB"
segment_bytes = {DEFRAG_CAPACITY}
"""


# -- 1. Defragment bandwidth ------------------------------------------------------------


class Memmove:
    """Two anonymous buffers of ``nbytes``, written beforehand (every page faulted in):
    ``seconds(n)`` times one single-threaded ``ctypes.memmove`` of ``n`` bytes."""

    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes
        self._buffers = [mmap.mmap(-1, nbytes), mmap.mmap(-1, nbytes)]
        for buf in self._buffers:
            for offset in range(0, nbytes, 1 << 28):
                end = min(nbytes, offset + (1 << 28))
                buf[offset:end] = b"\x01" * (end - offset)
        self._src, self._dst = (ctypes.addressof(ctypes.c_char.from_buffer(b)) for b in self._buffers)

    def seconds(self, nbytes: int) -> float:
        assert nbytes <= self.nbytes
        started = time.perf_counter()
        ctypes.memmove(self._dst, self._src, nbytes)
        return time.perf_counter() - started


def defragment_runs(repeats: int, seed: int, log: Callable[[str], None]) -> list[dict[str, float]]:
    """Fill, punch and defragment ``repeats`` times on one daemon, each Defragment
    followed at once by a memmove of as many bytes (see the module doc)."""
    from kvbroker_client import BrokerClient

    memmove = Memmove(DEFRAG_CAPACITY * 3 // 5)  # the live bytes never exceed 55 % of the device
    runs = []
    rng = seeded_rng(seed)
    with harness.daemon(config=DEFRAG_CONFIG) as daemon:
        client = BrokerClient(daemon.target, timeout_s=600)
        try:
            live = []
            for rep in range(repeats):
                free = DEFRAG_CAPACITY - sum(c.info.reserved_bytes for c in live)
                while True:
                    size = rng.randint(8, 96) * MiB
                    if size > free:
                        break
                    live.append(client.allocate("bench", size_bytes=size))
                    free -= size
                rng.shuffle(live)
                cut = int(len(live) * 0.45)
                for cache in live[:cut]:
                    cache.release()
                live = live[cut:]
                planned = client.defragment(pool="bench", dry_run=True).bytes_moved
                while planned < DEFRAG_MIN_MOVED and live:
                    live.pop().release()
                    planned = client.defragment(pool="bench", dry_run=True).bytes_moved
                started = time.perf_counter()
                result = client.defragment(pool="bench")
                wall = time.perf_counter() - started
                plain = memmove.seconds(result.bytes_moved)
                runs.append({
                    "bytes_moved": result.bytes_moved, "caches_moved": result.caches_moved,
                    "daemon_seconds": result.duration_seconds, "rpc_seconds": wall, "memmove_seconds": plain,
                    "ratio": plain / result.duration_seconds,
                })
                log(f"  defragment {rep + 1}: {result.bytes_moved / MiB:.0f} MiB in {result.duration_seconds * 1e3:.0f} ms "
                    f"({result.bytes_moved / result.duration_seconds / GiB:.2f} GiB/s; RPC {wall * 1e3:.0f} ms), "
                    f"memmove {plain * 1e3:.0f} ms: ratio {plain / result.duration_seconds:.2f}")
            for cache in live:
                cache.release()
        finally:
            client.close()
    if daemon.exit_code != 0:
        raise RuntimeError(f"the daemon exited {daemon.exit_code}:\n{daemon.log_tail()}")
    return runs


# -- 3. overhead with bytes ----------------------------------------------------------------


class BytesAllocator(CoreAllocator):
    """``CoreAllocator`` plus the bytes: one ``HostMemory`` segment as large as the
    device; every placement zeroes its extent, every compaction plan is copied before
    its commit. Times the compactions (planning allocate call, copy, commit)."""

    def __init__(self, capacity: int, *, targeted: bool, memory) -> None:
        super().__init__(capacity, compaction=True, targeted=targeted)
        self.memory = memory
        self.compaction_seconds = 0.0
        self.segment = None

    def alloc(self, nbytes: int) -> str | None:
        from kvbroker.core import AllocationRequest, ResourceExhausted

        request = AllocationRequest(pool="bench", nbytes=nbytes)
        for _ in range(4):
            started = time.perf_counter()
            try:
                result = self.broker.allocate(request, allow_eviction=False, allow_compaction=True)
            except ResourceExhausted as err:
                self.last_refusal = (err.requested_bytes, err.free_bytes, err.largest_free_extent_bytes)
                return None
            if result.compaction is None:
                cache = result.cache
                if result.new_segment is not None:  # the one segment: made before the clock
                    self.broker.segment_created(result.new_segment.segment_id)
                extent = cache.extents[0]
                self.memory.zero(extent.segment_id, extent.offset, extent.nbytes)
                self.broker.cache_ready(cache.cache_id)
                return cache.cache_id
            plan = result.compaction
            self.broker.begin_compaction(plan)
            self.memory.copy(plan.moves)
            self.broker.commit(plan)
            self.compaction_seconds += time.perf_counter() - started
            self.compactions += 1
            self.bytes_moved += plan.bytes_moved
            self.caches_moved += plan.caches_moved
        raise RuntimeError("allocate returned a compaction plan four times in a row")


def overhead(trace, *, targeted: bool, rate: float, log: Callable[[str], None]) -> dict[str, float]:
    import tempfile
    import uuid

    from kvbroker.core import AllocationRequest
    from kvbroker.memory.host import HostMemory

    with tempfile.TemporaryDirectory(dir="/dev/shm", prefix="kvb-bench-") as shm_dir, \
            HostMemory(f"bench{uuid.uuid4().hex[:8]}", shm_dir=shm_dir) as memory:
        allocator = BytesAllocator(CAPACITY, targeted=targeted, memory=memory)
        # Make the one segment before the clock: place a first cache, create, release.
        first = allocator.broker.allocate(AllocationRequest(pool="bench", nbytes=1 * MiB))
        memory.create(first.new_segment)
        allocator.broker.segment_created(first.new_segment.segment_id)
        allocator.broker.cache_ready(first.cache.cache_id)
        allocator.broker.release(first.cache.cache_id)
        started = time.perf_counter()
        result = replay(trace, allocator, CAPACITY)
        wall = time.perf_counter() - started
    span = trace[result.arrivals - 1][0] / rate
    figures = {
        "work_seconds": wall, "trace_span_seconds": span, "compaction_seconds": allocator.compaction_seconds,
        "fraction": allocator.compaction_seconds / max(span, wall),
        "fraction_back_to_back": allocator.compaction_seconds / wall, "compactions": allocator.compactions,
        "bytes_moved": allocator.bytes_moved, "utilization": result.utilization, "arrivals": result.arrivals,
    }
    log(f"  {'targeted' if targeted else 'full pack'}: {allocator.compaction_seconds:.2f} s compacting "
        f"({allocator.compactions} compactions, {allocator.bytes_moved / GiB:.1f} GiB moved) of {wall:.1f} s work, "
        f"{span:.0f} s paced: {figures['fraction'] * 100:.2f} % paced, {figures['fraction_back_to_back'] * 100:.1f} % "
        "back to back")
    return figures


# -- CUDA variant -----------------------------------------------------------------------------


def cuda_bandwidth(log: Callable[[str], None], repeats: int) -> dict[str, float]:
    """A fragmented 4 GiB layout on cuda:0 packed by ``CudaMemory.copy`` (plan from the
    core) against one ``torch`` ``copy_`` of the same bytes on the same device."""
    from kvbroker.core import AllocationRequest, Broker, DeviceSpec, PoolSpec
    from kvbroker.memory.cuda import CudaMemory, configure_cuda_allocator_env, discover_gpus

    configure_cuda_allocator_env()  # before torch loads
    import torch

    gpus = discover_gpus()
    if not gpus:
        raise SystemExit("--cuda needs a CUDA GPU")
    device_id, index = gpus[0].uuid, gpus[0].index
    capacity = 4 * GiB
    broker = Broker([DeviceSpec(device_id, capacity)],
                    [PoolSpec("bench", (device_id,), segment_bytes=capacity, block_bytes=1 * MiB)])
    memory = CudaMemory(device_id)
    rng = seeded_rng(7)
    ids, free = [], capacity
    while True:
        size = rng.randint(8, 96) * MiB
        if size > free:
            break
        result = broker.allocate(AllocationRequest(pool="bench", nbytes=size))
        if result.new_segment is not None:
            memory.create(result.new_segment)
            broker.segment_created(result.new_segment.segment_id)
        broker.cache_ready(result.cache.cache_id)
        ids.append(result.cache.cache_id)
        free -= size
    rng.shuffle(ids)
    for cache_id in ids[: int(len(ids) * 0.45)]:
        broker.release(cache_id)
    plan = broker.plan_compaction()
    nbytes = plan.bytes_moved
    started = time.perf_counter()
    memory.copy(plan.moves)
    copy_seconds = time.perf_counter() - started
    a = torch.empty(nbytes, dtype=torch.uint8, device=f"cuda:{index}")
    b = torch.ones_like(a)
    best = float("inf")
    for _ in range(repeats):
        torch.cuda.synchronize()
        started = time.perf_counter()
        a.copy_(b)
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - started)
    memory.close()
    figures = {"cuda_bytes_moved": nbytes, "cuda_copy_seconds": copy_seconds, "cuda_torch_copy_seconds": best,
               "cuda_copy_vs_torch_ratio": best / copy_seconds}
    log(f"  cuda: {nbytes / GiB:.2f} GiB in {copy_seconds * 1e3:.1f} ms vs torch copy_ {best * 1e3:.1f} ms")
    return figures


# -- main -----------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--quick", action="store_true", help="fewer seeds, arrivals and repeats")
    add("--json", action="store_true", help="one JSON object on stdout (the table on stderr)")
    add("--seeds", type=int, default=None, help="trace seeds for part 2 (default 3; 1 with --quick)")
    add("--arrivals", type=int, default=None, help="trace cap for part 2 (default 5000; 2000 with --quick)")
    add("--overhead-arrivals", type=int, default=None, help="trace cap for part 3 (default 1500; 400 with --quick)")
    add("--arrivals-per-second", type=float, default=10.0, help="the pace of part 3's replay (default 10)")
    add("--repeats", type=int, default=None, help="Defragment + memmove runs (default 5; 1 with --quick)")
    add("--skip-defrag", action="store_true", help="skip part 1 (no daemon)")
    add("--skip-overhead-full", action="store_true", help="skip part 3's full-pack replay (the longest part)")
    add("--cuda", action="store_true", help="also the CUDA variant (a GPU host)")
    args = parser.parse_args(argv)
    seeds = list(range(1, 1 + (args.seeds or (1 if args.quick else 3))))
    arrivals = args.arrivals or (2000 if args.quick else 5000)
    overhead_arrivals = args.overhead_arrivals or (400 if args.quick else 1500)
    repeats = args.repeats or (1 if args.quick else 5)
    log = progress_logger()
    result: dict[str, object] = {}
    lines = []

    if not args.skip_defrag:
        log(f"1. Defragment of >= {DEFRAG_MIN_MOVED / GiB:.0f} GiB on a daemon, {repeats} repeat(s)")
        runs = defragment_runs(repeats, seed=1, log=log)
        ratios = sorted(r["ratio"] for r in runs)
        median = ratios[len(ratios) // 2]
        moved = sum(r["bytes_moved"] for r in runs)
        defrag_bw = moved / sum(r["daemon_seconds"] for r in runs)
        memmove_bw = moved / sum(r["memmove_seconds"] for r in runs)
        result.update({
            "copy_vs_memmove_ratio": median, "copy_vs_memmove_ratio_per_run": [r["ratio"] for r in runs],
            "defragment_gib_per_s": defrag_bw / GiB, "memmove_gib_per_s": memmove_bw / GiB,
            "defragment_rpc_gib_per_s": moved / sum(r["rpc_seconds"] for r in runs) / GiB, "defragment_runs": runs,
        })
        lines.append(f"1. Defragment, {len(runs)} runs of >= 1 GiB: {defrag_bw / GiB:.2f} GiB/s (daemon), memmove "
                     f"{memmove_bw / GiB:.2f} GiB/s; median ratio {median:.2f} (target >= {COPY_RATIO_TARGET})")

    log(f"2. pressure-path compactions on the trace: {len(seeds)} seed(s) x {arrivals} arrivals, targeted and full")
    per_seed = []
    for seed in seeds:
        trace = make_trace(seed, arrivals, capacity=CAPACITY, load=2.0)
        row = {"seed": seed}
        for name, targeted in (("targeted", True), ("full", False)):
            r = replay(trace, CoreAllocator(CAPACITY, compaction=True, targeted=targeted), CAPACITY)
            row[name] = {"utilization": r.utilization, "compactions": r.compactions, "bytes_moved": r.bytes_moved,
                         "bytes_per_compaction": r.bytes_moved / max(1, r.compactions), "refused": r.refused}
        per_seed.append(row)
        log(f"  seed {seed}: targeted {row['targeted']['bytes_per_compaction'] / MiB:.0f} MiB/compaction "
            f"({row['targeted']['compactions']}), full {row['full']['bytes_per_compaction'] / MiB:.0f} "
            f"({row['full']['compactions']}); utilization {row['targeted']['utilization']:.4f} / "
            f"{row['full']['utilization']:.4f}")

    def mean(name: str, key: str) -> float:
        return sum(row[name][key] for row in per_seed) / len(per_seed)

    bytes_ratio = mean("targeted", "bytes_per_compaction") / mean("full", "bytes_per_compaction")
    result.update({
        "targeted_vs_full_bytes_ratio": bytes_ratio,
        "targeted_vs_full_total_bytes_ratio": mean("targeted", "bytes_moved") / mean("full", "bytes_moved"),
        "utilization_targeted": mean("targeted", "utilization"),
        "utilization_targeted_min": min(row["targeted"]["utilization"] for row in per_seed),
        "utilization_full": mean("full", "utilization"),
        "bytes_per_compaction_targeted": mean("targeted", "bytes_per_compaction"),
        "bytes_per_compaction_full": mean("full", "bytes_per_compaction"),
        "per_seed": per_seed,
    })
    lines.append(f"2. bytes per pressure-path compaction, targeted / full: {bytes_ratio:.3f} (target <= "
                 f"{BYTES_RATIO_TARGET}); utilization targeted {result['utilization_targeted']:.4f} (target >= "
                 f"{UTILIZATION_TARGET}), full {result['utilization_full']:.4f}")

    log(f"3. overhead: the trace of seed {seeds[0]} with bytes, {overhead_arrivals} arrivals")
    trace = make_trace(seeds[0], overhead_arrivals, capacity=CAPACITY, load=2.0)
    targeted = overhead(trace, targeted=True, rate=args.arrivals_per_second, log=log)
    result.update({"overhead_fraction": targeted["fraction"],
                   "overhead_fraction_back_to_back": targeted["fraction_back_to_back"], "overhead_targeted": targeted})
    full_text = ""
    if not args.skip_overhead_full:
        full = overhead(trace, targeted=False, rate=args.arrivals_per_second, log=log)
        result.update({"overhead_fraction_full": full["fraction"],
                       "overhead_fraction_full_back_to_back": full["fraction_back_to_back"], "overhead_full": full})
        full_text = f" (full pack {full['fraction'] * 100:.2f} %, back to back {full['fraction_back_to_back'] * 100:.1f} %)"
    lines.append(f"3. time compacting / replay wall time at {args.arrivals_per_second:g} arrivals/s: "
                 f"{targeted['fraction'] * 100:.2f} % (target < {OVERHEAD_TARGET * 100:.0f} %); back to back "
                 f"{targeted['fraction_back_to_back'] * 100:.1f} %{full_text}")

    if args.cuda:
        log("CUDA variant")
        result.update(cuda_bandwidth(log, repeats=max(repeats, 3)))
        lines.append(f"CUDA: compaction copy / torch copy_ bandwidth {result['cuda_copy_vs_torch_ratio']:.2f}")

    result["targets"] = {
        "copy_vs_memmove_ratio_ge_0.65": (result["copy_vs_memmove_ratio"] >= COPY_RATIO_TARGET
                                          if "copy_vs_memmove_ratio" in result else None),
        "targeted_vs_full_bytes_ratio_le_0.25": bytes_ratio <= BYTES_RATIO_TARGET,
        "utilization_targeted_ge_0.97": result["utilization_targeted"] >= UTILIZATION_TARGET,
        "overhead_fraction_lt_0.05": targeted["fraction"] < OVERHEAD_TARGET,
    }
    result["config"] = {"seeds": seeds, "arrivals": arrivals, "overhead_arrivals": overhead_arrivals,
                        "arrivals_per_second": args.arrivals_per_second,
                        "repeats": repeats, "trace_capacity_bytes": CAPACITY, "defrag_capacity_bytes": DEFRAG_CAPACITY}
    emit(result, "\n".join(lines), as_json=args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
