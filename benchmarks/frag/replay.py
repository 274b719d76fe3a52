"""Replaying one trace on each allocator until its first refusal (benchmarks/
fragmentation.py, part 1)."""

from __future__ import annotations

import heapq
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from benchmarks.frag.allocators import BuddyAllocator, CoreAllocator
from benchmarks.frag.trace import UTILIZATION_TARGET, make_trace


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

