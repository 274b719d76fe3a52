"""The utilization table of benchmarks/fragmentation.py."""

from __future__ import annotations

from collections.abc import Sequence

from benchmarks.frag.replay import ALLOCATORS, ReplayResult, SeedResult
from benchmarks.frag.trace import BUDDY_MIN_BLOCK, CAPACITY, MAX_SIZE, MIN_SIZE, UTILIZATION_TARGET
from benchmarks.harness import GiB, KiB, MiB


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

