"""The cache table: records by id, in id order, by holder, and the tombstones of the gone.

Three indexes are kept in step with the records, so that nothing a client or a session
triggers costs time proportional to every cache on the node:

- by id (a dict): every look-up;
- in id order (``SortedKeys``): a page of ``ListCaches`` costs O(log n + page);
- by holder (holder -> ids it holds): a session that ends costs O(its caches);
- unheld, per arena (``ArenaRecord.unheld``): the caches nobody holds, which background
  reclamation may take, found in O(their number) however many caches are held.

Tombstones remember, for ``TOMBSTONES`` ids, why a cache is gone: a second Release of a
freed cache is harmless, a holder of an evicted one learns it was evicted, and an id
that never existed still gets NOT_FOUND.

Not thread-safe: one owner (the broker) calls it.
"""

from __future__ import annotations

import enum
import itertools
from collections import OrderedDict
from collections.abc import Callable, Iterator

from kvbroker.core.errors import FailedPrecondition, InvalidArgument, NotFound
from kvbroker.core.records import CacheRecord
from kvbroker.core.sortedkeys import SortedKeys
from kvbroker.core.types import CacheState, validate_id

#: How many gone ids are remembered (bounded: a tombstone is about 200 bytes).
TOMBSTONES = 65536

#: At most this many ids are examined per page beyond the page itself, so that a filter
#: that matches little cannot make one page walk every cache (the page then comes back
#: short, with a token to continue from).
PAGE_SCAN_SLACK = 4096


def retained_resident(rec: CacheRecord) -> bool:
    """Whether ``rec`` counts as idle retained whenever nobody holds it: retained and
    RESIDENT (a PENDING one becomes idle when ready, an EVICTED one never is)."""
    return rec.retain and rec.state is CacheState.RESIDENT


class Gone(enum.Enum):
    """Why a cache id has no record any more (a tombstone)."""

    RELEASED = "released"  #: freed by its holders: a later Release is harmless
    EVICTED = "evicted"  #: its bytes were evicted, then its holders released it
    FORCED = "released by force"  #: another holder force-released it from under its holders


class CacheTable:
    """Cache records, indexed by id, in id order and by holder; tombstones."""

    __slots__ = ("records", "_ordered", "_held", "_tombstones", "_serial", "_prefix")

    def __init__(self, id_prefix: str) -> None:
        self.records: dict[str, CacheRecord] = {}
        self._ordered = SortedKeys()
        self._held: dict[str, set[str]] = {}
        self._tombstones: OrderedDict[str, Gone] = OrderedDict()
        self._serial = itertools.count(1)
        self._prefix = id_prefix

    def __len__(self) -> int:
        return len(self.records)

    def get(self, cache_id: str) -> CacheRecord | None:
        return self.records.get(cache_id)

    def lookup(self, cache_id: str) -> CacheRecord:
        """The record of ``cache_id``. Raises ``InvalidArgument`` (empty or malformed id),
        ``FailedPrecondition`` (evicted, or released by force by another holder) or
        ``NotFound``."""
        rec = self.records.get(cache_id)
        if rec is not None:
            return rec
        if not cache_id:
            raise InvalidArgument("cache_id", "is required")
        validate_id("cache_id", cache_id)
        gone = self._tombstones.get(cache_id)
        if gone is Gone.FORCED:
            raise FailedPrecondition(f"cache {cache_id!r} was evicted (released by force)")
        if gone is Gone.EVICTED:
            raise FailedPrecondition(f"cache {cache_id!r} was evicted")
        raise NotFound(f"cache {cache_id!r} does not exist")

    def gone(self, cache_id: str) -> Gone | None:
        return self._tombstones.get(cache_id)

    def new_id(self) -> str:
        """A fresh generated id: the prefix and a serial number in hex."""
        while True:
            cache_id = f"{self._prefix}-{next(self._serial):x}"
            if cache_id not in self.records:
                return cache_id

    # -- life -------------------------------------------------------------------------

    def add(self, rec: CacheRecord, holder: str) -> None:
        """Enter a new record held by ``holder``. Cost: O(log n)."""
        cache_id = rec.cache_id
        self.records[cache_id] = rec
        self._ordered.add(cache_id)
        if cache_id in self._tombstones:
            del self._tombstones[cache_id]
        self.hold(rec, holder)

    def forget(self, rec: CacheRecord, gone: Gone | None) -> None:
        """Remove a record (with every hold left on it), leaving a tombstone unless
        ``gone`` is None (an allocation undone: nobody ever saw the id)."""
        cache_id = rec.cache_id
        if not rec.holders and retained_resident(rec):
            rec.arena.idle_retained -= 1
        for holder in rec.holders:
            self._unindex(holder, cache_id)
        rec.holders.clear()
        rec.arena.unheld.pop(cache_id, None)
        del self.records[cache_id]
        self._ordered.remove(cache_id)
        if gone is not None:
            self._tombstones[cache_id] = gone
            if len(self._tombstones) > TOMBSTONES:
                self._tombstones.popitem(last=False)

    # -- holders ----------------------------------------------------------------------

    # The arena's ``idle_retained`` counter follows a retained resident cache's holders
    # going from none to some and back (``retained_resident``).

    def hold(self, rec: CacheRecord, holder: str) -> None:
        if holder not in rec.holders:
            if not rec.holders:
                if retained_resident(rec):
                    rec.arena.idle_retained -= 1
                rec.arena.unheld.pop(rec.cache_id, None)
            rec.holders.add(holder)
            held = self._held.get(holder)
            if held is None:
                self._held[holder] = {rec.cache_id}
            else:
                held.add(rec.cache_id)

    def unhold(self, rec: CacheRecord, holder: str) -> None:
        if holder in rec.holders:
            rec.holders.remove(holder)
            self._unindex(holder, rec.cache_id)
            if not rec.holders:
                if retained_resident(rec):
                    rec.arena.idle_retained += 1
                rec.arena.unheld[rec.cache_id] = rec

    def unhold_all(self, rec: CacheRecord) -> None:
        if rec.holders:
            for holder in rec.holders:
                self._unindex(holder, rec.cache_id)
            rec.holders.clear()
            if retained_resident(rec):
                rec.arena.idle_retained += 1
            rec.arena.unheld[rec.cache_id] = rec

    def held_by(self, holder: str) -> list[str]:
        """The ids ``holder`` holds, in id order. Cost: O(k log k) for its k caches."""
        return sorted(self._held.get(holder, ()))

    def holders(self) -> dict[str, set[str]]:
        """The holder index itself (for ``audit``)."""
        return self._held

    def _unindex(self, holder: str, cache_id: str) -> None:
        held = self._held[holder]
        held.discard(cache_id)
        if not held:
            del self._held[holder]

    # -- order ------------------------------------------------------------------------

    def in_order(self, after: str = "") -> Iterator[CacheRecord]:
        """Records with ids greater than ``after``, ascending. The table must not
        change while the iterator is in use."""
        records = self.records
        return (records[cache_id] for cache_id in self._ordered.after(after))

    def page(
        self, match: Callable[[CacheRecord], bool], after: str, limit: int
    ) -> tuple[list[CacheRecord], str]:
        """Up to ``limit`` matching records with ids after ``after``, and the token of the
        next page ("" at the end).

        Cost: O(log n + limit + PAGE_SCAN_SLACK) at most: when that many ids were examined
        before the page filled, it comes back short with a token to continue from.
        """
        page: list[CacheRecord] = []
        budget = limit + PAGE_SCAN_SLACK
        for rec in self.in_order(after):
            if budget == 0:
                return page, last  # every id up to ``last`` was examined
            budget -= 1
            last = rec.cache_id
            if match(rec):
                if len(page) == limit:
                    return page, page[-1].cache_id  # another match follows
                page.append(rec)
        return page, ""
