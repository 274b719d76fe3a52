"""The seeded trace of benchmarks/fragmentation.py, part 1: sizes, arrivals, lifetimes,
and the device they are replayed on."""

from __future__ import annotations

import math

from benchmarks.harness import GiB, KiB, MiB, seeded_rng

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


def make_trace(
    seed: int, arrivals: int, *, capacity: int, load: float, page: int = PAGE
) -> list[tuple[float, int, float]]:
    """``arrivals`` tuples (time, nbytes, lifetime): Poisson arrivals of rate 1, sizes
    log-uniform in [MIN_SIZE, MAX_SIZE] rounded up to ``page``, exponential lifetimes with
    mean ``load * capacity / mean size``."""
    rng = seeded_rng(seed)
    lo, hi = math.log(MIN_SIZE), math.log(MAX_SIZE)
    mean_size = (MAX_SIZE - MIN_SIZE) / (hi - lo)
    mean_lifetime = load * capacity / mean_size
    trace, now = [], 0.0
    for _ in range(arrivals):
        now += rng.expovariate(1.0)
        nbytes = min(MAX_SIZE, -(-int(math.exp(rng.uniform(lo, hi))) // page) * page)
        trace.append((now, nbytes, rng.expovariate(1.0 / mean_lifetime)))
    return trace

