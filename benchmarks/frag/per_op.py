"""Core work per allocate+release pair at 10k and 100k live caches (benchmarks/
fragmentation.py, part 2)."""

from __future__ import annotations

import cProfile
import io
import pstats
import time

from benchmarks.frag.trace import BLOCK, POOL
from benchmarks.harness import TiB, seeded_rng
from kvbroker.core import AllocationRequest, Broker, DeviceSpec, PoolSpec


def measure_per_op(
    live_caches: int, pairs: int, *, repeats: int = 3, seed: int = 0, profile: bool = False
) -> tuple[float, list[float], str]:
    """Best-of-``repeats`` microseconds per allocate+release pair with ``live_caches``
    live caches. Returns (best, all repetitions, profile text)."""
    rng = seeded_rng(seed)
    broker = Broker(
        [DeviceSpec("host", TiB)],
        [PoolSpec(POOL, ("host",), segment_bytes=TiB, block_bytes=BLOCK)],
    )

    def request() -> AllocationRequest:
        return AllocationRequest(pool=POOL, nbytes=rng.randint(1, 256) * BLOCK)

    release, ready = broker.release, broker.cache_ready

    def allocate(req: AllocationRequest) -> str:
        """Place and hand out, as the engine does once the bytes are backed (a new
        segment is reported created; every cache is made ready)."""
        result = broker.allocate(req, allow_eviction=False, allow_compaction=False)
        if result.new_segment is not None:
            broker.segment_created(result.new_segment.segment_id)
        ready(result.cache.cache_id)
        return result.cache.cache_id

    ids = [allocate(request()) for _ in range(live_caches)]
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
            new_id = allocate(req)
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

