"""Fragmentation and allocator cost of the kvbroker core (DESIGN.md section 10).

Two measurements, both on the pure core (``kvbroker.core.Broker``), no daemon, no GPU.
The parts are modules of benchmarks/frag/: ``trace`` (the seeded trace and the device),
``allocators``, ``replay`` (part 1), ``per_op`` (part 2) and ``report`` (the table).

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
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the checkout: benchmarks, kvbroker

from benchmarks.frag.per_op import measure_per_op  # noqa: E402
from benchmarks.frag.replay import ALLOCATORS, run_utilization  # noqa: E402
from benchmarks.frag.report import report_table  # noqa: E402
from benchmarks.frag.trace import BLOCK, BUDDY_MIN_BLOCK, CAPACITY, MAX_SIZE, MIN_SIZE, PAGE, US_PER_OP_TARGET  # noqa: E402
from benchmarks.harness import emit  # noqa: E402


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
    targets = (f"\nTargets: utilization {'MET' if utilization_ok else 'MISSED'}; "
               f"per-op {'MET' if per_op_ok else ('MISSED' if per_op else 'not measured')}  "
               f"({summary['seconds']:.1f} s)")  # fmt: skip
    emit(summary, targets, as_json=args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
