"""Eviction policies: which unpinned caches to give up first when a pool needs room.

A policy only orders candidates; it never frees anything (Plasma's ``IEvictionPolicy``).
The broker keeps it informed through hooks and, under pressure, walks
``victims(nbytes_needed)`` and evicts until enough bytes are free. Policies are picked by
name from ``POLICIES`` (SGLang's strategy registry).

Hooks run on every allocation made ready, attach, pin and release, so each is O(1)
amortized (LFU: O(log) when a key appears or empties): a few dict operations, about 1 us
in CPython at 100k live caches. A pinned cache stays known
to its policy, so that its accesses still count, but is never offered as a victim.

Misuse by the caller is a bug, not a client error: inserting a known id raises
``RuntimeError``, touching an unknown id ``KeyError``. Not thread-safe (one owner).
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from itertools import count, islice
from types import MappingProxyType
from typing import Protocol

from kvbroker.core.errors import InvalidArgument
from kvbroker.core.sortedkeys import SortedKeys


class EvictionPolicy(Protocol):
    """Orders unpinned caches for eviction. Chooses; never frees.

    ``victims(nbytes_needed)`` yields every unpinned cache once, best victim first. The
    caller may ``on_remove`` the id just yielded before asking for the next one; other
    mutations during the iteration are not reflected. Pin hooks fire on 0 -> 1 and
    1 -> 0 only (the caller counts pins). ``on_access`` is a use the broker sees: an
    attach or a pin (a client's reads and writes of a mapped cache never reach the
    broker). ``on_remove`` is a release or, with ``evicted=True``, an eviction, pinned or
    not. The broker tells a policy of a cache only once its bytes are ready (a pending
    cache is no candidate) and stops at its removal.

    Attributes:
        name: the policy's key in ``POLICIES``.
    """

    name: str

    def on_insert(self, cache_id: str, nbytes: int) -> None: ...
    def on_access(self, cache_id: str) -> None: ...
    def on_pin(self, cache_id: str) -> None: ...  # leaves the candidate set
    def on_unpin(self, cache_id: str) -> None: ...  # rejoins it
    def on_remove(self, cache_id: str, *, evicted: bool = False) -> None: ...  # gone for good
    def victims(self, nbytes_needed: int) -> Iterator[str]: ...


def _lazy_keys(queue: Mapping[str, object], first_chunk: int = 8) -> Iterator[str]:
    """Yield ``queue``'s keys in order, reading them in chunks that grow eightfold.

    No iterator over ``queue`` stays open across a ``yield``, so the caller may delete
    keys in between. Each refill skips the keys already yielded that are still present:
    at C speed when they are a prefix of ``queue`` (the caller deleted or kept victims
    but reordered nothing), else by a scan. Taking k victims costs O(k) amortized, not
    O(n); a full walk costs about two C-speed passes over ``queue`` and one Python pass.
    Keys added after the last chunk was read are not yielded.
    """
    yielded: set[str] = set()
    chunk_size = first_chunk
    while True:
        num_kept = len(queue.keys() & yielded) if yielded else 0
        if not num_kept or yielded.issuperset(islice(queue, num_kept)):
            chunk = list(islice(queue, num_kept, num_kept + chunk_size))
        else:
            chunk = list(islice((key for key in queue if key not in yielded), chunk_size))
        if len(chunk) < chunk_size:  # the last chunk: no refill will need ``yielded``
            yield from (key for key in chunk if key in queue)
            return
        for key in chunk:
            if key in queue:
                yielded.add(key)
                yield key
        chunk_size *= 8


def _already_inserted(cache_id: str) -> RuntimeError:
    return RuntimeError(f"eviction policy: cache {cache_id!r} inserted twice")


class LRUPolicy:
    """Least recently inserted or accessed first.

    Why: the default; recency is the best cheap predictor for KV caches of live
    conversations. An unpin counts as a use, so a cache rejoins at the recent end.

    Invariant: ``_candidates`` holds exactly the unpinned ids, least recent first;
    ``_pinned`` the pinned ones; the two are disjoint.

    Cost: every hook O(1) (one ``OrderedDict`` operation); ``victims`` O(k) for k taken.
    """

    name = "lru"
    __slots__ = ("_candidates", "_pinned")

    def __init__(self) -> None:
        self._candidates: OrderedDict[str, None] = OrderedDict()
        self._pinned: set[str] = set()

    def on_insert(self, cache_id: str, nbytes: int) -> None:
        if cache_id in self._candidates or cache_id in self._pinned:
            raise _already_inserted(cache_id)
        self._candidates[cache_id] = None

    def on_access(self, cache_id: str) -> None:
        try:
            self._candidates.move_to_end(cache_id)
        except KeyError:
            if cache_id not in self._pinned:
                raise

    def on_pin(self, cache_id: str) -> None:
        del self._candidates[cache_id]
        self._pinned.add(cache_id)

    def on_unpin(self, cache_id: str) -> None:
        self._pinned.remove(cache_id)
        self._candidates[cache_id] = None

    def on_remove(self, cache_id: str, *, evicted: bool = False) -> None:
        try:
            del self._candidates[cache_id]
        except KeyError:
            self._pinned.remove(cache_id)

    def victims(self, nbytes_needed: int) -> Iterator[str]:
        return _lazy_keys(self._candidates)


class LFUPolicy:
    """Least frequently used first, with dynamic aging (LFU-DA: Arlitt, Cherkasova, Dilley,
    Friedrich and Jin, 2000); ties go to the least recent.

    Why LFU: a pool of shared prefixes (system prompts, few-shot examples) wants to keep
    those that many requests reuse, however old. Why the aging: under plain LFU a new
    cache, used once, is always the first victim, so a pool under pressure evicts every
    newcomer before it can earn a second use, while favourites of a past workload keep
    their counts forever.

    How: each cache has a key ``K = L + F``, where ``F`` is its use count (1 at insert,
    +1 per ``on_access``) and ``L`` is the policy's age when the cache was last used.
    ``L`` starts at 0 and rises to the key of each evicted cache (``on_remove(...,
    evicted=True)``; it never falls). Victims come in ascending ``K``, least recent first
    within a key. So a newcomer enters at ``L + 1``, above every cache that has not been
    used since ``L`` passed its key, and a favourite's lead fades unless it is used again.
    Until the first eviction ``L`` is 0 and the order is plain LFU.

    Invariant: ``_buckets[K]`` holds the unpinned ids with key ``K`` in the order they
    reached it; ``_keys`` holds exactly the keys of non-empty buckets; ``_key`` and
    ``_uses`` know every id, pinned or not (a pinned cache's uses still count).

    Cost: insert, pin and unpin O(1) plus O(log k) when a bucket appears or empties (k
    distinct keys); an access the same; ``victims`` O(log k) per key visited plus O(1)
    per id yielded.
    """

    name = "lfu"
    __slots__ = ("_age", "_uses", "_key", "_buckets", "_keys", "_pinned")

    def __init__(self) -> None:
        self._age = 0
        self._uses: dict[str, int] = {}
        self._key: dict[str, int] = {}
        self._buckets: dict[int, OrderedDict[str, None]] = {}
        self._keys = SortedKeys()
        self._pinned: set[str] = set()

    @property
    def age(self) -> int:
        """``L``: the key of the latest eviction (the highest so far)."""
        return self._age

    def key(self, cache_id: str) -> int:
        """The cache's current key ``K`` (for tests and diagnostics)."""
        return self._key[cache_id]

    def on_insert(self, cache_id: str, nbytes: int) -> None:
        if cache_id in self._key:
            raise _already_inserted(cache_id)
        self._uses[cache_id] = 1
        self._key[cache_id] = key = self._age + 1
        self._enter(cache_id, key)

    def on_access(self, cache_id: str) -> None:
        uses = self._uses[cache_id] + 1
        self._uses[cache_id] = uses
        old, new = self._key[cache_id], self._age + uses
        self._key[cache_id] = new
        if cache_id not in self._pinned:
            self._leave(cache_id, old)
            self._enter(cache_id, new)

    def on_pin(self, cache_id: str) -> None:
        self._leave(cache_id, self._key[cache_id])
        self._pinned.add(cache_id)

    def on_unpin(self, cache_id: str) -> None:
        self._pinned.remove(cache_id)
        self._enter(cache_id, self._key[cache_id])

    def on_remove(self, cache_id: str, *, evicted: bool = False) -> None:
        key = self._key.pop(cache_id)
        del self._uses[cache_id]
        if cache_id in self._pinned:
            self._pinned.remove(cache_id)
        else:
            self._leave(cache_id, key)
        if evicted and key > self._age:
            self._age = key

    def victims(self, nbytes_needed: int) -> Iterator[str]:
        # The next key is looked up afresh after each bucket, so the walk survives any
        # change in between; an id accessed meanwhile moves to a higher key and could be
        # met again, hence ``yielded``.
        yielded: set[str] = set()
        key = self._keys.first_after(0)
        while key is not None:
            bucket = self._buckets.get(key)
            if bucket:
                for cache_id in _lazy_keys(bucket):
                    if cache_id not in yielded:
                        yielded.add(cache_id)
                        yield cache_id
            key = self._keys.first_after(key)

    def _enter(self, cache_id: str, key: int) -> None:
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = OrderedDict()
            self._keys.add(key)
        bucket[cache_id] = None

    def _leave(self, cache_id: str, key: int) -> None:
        bucket = self._buckets[key]
        del bucket[cache_id]
        if not bucket:
            del self._buckets[key]
            self._keys.remove(key)


class SizeAwareLRUPolicy:
    """Prefers one victim big enough for the request; least recent first among those.

    Why: evicting one cache of at least ``nbytes_needed`` frees a contiguous extent that
    fits the request, where many small evictions free scattered holes that may still not
    fit it. ``victims(n)`` yields the candidates of size >= n in LRU order, then the
    rest in LRU order.

    Invariant: ``_class_of`` maps each unpinned id to its size class: the
    ``OrderedDict`` of the unpinned ids with the same ``nbytes.bit_length()``, each with
    the stamp of its last use, in stamp order. ``_nbytes`` knows every id, pinned or not.

    Cost: hooks O(1) (one ``OrderedDict`` update, as LRU). ``victims(n)`` merges size
    classes by stamp (a heap over at most 64 classes: O(log 64) per victim), first those
    above ``n``'s and the big-enough members of ``n``'s own, then all: the first victim
    costs O(number of classes + members of ``n``'s class smaller than ``n``).
    """

    name = "size_aware_lru"
    __slots__ = ("_class_of", "_classes", "_nbytes", "_clock")

    def __init__(self) -> None:
        self._class_of: dict[str, OrderedDict[str, int]] = {}
        self._classes: dict[int, OrderedDict[str, int]] = {}
        self._nbytes: dict[str, int] = {}
        self._clock = count()

    def on_insert(self, cache_id: str, nbytes: int) -> None:
        if cache_id in self._nbytes:
            raise _already_inserted(cache_id)
        self._nbytes[cache_id] = nbytes
        self._add(cache_id, nbytes)

    def on_access(self, cache_id: str) -> None:
        members = self._class_of.get(cache_id)
        if members is None:
            if cache_id not in self._nbytes:
                raise KeyError(cache_id)
            return  # pinned
        members[cache_id] = next(self._clock)
        members.move_to_end(cache_id)

    def on_pin(self, cache_id: str) -> None:
        del self._class_of.pop(cache_id)[cache_id]

    def on_unpin(self, cache_id: str) -> None:
        if cache_id in self._class_of:
            raise KeyError(cache_id)  # not pinned
        self._add(cache_id, self._nbytes[cache_id])

    def on_remove(self, cache_id: str, *, evicted: bool = False) -> None:
        del self._nbytes[cache_id]
        members = self._class_of.pop(cache_id, None)
        if members is not None:
            del members[cache_id]

    def victims(self, nbytes_needed: int) -> Iterator[str]:
        yielded: set[str] = set()
        for floor in (nbytes_needed, 0) if nbytes_needed > 0 else (0,):
            boundary = floor.bit_length()
            streams = [
                self._stamped(members, floor if size_class == boundary else 0)
                for size_class, members in self._classes.items()
                if size_class >= boundary and members
            ]
            for _, cache_id in heapq.merge(*streams):
                if cache_id in self._class_of and cache_id not in yielded:
                    yielded.add(cache_id)
                    yield cache_id

    def _add(self, cache_id: str, nbytes: int) -> None:
        members = self._classes.get(nbytes.bit_length())
        if members is None:
            members = self._classes[nbytes.bit_length()] = OrderedDict()
        members[cache_id] = next(self._clock)
        self._class_of[cache_id] = members

    def _stamped(self, members: OrderedDict[str, int], floor: int) -> Iterator[tuple[int, str]]:
        for cache_id in _lazy_keys(members, first_chunk=1):
            if self._nbytes[cache_id] >= floor:
                yield members[cache_id], cache_id


class AdaptivePolicy:
    """ARC (Megiddo and Modha, 2003): balances recency against frequency by itself.

    Why: LRU is flushed by one long scan of one-time caches (a batch job sweeping
    prompts); plain LFU keeps a stale working set forever once the workload shifts (``lfu``
    ages it out, but only as fast as evictions raise its age). ARC learns from its
    mistakes which of the two a pool currently needs.

    How: ``T1`` holds caches used once since they arrived, ``T2`` caches used at least
    twice (both LRU order). Ghost lists ``B1``/``B2`` remember the ids recently removed
    from ``T1``/``T2`` (ids only, no bytes). Re-inserting an id found in ``B1`` means
    ``T1`` was too small: the target ``p`` for ``|T1|`` grows by ``max(1, |B2|/|B1|)``;
    found in ``B2``, ``p`` shrinks by ``max(1, |B1|/|B2|)``; either way the id goes to
    ``T2``. ``victims`` takes from ``T1`` while its unpinned count (less the victims the
    caller kept) exceeds ``p``, else from ``T2``, and falls back to the other list when
    one runs out.

    Sizes are counts, not bytes, as in ARC: ``c``, the cache size ARC assumes, is the
    highest number of resident caches seen; ``0 <= p <= c``; ghosts are trimmed so that
    ``|T1| + |B1| <= c`` and ``resident + |B1| + |B2| <= 2c``. A pinned id keeps its list
    tag and is never a victim. ARC's tie rule for a ``B2`` hit at ``|T1| == p`` is
    dropped, since the policy does not know which id the room is for.

    Cost: hooks O(1) amortized (ghost trimming pops at most what was added); ``victims``
    O(k) for k taken.
    """

    name = "adaptive"
    __slots__ = ("_t1", "_t2", "_b1", "_b2", "_pinned_in_t2", "_p", "_c")

    def __init__(self) -> None:
        self._t1: OrderedDict[str, None] = OrderedDict()
        self._t2: OrderedDict[str, None] = OrderedDict()
        self._b1: OrderedDict[str, None] = OrderedDict()
        self._b2: OrderedDict[str, None] = OrderedDict()
        self._pinned_in_t2: dict[str, bool] = {}
        self._p = 0.0
        self._c = 0

    @property
    def target_t1(self) -> float:
        """ARC's ``p``: how many caches the recency list ``T1`` should keep."""
        return self._p

    def on_insert(self, cache_id: str, nbytes: int) -> None:
        if cache_id in self._t1 or cache_id in self._t2 or cache_id in self._pinned_in_t2:
            raise _already_inserted(cache_id)
        resident = len(self._t1) + len(self._t2) + len(self._pinned_in_t2) + 1
        if resident > self._c:
            self._c = resident
        if cache_id in self._b1:  # T1 was too small
            self._p = min(float(self._c), self._p + max(1.0, len(self._b2) / len(self._b1)))
            del self._b1[cache_id]
            self._t2[cache_id] = None
        elif cache_id in self._b2:  # T2 was too small
            self._p = max(0.0, self._p - max(1.0, len(self._b1) / len(self._b2)))
            del self._b2[cache_id]
            self._t2[cache_id] = None
        else:  # a ghost hit trades a ghost for a resident; only this grows the totals
            self._t1[cache_id] = None
            self._trim_ghosts(resident)

    def on_access(self, cache_id: str) -> None:
        if cache_id in self._t2:
            self._t2.move_to_end(cache_id)
        elif cache_id in self._t1:
            del self._t1[cache_id]
            self._t2[cache_id] = None
        elif cache_id in self._pinned_in_t2:
            self._pinned_in_t2[cache_id] = True
        else:
            raise KeyError(cache_id)

    def on_pin(self, cache_id: str) -> None:
        if cache_id in self._t1:
            del self._t1[cache_id]
            self._pinned_in_t2[cache_id] = False
        else:
            del self._t2[cache_id]
            self._pinned_in_t2[cache_id] = True

    def on_unpin(self, cache_id: str) -> None:
        in_t2 = self._pinned_in_t2.pop(cache_id)
        (self._t2 if in_t2 else self._t1)[cache_id] = None

    def on_remove(self, cache_id: str, *, evicted: bool = False) -> None:
        if cache_id in self._t1:
            del self._t1[cache_id]
            self._b1[cache_id] = None
        elif cache_id in self._t2:
            del self._t2[cache_id]
            self._b2[cache_id] = None
        else:
            in_t2 = self._pinned_in_t2.pop(cache_id)
            (self._b2 if in_t2 else self._b1)[cache_id] = None
        self._trim_ghosts(len(self._t1) + len(self._t2) + len(self._pinned_in_t2))

    def victims(self, nbytes_needed: int) -> Iterator[str]:
        t1_stream, t2_stream = _lazy_keys(self._t1), _lazy_keys(self._t2)
        num_t1_kept = 0  # T1 victims the caller looked at and did not remove
        yielded: set[str] = set()  # an id accessed meanwhile moves from T1 to T2
        while True:
            from_t1 = len(self._t1) - num_t1_kept > self._p
            first, second = (t1_stream, t2_stream) if from_t1 else (t2_stream, t1_stream)
            cache_id = next(first, None)
            if cache_id is None:
                cache_id = next(second, None)
                if cache_id is None:
                    return
            if cache_id in yielded:
                continue
            yielded.add(cache_id)
            yield cache_id
            if cache_id in self._t1:
                num_t1_kept += 1

    def _trim_ghosts(self, resident: int) -> None:
        c = self._c
        while self._b1 and len(self._t1) + len(self._b1) > c:
            self._b1.popitem(last=False)
        while self._b2 and resident + len(self._b1) + len(self._b2) > 2 * c:
            self._b2.popitem(last=False)


POLICIES: Mapping[str, Callable[[], EvictionPolicy]] = MappingProxyType(
    {policy.name: policy for policy in (LRUPolicy, LFUPolicy, SizeAwareLRUPolicy, AdaptivePolicy)}
)


def make_policy(name: str) -> EvictionPolicy:
    """Return a new, empty policy registered under ``name``.

    Raises:
        InvalidArgument: ``name`` is not a key of ``POLICIES`` (field
            ``eviction_policy``; the message lists the valid names).
    """
    factory = POLICIES.get(name)
    if factory is None:
        names = ", ".join(sorted(POLICIES))
        raise InvalidArgument("eviction_policy", f"unknown policy {name!r}; choose one of: {names}")
    return factory()
