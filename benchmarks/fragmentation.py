"""Fragmentation and allocator cost of the kvbroker core (DESIGN.md section 10).

Two measurements, both on the pure core (``kvbroker.core.Broker``), no daemon, no GPU.

1. Utilization at the first refusal, on a seeded mixed-size trace
------------------------------------------------------------------

The trace: simulated time, Poisson arrivals (rate 1), cache sizes log-uniform between
1 MiB and 512 MiB (rounded up to whole 64 KiB blocks), exponential lifetimes whose mean makes the
offered load ``--load`` (default 2.0) times the device capacity, so memory fills up while
departures keep punching holes. The device is 4 GiB, one pool, one segment as large as
the device (``segment_bytes == capacity``), 64 KiB blocks.

Every allocator replays the *same* trace:

- A request larger than the ideal free bytes (``capacity - live requested bytes``) would
  be refused by any allocator, even a perfect one. It is **deferred**: skipped, not
  counted, and the trace continues (its departure never happens).
- The run stops at the first **refusal by the allocator**: a request that is <= the ideal
  free bytes but that the allocator cannot place.
- **utilization = the highest live requested bytes / capacity reached up to and including
  that refusal**: how full the allocator got before it failed anyone (requested bytes, so
  block rounding and buddy rounding count as waste). The value at the refusal itself is
  reported beside it (``*_at_refusal`` in the JSON).
- The trace is capped (``--arrivals``, default 20000). If the allocator never refused, its
  figure is the highest utilization over the whole trace, marked ``*``: it placed every
  request an ideal allocator could have placed.

Because deferral depends only on the live requested bytes, every allocator sees exactly
the same live set up to its own first refusal.

Allocators, side by side:

- ``core``: ``Broker.allocate(req, allow_eviction=False, allow_compaction=False)``;
  ``ResourceExhausted`` is a refusal.
- ``core+compaction``: ``allow_eviction=False``; when the result carries a compaction
  plan, the plan is committed (``Broker.commit``; a benchmark has no bytes to copy) and
  the request is asked again.
- ``buddy``: the seeds' design, written here as the baseline: a classic power-of-two buddy
  allocator over the same capacity (a power of two) with a 1 MiB minimum block, one free
  list per order, split on allocate, merge with the buddy on release, lowest address
  first; a request is rounded up to a power of two.

Targets (checked per seed): ``core+compaction >= 0.97`` and ``core+compaction > buddy``.

2. Core work per allocate+release pair, at 10k and 100k live caches
-------------------------------------------------------------------

A broker with 1 TiB of one segment (the core only tracks integers) is filled with 10k
(then 100k) live caches of random sizes (1 to 256 blocks of 64 KiB). Then N
allocate+release pairs are timed with ``time.perf_counter``: allocate a cache of a random
size, release a random live cache, so the live count stays constant. Requests and random
choices are drawn before the clock starts. Best of 3 repetitions. Target: <= 20 us per
pair at 100k live caches. ``--profile`` prints a cProfile of the 100k loop to stderr.

Output
------

A table on stdout. With ``--json``, stdout holds exactly one JSON object (the table goes to
stderr) with at least:

- ``utilization_core``, ``utilization_core_compaction``, ``utilization_buddy``: the
  **mean** over seeds; ``*_min`` keys hold the minimum over seeds, and ``per_seed`` the
  per-seed figures;
- ``us_per_op_10k``, ``us_per_op_100k``: best-of-3 microseconds per allocate+release pair,
  and ``us_per_op_ratio`` = 100k / 10k;
- ``targets``: whether each target is met.

Usage::

    cd /work/main && PYTHONPATH=.:client .venv/bin/python benchmarks/fragmentation.py
        [--seeds N] [--quick] [--json] [--check] [--profile] [--skip-per-op]
        [--arrivals N] [--load X] [--block-bytes B] [--page-bytes B]

``--check`` cross-checks the core after every call (``FreeSpace.check`` and
``Broker.stats`` against the benchmark's own books). Each refusal is classified:
``rounding`` when the allocator lacks the free bytes themselves (its block or
power-of-two rounding ate them), ``fragmentation`` when it has them but not contiguous.
"""

from __future__ import annotations

import argparse
import cProfile
import heapq
import io
import json
import math
import pstats
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

from kvbroker.core import AllocationRequest, Broker, DeviceSpec, PoolSpec, ResourceExhausted

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
TiB = 1024 * GiB

CAPACITY = 4 * GiB
BLOCK = 64 * KiB
#: Cache sizes are whole 64 KiB blocks, like the pool's block: a KV cache is a whole number
#: of token blocks, and with finer steps a refusal can hinge on block rounding alone (a
#: 313.66 MiB request against 314.06 MiB of ideal free space, with 1.3 MiB lost to 64 KiB
#: rounding), which measures the request's luck rather than the allocator. ``--page-bytes``
#: changes it.
PAGE = 64 * KiB
MIN_SIZE = 1 * MiB
MAX_SIZE = 512 * MiB
BUDDY_MIN_BLOCK = 1 * MiB
POOL = "bench"

UTILIZATION_TARGET = 0.97
US_PER_OP_TARGET = 20.0


# -- the trace ------------------------------------------------------------------------


def make_trace(
    seed: int, arrivals: int, *, capacity: int, load: float, page: int = PAGE
) -> list[tuple[float, int, float]]:
    """``arrivals`` tuples (time, nbytes, lifetime): Poisson arrivals of rate 1, sizes
    log-uniform in [MIN_SIZE, MAX_SIZE] rounded up to ``page``, exponential lifetimes with
    mean ``load * capacity / mean size``."""
    rng = random.Random(seed)
    lo, hi = math.log(MIN_SIZE), math.log(MAX_SIZE)
    mean_size = (MAX_SIZE - MIN_SIZE) / (hi - lo)
    mean_lifetime = load * capacity / mean_size
    trace, now = [], 0.0
    for _ in range(arrivals):
        now += rng.expovariate(1.0)
        nbytes = min(MAX_SIZE, -(-int(math.exp(rng.uniform(lo, hi))) // page) * page)
        trace.append((now, nbytes, rng.expovariate(1.0 / mean_lifetime)))
    return trace


# -- allocators -----------------------------------------------------------------------


class CoreAllocator:
    """The kvbroker core on one device, one pool, one segment."""

    def __init__(
        self, capacity: int, *, compaction: bool, check: bool = False, block: int = BLOCK
    ) -> None:
        self.broker = Broker(
            [DeviceSpec("host", capacity)],
            [PoolSpec(POOL, ("host",), segment_bytes=capacity, block_bytes=block)],
        )
        self.capacity = capacity
        self.compaction = compaction
        self.check = check
        self.compactions = 0
        self.bytes_moved = 0
        self.caches_moved = 0
        self.last_refusal: tuple[int, int, int] | None = None  # (rounded, free, largest)
        self._reserved: dict[str, int] = {}

    def alloc(self, nbytes: int) -> str | None:
        request = AllocationRequest(pool=POOL, nbytes=nbytes)
        for _ in range(4):
            try:
                result = self.broker.allocate(
                    request, allow_eviction=False, allow_compaction=self.compaction
                )
            except ResourceExhausted as err:
                self.last_refusal = (
                    err.requested_bytes, err.free_bytes, err.largest_free_extent_bytes
                )
                return None
            if result.compaction is None:
                assert result.cache is not None
                if self.check:
                    self._reserved[result.cache.cache_id] = result.cache.reserved_bytes
                    self._check()
                return result.cache.cache_id
            plan = result.compaction
            self.compactions += 1
            self.bytes_moved += plan.bytes_moved
            self.caches_moved += plan.caches_moved
            self.broker.commit(plan)
            if self.check:
                self._check()
        raise RuntimeError("allocate returned a compaction plan four times in a row")

    def free(self, handle: str) -> None:
        if not self.broker.release(handle):
            raise RuntimeError(f"release({handle!r}) did not free the cache")
        if self.check:
            del self._reserved[handle]
            self._check()

    def _check(self) -> None:
        """Cross-check the core's accounting against the benchmark's own (``--check``)."""
        arena = self.broker._pools[POOL].arenas["host"]  # noqa: SLF001 - a check only
        arena.free.check()
        total = self.broker.stats().total
        reserved = sum(self._reserved.values())
        assert total.allocated_bytes == reserved, (total.allocated_bytes, reserved)
        assert total.active_caches == len(self._reserved), total
        if self.broker.segments():
            assert total.free_bytes == self.capacity - reserved, (total.free_bytes, reserved)


class BuddyAllocator:
    """A classic binary buddy allocator: free lists per power-of-two order, split on
    allocate, merge with the buddy (``offset ^ size``) on release."""

    def __init__(self, capacity: int, min_block: int = BUDDY_MIN_BLOCK) -> None:
        if capacity & (capacity - 1) or min_block & (min_block - 1):
            raise ValueError("capacity and min_block must be powers of two")
        self.min_order = min_block.bit_length() - 1
        self.max_order = capacity.bit_length() - 1
        self.free_lists: dict[int, set[int]] = {
            order: set() for order in range(self.min_order, self.max_order + 1)
        }
        self.free_lists[self.max_order].add(0)
        self.allocated: dict[int, int] = {}  # offset -> order
        self.capacity = capacity
        self.reserved_bytes = 0
        self.last_refusal: tuple[int, int, int] | None = None  # (rounded, free, largest)

    def alloc(self, nbytes: int) -> int | None:
        order = max(self.min_order, (nbytes - 1).bit_length())
        current = order
        while current <= self.max_order and not self.free_lists[current]:
            current += 1
        if current > self.max_order:
            largest = max((o for o, f in self.free_lists.items() if f), default=None)
            self.last_refusal = (
                1 << order, self.capacity - self.reserved_bytes, 0 if largest is None else 1 << largest
            )
            return None
        free = self.free_lists[current]
        offset = min(free)
        free.remove(offset)
        while current > order:
            current -= 1
            self.free_lists[current].add(offset + (1 << current))
        self.allocated[offset] = order
        self.reserved_bytes += 1 << order
        return offset

    def free(self, offset: int) -> None:
        order = self.allocated.pop(offset)
        self.reserved_bytes -= 1 << order
        while order < self.max_order:
            buddy = offset ^ (1 << order)
            siblings = self.free_lists[order]
            if buddy not in siblings:
                break
            siblings.remove(buddy)
            offset = min(offset, buddy)
            order += 1
        self.free_lists[order].add(offset)


# -- replay ---------------------------------------------------------------------------


@dataclass
class ReplayResult:
    #: The highest live requested bytes / capacity reached up to the first refusal (the
    #: refusal included; the whole capped trace when there was none).
    utilization: float
    #: live requested bytes / capacity at the refusal itself (at the cap when none).
    utilization_at_end: float
    refused: bool  # False: the trace cap was reached without a refusal
    arrivals: int  # arrivals consumed, the refused one included
    placed: int
    deferred: int
    live_caches: int
    refused_bytes: int = 0
    ideal_free_bytes: int = 0
    # The allocator's own view at the refusal: the request as it rounds it, its free bytes
    # (capacity minus what it reserves, rounding included) and its largest free extent.
    allocator_request_bytes: int = 0
    allocator_free_bytes: int = 0
    allocator_largest_extent: int = 0
    # "rounding": the allocator lacks the free bytes themselves (its block or power-of-two
    # rounding ate them); "fragmentation": it has them, but not contiguous.
    refusal_kind: str = ""
    compactions: int = 0
    bytes_moved: int = 0
    caches_moved: int = 0
    seconds: float = 0.0


def replay(trace: Sequence[tuple[float, int, float]], allocator, capacity: int) -> ReplayResult:
    """Replay ``trace`` on ``allocator`` until its first refusal (see the module doc)."""
    started = time.perf_counter()
    departures: list[tuple[float, int, object, int]] = []
    live = placed = deferred = peak = 0
    result = None
    for index, (now, nbytes, lifetime) in enumerate(trace):
        while departures and departures[0][0] <= now:
            _, _, handle, size = heapq.heappop(departures)
            allocator.free(handle)
            live -= size
        ideal_free = capacity - live
        if nbytes > ideal_free:
            deferred += 1
            continue
        handle = allocator.alloc(nbytes)
        if handle is None:
            rounded, free, largest = allocator.last_refusal
            result = ReplayResult(
                utilization=peak / capacity, utilization_at_end=live / capacity, refused=True, arrivals=index + 1, placed=placed,
                deferred=deferred, live_caches=len(departures), refused_bytes=nbytes,
                ideal_free_bytes=ideal_free, allocator_request_bytes=rounded,
                allocator_free_bytes=free, allocator_largest_extent=largest,
                refusal_kind="rounding" if rounded > free else "fragmentation",
            )
            break
        heapq.heappush(departures, (now + lifetime, index, handle, nbytes))
        live += nbytes
        peak = max(peak, live)
        placed += 1
    if result is None:
        result = ReplayResult(
            utilization=peak / capacity, utilization_at_end=live / capacity, refused=False, arrivals=len(trace), placed=placed,
            deferred=deferred, live_caches=len(departures),
            ideal_free_bytes=capacity - live,
        )
    result.compactions = getattr(allocator, "compactions", 0)
    result.bytes_moved = getattr(allocator, "bytes_moved", 0)
    result.caches_moved = getattr(allocator, "caches_moved", 0)
    result.seconds = time.perf_counter() - started
    return result


ALLOCATORS: dict[str, Callable[[int, bool, int], object]] = {
    "core": lambda cap, check, block: CoreAllocator(cap, compaction=False, check=check, block=block),
    "core_compaction": lambda cap, check, block: CoreAllocator(
        cap, compaction=True, check=check, block=block
    ),
    "buddy": lambda cap, check, block: BuddyAllocator(cap),
}


@dataclass
class SeedResult:
    seed: int
    results: dict[str, ReplayResult] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        compaction, buddy = self.results["core_compaction"], self.results["buddy"]
        return compaction.utilization >= UTILIZATION_TARGET and compaction.utilization > buddy.utilization


def run_utilization(
    seeds: Sequence[int], *, arrivals: int, capacity: int, load: float, check: bool,
    block: int, page: int, log,
) -> list[SeedResult]:
    out = []
    for seed in seeds:
        trace = make_trace(seed, arrivals, capacity=capacity, load=load, page=page)
        seed_result = SeedResult(seed)
        for name, factory in ALLOCATORS.items():
            seed_result.results[name] = replay(trace, factory(capacity, check, block), capacity)
        out.append(seed_result)
        log(f"  seed {seed}: " + ", ".join(
            f"{n} {r.utilization:.4f} ({r.seconds:.1f}s)" for n, r in seed_result.results.items()
        ))
    return out


# -- per-op cost ----------------------------------------------------------------------


def measure_per_op(
    live_caches: int, pairs: int, *, repeats: int = 3, seed: int = 0, profile: bool = False
) -> tuple[float, list[float], str]:
    """Best-of-``repeats`` microseconds per allocate+release pair with ``live_caches``
    live caches. Returns (best, all repetitions, profile text)."""
    rng = random.Random(seed)
    broker = Broker(
        [DeviceSpec("host", TiB)],
        [PoolSpec(POOL, ("host",), segment_bytes=TiB, block_bytes=BLOCK)],
    )

    def request() -> AllocationRequest:
        return AllocationRequest(pool=POOL, nbytes=rng.randint(1, 256) * BLOCK)

    allocate, release = broker.allocate, broker.release
    ids = [
        allocate(request(), allow_eviction=False, allow_compaction=False).cache.cache_id
        for _ in range(live_caches)
    ]
    timings = []
    profile_text = ""
    for rep in range(repeats):
        requests = [request() for _ in range(pairs)]
        victims = [rng.randrange(live_caches) for _ in range(pairs)]
        profiler = cProfile.Profile() if profile and rep == repeats - 1 else None
        if profiler:
            profiler.enable()
        started = time.perf_counter()
        for req, slot in zip(requests, victims):
            new_id = allocate(req, allow_eviction=False, allow_compaction=False).cache.cache_id
            old_id = ids[slot]
            ids[slot] = new_id
            release(old_id)
        elapsed = time.perf_counter() - started
        if profiler:
            profiler.disable()
            buf = io.StringIO()
            pstats.Stats(profiler, stream=buf).sort_stats("tottime").print_stats(25)
            profile_text = buf.getvalue()
        timings.append(elapsed / pairs * 1e6)
    stats = broker.stats().total
    assert stats.active_caches == live_caches, stats
    return min(timings), timings, profile_text


# -- report ---------------------------------------------------------------------------


def _fmt(result: ReplayResult) -> str:
    mark = {"rounding": " r", "fragmentation": " f"}.get(result.refusal_kind, " *")
    return f"{result.utilization:.4f}{mark}"


def report_table(seed_results: Sequence[SeedResult], out, *, block: int, page: int) -> None:
    names = list(ALLOCATORS)
    print(
        "Utilization at the first refusal by the allocator (device "
        f"{CAPACITY // GiB} GiB, sizes log-uniform {MIN_SIZE // MiB} MiB..{MAX_SIZE // MiB} MiB "
        f"in {page // KiB} KiB steps, core blocks {block // KiB} KiB, "
        f"buddy min block {BUDDY_MIN_BLOCK // MiB} MiB).",
        file=out,
    )
    print(
        "  A request larger than the ideal free bytes (capacity - live requested bytes) is deferred\n"
        "  (skipped, not counted: any allocator would refuse it); the run stops at the first request\n"
        "  <= the ideal free bytes that the allocator cannot place. utilization = the highest live\n"
        "  requested bytes / capacity reached up to that refusal (how full the allocator got before it\n"
        "  failed anyone; the value at the refusal itself is in the detail lines and the JSON).\n"
        "  Refusal cause: 'f' = fragmentation (the allocator had the free bytes, not contiguous);\n"
        "  'r' = rounding (its block / power-of-two rounding left fewer free bytes than the request);\n"
        "  '*' = no refusal in the whole capped trace (every request an ideal allocator could place\n"
        "  was placed): the highest utilization reached over the trace.",
        file=out,
    )
    header = (
        f"{'seed':>4} | {'core':>10} | {'core+compaction':>15} | {'buddy':>10} | "
        f"target (>= {UTILIZATION_TARGET} and > buddy)"
    )
    print(header, file=out)
    print("-" * len(header), file=out)
    for sr in seed_results:
        r = sr.results
        print(
            f"{sr.seed:>4} | {_fmt(r['core']):>10} | {_fmt(r['core_compaction']):>15} | "
            f"{_fmt(r['buddy']):>10} | {'PASS' if sr.passed else 'FAIL'}",
            file=out,
        )
    print("-" * len(header), file=out)
    for label, agg in (("mean", lambda v: sum(v) / len(v)), ("min", min)):
        cells = [agg([sr.results[n].utilization for sr in seed_results]) for n in names]
        print(f"{label:>4} | {cells[0]:>8.4f}   | {cells[1]:>13.4f}   | {cells[2]:>8.4f}   |", file=out)
    print(file=out)
    print("Detail (arrivals consumed incl. the refused one / placed / deferred; refused request "
          "vs ideal free and the allocator's own free bytes):", file=out)
    for sr in seed_results:
        for name in names:
            r = sr.results[name]
            line = (
                f"  seed {sr.seed:>3} {name:<16} arrivals {r.arrivals:>6} placed {r.placed:>6} "
                f"deferred {r.deferred:>6} live {r.live_caches:>4}"
            )
            if r.refused:
                line += (
                    f"  refused {r.refused_bytes / MiB:8.2f} MiB "
                    f"(rounded {r.allocator_request_bytes / MiB:8.2f}),"
                    f" ideal free {r.ideal_free_bytes / MiB:8.2f} MiB,"
                    f" its free {r.allocator_free_bytes / MiB:8.2f} MiB,"
                    f" largest extent {r.allocator_largest_extent / MiB:8.2f} MiB: {r.refusal_kind};"
                    f" utilization there {r.utilization_at_end:.4f}"
                )
            else:
                line += "  no refusal (trace cap)"
            if r.compactions:
                line += (
                    f"  compactions {r.compactions}, moved {r.caches_moved} caches / "
                    f"{r.bytes_moved / GiB:.2f} GiB"
                )
            print(line, file=out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--seeds", type=int, default=None, help="number of seeds (default 5; 3 with --quick)")
    add("--quick", action="store_true", help="shorter traces and fewer timed pairs")
    add("--json", action="store_true", help="print one JSON object on stdout (table on stderr)")
    add("--arrivals", type=int, default=None, help="trace cap (default 20000; 5000 with --quick)")
    add("--load", type=float, default=2.0, help="offered load / capacity (default 2.0)")
    add("--block-bytes", type=int, default=BLOCK, help="core block_bytes on the trace (default 64 KiB)")
    add("--page-bytes", type=int, default=PAGE, help="granularity of trace sizes (default 64 KiB)")
    add("--check", action="store_true", help="cross-check the core's accounting after every call")
    add("--profile", action="store_true", help="cProfile the 100k-live loop (stderr)")
    add("--skip-per-op", action="store_true", help="only the utilization part")
    args = parser.parse_args(argv)

    seeds = list(range(1, 1 + (args.seeds or (3 if args.quick else 5))))
    arrivals = args.arrivals or (5000 if args.quick else 20000)
    pairs = 5000 if args.quick else 20000
    out = sys.stderr if args.json else sys.stdout

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    started = time.perf_counter()
    log(f"replaying {len(seeds)} seeds x {arrivals} arrivals (load {args.load}) ...")
    seed_results = run_utilization(
        seeds, arrivals=arrivals, capacity=CAPACITY, load=args.load, check=args.check,
        block=args.block_bytes, page=args.page_bytes, log=log,
    )
    report_table(seed_results, out, block=args.block_bytes, page=args.page_bytes)

    per_op: dict[int, tuple[float, list[float]]] = {}
    if not args.skip_per_op:
        for live in (10_000, 100_000):
            log(f"timing {pairs} allocate+release pairs at {live} live caches (best of 3) ...")
            best, reps, prof = measure_per_op(live, pairs, profile=args.profile and live == 100_000)
            per_op[live] = (best, reps)
            if prof:
                print(prof, file=sys.stderr)
        print(file=out)
        print("Core work per allocate+release pair (best of 3, Broker.allocate + Broker.release, "
              f"{pairs} pairs, random sizes 1..256 x 64 KiB):", file=out)
        for live, (best, reps) in per_op.items():
            mark = "" if live != 100_000 else (" PASS" if best <= US_PER_OP_TARGET else " FAIL")
            print(f"  {live:>7} live caches: {best:6.2f} us/pair  (reps: "
                  f"{', '.join(f'{t:.2f}' for t in reps)}){mark}", file=out)
        ratio = per_op[100_000][0] / per_op[10_000][0]
        print(f"  ratio 100k / 10k: {ratio:.2f}   target: <= {US_PER_OP_TARGET:g} us/pair at 100k", file=out)

    def utils(name: str) -> list[float]:
        return [sr.results[name].utilization for sr in seed_results]

    summary: dict[str, object] = {}
    for key, name in (("core", "core"), ("core_compaction", "core_compaction"), ("buddy", "buddy")):
        values = utils(name)
        summary[f"utilization_{key}"] = sum(values) / len(values)
        summary[f"utilization_{key}_min"] = min(values)
        summary[f"utilization_{key}_per_seed"] = values
        summary[f"utilization_{key}_at_refusal_per_seed"] = [
            sr.results[name].utilization_at_end for sr in seed_results
        ]
    summary["seeds"] = seeds
    summary["all_refused"] = {n: [sr.results[n].refused for sr in seed_results] for n in ALLOCATORS}
    if per_op:
        summary["us_per_op_10k"] = per_op[10_000][0]
        summary["us_per_op_100k"] = per_op[100_000][0]
        summary["us_per_op_ratio"] = per_op[100_000][0] / per_op[10_000][0]
    utilization_ok = all(sr.passed for sr in seed_results)
    per_op_ok = bool(per_op) and per_op[100_000][0] <= US_PER_OP_TARGET
    summary["targets"] = {
        "utilization_core_compaction_ge_0.97_and_above_buddy_every_seed": utilization_ok,
        "us_per_op_100k_le_20": per_op_ok if per_op else None,
    }
    summary["per_seed"] = [
        {"seed": sr.seed, "passed": sr.passed, **{n: asdict(r) for n, r in sr.results.items()}}
        for sr in seed_results
    ]
    summary["config"] = {
        "capacity_bytes": CAPACITY, "block_bytes": args.block_bytes, "page_bytes": args.page_bytes,
        "min_size_bytes": MIN_SIZE, "max_size_bytes": MAX_SIZE, "buddy_min_block_bytes": BUDDY_MIN_BLOCK,
        "arrivals_cap": arrivals, "load": args.load, "per_op_pairs": pairs, "per_op_repeats": 3,
    }
    summary["seconds"] = time.perf_counter() - started
    print(file=out)
    print(f"Targets: utilization {'MET' if utilization_ok else 'MISSED'}; "
          f"per-op {'MET' if per_op_ok else ('MISSED' if per_op else 'not measured')}  "
          f"({summary['seconds']:.1f} s)", file=out)
    if args.json:
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
