"""Eviction policies: which unpinned caches to give up first when a pool needs room.

A policy only orders candidates; it never frees anything (Plasma's ``IEvictionPolicy``).
The broker keeps it informed through hooks and, under pressure, walks
``victims(nbytes_needed)`` and evicts until enough bytes are free. Policies are picked by
name from ``POLICIES`` (SGLang's strategy registry).

Hooks run on every allocate, attach, pin and release, so each is O(1) amortized: a few
dict operations, about 1 us in CPython at 100k live caches. A pinned cache stays known
to its policy, so that its accesses still count, but is never offered as a victim.

Misuse by the caller is a bug, not a client error: inserting a known id raises
``RuntimeError``, touching an unknown id ``KeyError``. Not thread-safe (one owner).
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from itertools import count, islice
from types import MappingProxyType
from typing import Protocol

from kvbroker.core.errors import InvalidArgument


class EvictionPolicy(Protocol):
    """Orders unpinned caches for eviction. Chooses; never frees.

    ``victims(nbytes_needed)`` yields every unpinned cache once, best victim first. The
    caller may ``on_remove`` the id just yielded before asking for the next one; other
    mutations during the iteration are not reflected. Pin hooks fire on 0 -> 1 and
    1 -> 0 only (the caller counts pins); ``on_access`` is any use (attach, pin, tensor
    lookup); ``on_remove`` is a release or an eviction, pinned or not.

    Attributes:
        name: the policy's key in ``POLICIES``.
    """

    name: str

    def on_insert(self, cache_id: str, nbytes: int) -> None: ...
    def on_access(self, cache_id: str) -> None: ...
    def on_pin(self, cache_id: str) -> None: ...  # leaves the candidate set
    def on_unpin(self, cache_id: str) -> None: ...  # rejoins it
    def on_remove(self, cache_id: str) -> None: ...  # gone for good
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

    def on_remove(self, cache_id: str) -> None:
        try:
            del self._candidates[cache_id]
        except KeyError:
            self._pinned.remove(cache_id)

    def victims(self, nbytes_needed: int) -> Iterator[str]:
        return _lazy_keys(self._candidates)


@dataclass(slots=True, eq=False)
class _FreqBucket:
    """The caches accessed exactly ``freq`` times; a node of LFU's sorted bucket list."""

    freq: int
    prev: _FreqBucket | None = None
    next: _FreqBucket | None = None
    candidates: OrderedDict[str, None] = field(default_factory=OrderedDict)
    num_pinned: int = 0


class LFUPolicy:
    """Least frequently accessed first; ties go to the least recent.

    Why: a pool of shared prefixes (system prompts, few-shot examples) wants to keep
    those that many requests reuse, however old. Its weakness is a shifted working set:
    old favourites keep their counts (``adaptive`` fixes that).

    Invariant: buckets form a list of strictly increasing ``freq`` after a freq-0
    sentinel; a bucket lives while it holds a candidate or a pinned id; a bucket's
    candidates are ordered by when they reached its count. A pinned id is counted in its
    bucket's ``num_pinned``, so its accesses still count and unpin finds it in O(1).

    Cost: hooks O(1) (the LFU of Shah, Mitra and Matani: an access moves an id to the
    next bucket, created beside it if missing). ``victims`` O(k) for k taken, plus one
    step per bucket that holds only pinned ids.
    """

    name = "lfu"
    __slots__ = ("_head", "_id_to_bucket")

    def __init__(self) -> None:
        self._head = _FreqBucket(0)
        self._id_to_bucket: dict[str, _FreqBucket] = {}

    def on_insert(self, cache_id: str, nbytes: int) -> None:
        if cache_id in self._id_to_bucket:
            raise _already_inserted(cache_id)
        first = self._head.next
        if first is None or first.freq != 1:
            first = self._link_after(self._head, 1)
        first.candidates[cache_id] = None
        self._id_to_bucket[cache_id] = first

    def on_access(self, cache_id: str) -> None:
        bucket = self._id_to_bucket[cache_id]
        target = bucket.next
        if target is None or target.freq != bucket.freq + 1:
            target = self._link_after(bucket, bucket.freq + 1)
        try:
            del bucket.candidates[cache_id]
        except KeyError:  # pinned
            bucket.num_pinned -= 1
            target.num_pinned += 1
        else:
            target.candidates[cache_id] = None
        self._id_to_bucket[cache_id] = target
        if not bucket.candidates and not bucket.num_pinned:
            self._unlink(bucket)

    def on_pin(self, cache_id: str) -> None:
        bucket = self._id_to_bucket[cache_id]
        del bucket.candidates[cache_id]
        bucket.num_pinned += 1

    def on_unpin(self, cache_id: str) -> None:
        bucket = self._id_to_bucket[cache_id]
        if cache_id in bucket.candidates:
            raise KeyError(cache_id)  # not pinned
        bucket.num_pinned -= 1
        bucket.candidates[cache_id] = None

    def on_remove(self, cache_id: str) -> None:
        bucket = self._id_to_bucket.pop(cache_id)
        try:
            del bucket.candidates[cache_id]
        except KeyError:  # pinned
            bucket.num_pinned -= 1
        if not bucket.candidates and not bucket.num_pinned:
            self._unlink(bucket)

    def victims(self, nbytes_needed: int) -> Iterator[str]:
        # An unlinked bucket keeps its ``next``, and ``next`` only ever points to a
        # higher freq, so the walk survives removals and always ends.
        yielded: set[str] = set()  # an id accessed meanwhile moves to a later bucket
        bucket = self._head.next
        while bucket is not None:
            for cache_id in _lazy_keys(bucket.candidates):
                if cache_id not in yielded:
                    yielded.add(cache_id)
                    yield cache_id
            bucket = bucket.next

    @staticmethod
    def _link_after(bucket: _FreqBucket, freq: int) -> _FreqBucket:
        new = _FreqBucket(freq, prev=bucket, next=bucket.next)
        if bucket.next is not None:
            bucket.next.prev = new
        bucket.next = new
        return new

    @staticmethod
    def _unlink(bucket: _FreqBucket) -> None:
        assert bucket.prev is not None, "the sentinel bucket is never unlinked"
        bucket.prev.next = bucket.next
        if bucket.next is not None:
            bucket.next.prev = bucket.prev


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

    def on_remove(self, cache_id: str) -> None:
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
    prompts); LFU keeps a stale working set forever once the workload shifts. ARC
    learns from its mistakes which of the two a pool currently needs.

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

    def on_remove(self, cache_id: str) -> None:
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
