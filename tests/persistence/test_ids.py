"""Restored caches keep their ids, and no id the broker generates later can be one of
them: restore allocates with each saved id before anything is served, and the core's
generator skips every id that exists (even one with this run's own prefix)."""

from __future__ import annotations

import pytest

from kvbroker.core import AllocationRequest, AlreadyExists, Broker, DeviceSpec, PoolSpec
from tests.core.support import allocate

K = 1024


def test_generated_ids_skip_restored_ones_even_with_the_same_prefix():
    broker = Broker([DeviceSpec("d0", 1024 * K, 4 * K)], [PoolSpec("p", ("d0",), block_bytes=4 * K, segment_bytes=64 * K)],
                    id_prefix="run")  # fmt: skip
    # A previous run had the same prefix (4 random bytes each run: unlikely, possible).
    restored = [f"run-{n:x}" for n in (1, 2, 3)] + ["old-7"]
    for cache_id in restored:
        allocate(broker, AllocationRequest(pool="p", nbytes=4 * K, holder="~restored", cache_id=cache_id, retain=True))
    fresh = {allocate(broker, AllocationRequest(pool="p", nbytes=4 * K)).cache.cache_id for _ in range(5)}
    assert not fresh & set(restored)
    assert {c.cache_id for c in broker.caches()} == fresh | set(restored)
    with pytest.raises(AlreadyExists):
        broker.allocate(AllocationRequest(pool="p", nbytes=4 * K, cache_id="old-7"))
