"""Nothing a session or a query triggers walks every cache (issue 9.5), and what errors
quote of a client's input is bounded.

Complexity is checked by counting, not timing: the broker's cache and segment tables
are swapped for dicts that refuse to be walked whole and count look-ups, so a call that
costs O(all caches) fails however fast the machine is.
"""

from __future__ import annotations

import pytest

from kvbroker.core import (
    AllocationRequest,
    Broker,
    CacheState,
    DeviceSpec,
    InvalidArgument,
    NotFound,
    PoolSpec,
)
from kvbroker.core.audit import audit
from kvbroker.core.caches import PAGE_SCAN_SLACK

from .support import allocate

K = 1024
MANY = 3000


class Unwalkable(dict):
    """A dict that counts look-ups and fails any walk over all its entries."""

    lookups = 0

    def _walked(self, *args):
        raise AssertionError("walked every entry")

    __iter__ = keys = values = items = _walked  # type: ignore[assignment]

    def get(self, key, default=None):
        Unwalkable.lookups += 1
        return super().get(key, default)

    def __getitem__(self, key):
        Unwalkable.lookups += 1
        return super().__getitem__(key)


def crowded() -> Broker:
    """MANY caches of other sessions in 64 segments each mapped by another session, and
    session "s" holding three caches (one pinned, one shared) and mapping two segments."""
    b = Broker(
        [DeviceSpec("d0", 64 * MANY * K, 4 * K)],
        [PoolSpec("p", ("d0",), block_bytes=K, segment_bytes=MANY * K),
         PoolSpec("q", ("d0",), block_bytes=K, segment_bytes=MANY * K)],
    )
    for i in range(MANY):
        r = allocate(b, AllocationRequest("q" if i % 100 == 0 else "p", K, holder=f"o{i % 7}", cache_id=f"c{i:05d}"))
        b.note_mapped(r.cache.extents[0].segment_id, f"o{i % 7}")
    for name, pinned in (("s1", True), ("s2", False)):
        allocate(b, AllocationRequest("p", K, holder="s", cache_id=name, pinned=pinned))
    b.attach("c00007", "s")
    b.note_mapped(1, "s")
    b.note_mapped(2, "s")
    return b


def forbid_walks(b: Broker) -> None:
    ledger = b._ledger
    ledger.caches.records = Unwalkable(ledger.caches.records)
    ledger.segments._segments = Unwalkable(ledger.segments._segments)
    Unwalkable.lookups = 0


def test_ending_a_session_costs_its_own_caches_and_segments() -> None:
    b = crowded()
    forbid_walks(b)
    freed, retired = b.end_session("s")
    assert sorted(freed) == ["s1", "s2"] and retired == []
    assert Unwalkable.lookups <= 30, Unwalkable.lookups
    assert "s" not in b.get("c00007").holders
    assert b.drop_holder("nobody") == []


def test_stats_never_walk_the_caches() -> None:
    b = crowded()
    forbid_walks(b)
    assert b.stats().total.active_caches == MANY + 2
    assert Unwalkable.lookups == 0


def test_a_page_costs_the_page() -> None:
    b = crowded()
    expected = [f"c{i:05d}" for i in range(MANY)] + ["s1", "s2"]
    forbid_walks(b)
    page, token = b.list_caches(after="c01000", limit=50)
    assert [c.cache_id for c in page] == expected[1001:1051] and token == "c01050"
    assert Unwalkable.lookups <= 60, Unwalkable.lookups
    got, token = [], ""
    while True:
        page, token = b.list_caches(after=token, limit=700)
        got += [c.cache_id for c in page]
        if not token:
            break
    assert got == expected


def test_a_filtered_page_scans_a_bounded_number_of_ids() -> None:
    b = crowded()
    forbid_walks(b)
    page, token = b.list_caches(pool="q", limit=5)  # one cache in 100 is in q
    assert [c.cache_id for c in page] == ["c00000", "c00100", "c00200", "c00300", "c00400"]
    assert token == "c00400"
    got, token, pages = [], "", 0
    while True:
        page, token = b.list_caches(pool="q", after=token, limit=1000)
        got += [c.cache_id for c in page]
        pages += 1
        if not token:
            break
    assert got == [f"c{i:05d}" for i in range(0, MANY, 100)]
    assert Unwalkable.lookups <= pages * (1000 + PAGE_SCAN_SLACK) + 10
    page, token = b.list_caches(state=CacheState.EVICTED, limit=10)
    assert page == [] and token == "", "nothing matches: the last page is empty and final"


def test_paging_validates_its_arguments() -> None:
    b = crowded()
    with pytest.raises(InvalidArgument):
        b.list_caches(limit=0)
    with pytest.raises(NotFound):
        b.list_caches(pool="nope", limit=1)


# --- what errors quote ------------------------------------------------------------------


def small() -> Broker:
    return Broker([DeviceSpec("d0", 256 * K, 4 * K)], [PoolSpec("p", ("d0",), block_bytes=4 * K)])


@pytest.mark.parametrize(
    "request_",
    [
        AllocationRequest("x" * 20000, 4 * K),
        AllocationRequest("p", 4 * K, device_hint="d" * 20000),
        AllocationRequest("p", 4 * K, cache_id="y" * 20000),
        AllocationRequest("p", 4 * K, shape=(-1,) * 20000),
        AllocationRequest("p", 4 * K, priority=10**20000),
        AllocationRequest("p", 10**20000),
        AllocationRequest("p", "4096" * 5000),  # type: ignore[arg-type]
    ],
    ids=["pool", "device", "cache_id", "shape", "priority", "huge size", "size of the wrong type"],
)
def test_errors_quote_at_most_a_bounded_piece_of_the_input(request_: AllocationRequest) -> None:
    b = small()
    with pytest.raises((NotFound, InvalidArgument)) as err:
        b.allocate(request_)
    assert len(str(err.value)) < 400, str(err.value)[:400]
    audit(b)


def test_lookups_quote_at_most_a_bounded_piece_of_the_id() -> None:
    b = small()
    for call in (b.get, b.attach, b.pin, b.unpin, b.release):
        with pytest.raises(InvalidArgument) as err:
            call("z" * 20000)
        assert len(str(err.value)) < 400
    with pytest.raises(NotFound) as err:
        b.plan_compaction(device="d" * 20000)
    assert len(str(err.value)) < 400
