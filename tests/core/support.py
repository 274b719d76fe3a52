"""Helpers shared by the core's tests: finish an allocation as the daemon does, evict."""

from __future__ import annotations

from kvbroker.core import AllocateResult, AllocationRequest, Broker


def settle(b: Broker, result: AllocateResult) -> AllocateResult:
    """Finish a placed allocation as the daemon does when its backend work succeeds:
    the new segment is created, the cache made ready. Returns ``result``."""
    assert result.cache is not None, result
    if result.new_segment is not None:
        b.segment_created(result.new_segment.segment_id)
    assert b.cache_ready(result.cache.cache_id)
    return result


def allocate(b: Broker, request: AllocationRequest) -> AllocateResult:
    """``allocate`` and ``settle``."""
    return settle(b, b.allocate(request))


def evict(b: Broker, cache_id: str) -> None:
    """Evict a resident, unpinned cache now, as the pressure ladder would (the broker has
    no operator eviction: this reaches into its ledger)."""
    ledger = b._ledger
    ledger.evict(ledger.caches.records[cache_id], "evicted by a test", cause="policy")
