"""Value objects of the broker core: specs that come in, immutable views that go out.

The core speaks integers (segment ids, byte offsets, byte counts) and strings (ids). It
never sees a pointer, a tensor or a file. Records that the core mutates are private to
the modules that own them; what leaves the core is one of the frozen classes below, so a
caller can never change broker state behind its back (vLLM's ``KVCacheBlocks``).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, fields
from typing import Any, NamedTuple

from kvbroker.core.errors import InvalidArgument, echo
from kvbroker.core.figures import (  # noqa: F401  (re-exported: the core's value objects live here)
    EVICTION_CAUSES,
    ArenaCounters,
    BrokerStats,
    DeviceStats,
    Eviction,
    PoolStats,
    Usage,
)
from kvbroker.wire import ID_MAX_CHARS, ID_PATTERN

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

#: Priorities travel as the wire's int32 (``AllocateRequest.priority``).
PRIORITY_RANGE = (-(2**31), 2**31 - 1)

#: The holder that stands for calls made without a session (an operator's grpcurl).
ANONYMOUS_HOLDER = ""
#: With authorization on, calls without a session act as their principal's own
#: sessionless holder, ``"~" + principal name``, so that two principals never share one.
#: Like ``ANONYMOUS_HOLDER`` it never expires and maps nothing the broker tracks. Session
#: ids start with a letter or digit (``validate_id``), so they never take this form.
SESSIONLESS_PREFIX = "~"


def is_sessionless(holder: str) -> bool:
    """Whether ``holder`` stands for calls without a session (no lease, no mappings)."""
    return not holder or holder[0] == SESSIONLESS_PREFIX


def validate_id(field_name: str, value: str) -> str:
    """Return ``value`` if it is a well-formed id (``kvbroker.wire.ID_PATTERN``: 1 to 128
    printable ASCII characters from ``[A-Za-z0-9._:/@+=-]`` starting with a letter or
    digit), else raise ``InvalidArgument`` quoting at most ``ECHO_MAX_CHARS`` of it.
    Cost: one regex match.
    """
    if not isinstance(value, str) or not ID_PATTERN.fullmatch(value):
        raise InvalidArgument(
            field_name,
            f"{echo(value)} is not a valid id (1 to {ID_MAX_CHARS} characters of "
            "A-Z a-z 0-9 . _ : / @ + = -, starting with a letter or digit)",
        )
    return value


class CacheState(enum.Enum):
    """Where a cache's bytes are.

    ``PENDING``: placed, but the daemon has not yet created its segment or zeroed its
    bytes (``Broker.cache_ready`` ends it); never handed out, evicted or moved.
    ``RESIDENT``: its bytes are in its extent. ``EVICTED``: its bytes are gone; the record
    stays until its holders release it, so a holder learns what happened instead of
    getting NOT_FOUND. ``OFFLOADED``: its bytes are in an offload tier (``offload``),
    not on the device; the record stays, and an attach or pin restores it.
    """

    PENDING = "pending"
    RESIDENT = "resident"
    EVICTED = "evicted"
    OFFLOADED = "offloaded"


#: Offload tiers, in the order a pool that names both fills them (host overflows to disk).
OFFLOAD_TIERS = ("host", "disk")


class Placement(enum.Enum):
    """How a pool spreads new caches over its devices."""

    LEAST_LOADED = "least_loaded"
    ROUND_ROBIN = "round_robin"


class EventKind(enum.Enum):
    EVICTED = "evicted"
    MOVED = "moved"
    SEGMENT_RETIRED = "segment_retired"
    SHUTTING_DOWN = "shutting_down"


@dataclass(frozen=True, slots=True)
class DeviceSpec:
    """One device the broker owns.

    Attributes:
        device_id: ``"host"`` or a GPU UUID such as ``"GPU-8d1c..."`` (never an index).
        capacity_bytes: the budget the broker may reserve as segments on this device.
        segment_alignment_bytes: every segment size is a multiple of this (2 MiB for
            CUDA so that each segment owns its own ``cudaMalloc`` block; the page size for
            host shared memory).
        min_segment_bytes: no segment is smaller (10 MiB for CUDA: below that, torch's
            caching allocator carves blocks out of a shared 20 MiB segment, and an IPC
            handle would expose the neighbours).
    """

    device_id: str
    capacity_bytes: int
    segment_alignment_bytes: int = 4 * KiB
    min_segment_bytes: int = 0

    def __post_init__(self) -> None:
        validate_id("device", self.device_id)
        if self.capacity_bytes <= 0:
            raise InvalidArgument("capacity_bytes", f"must be positive, got {self.capacity_bytes}")
        if self.segment_alignment_bytes <= 0:
            raise InvalidArgument(
                "segment_alignment_bytes", f"must be positive, got {self.segment_alignment_bytes}"
            )
        if not 0 <= self.min_segment_bytes <= self.capacity_bytes:
            raise InvalidArgument(
                "min_segment_bytes", f"must be in [0, capacity], got {self.min_segment_bytes}"
            )


@dataclass(frozen=True, slots=True)
class PoolSpec:
    """A tenant's space: which devices it may use, how much, and how it evicts.

    Attributes:
        name: the pool's id.
        devices: device ids the pool may place caches on, in preference order.
        min_bytes: guaranteed bytes: other pools may not take the pool below this.
        max_bytes: quota on the bytes of the pool's segments; ``None`` means the
            devices' capacity.
        priority: default priority of the pool's caches; eviction takes only caches of
            equal or lower priority than the request.
        eviction_policy: a name from ``kvbroker.core.eviction.POLICIES``.
        gc_threshold: utilization ratio above which background reclamation takes the
            pool's idle retained caches (never held ones: ``kvbroker/core/reclaim.py``).
        block_bytes: allocation granule: cache sizes and offsets are multiples of it.
        segment_bytes: preferred size of a new segment (a larger cache gets a segment
            of its own size).
        default_cache_bytes: size used when a request gives neither a size nor a shape
            (0: such a request is invalid).
        placement: how new caches are spread over ``devices``.
        scrub: zero reused bytes before a new cache exposes them (``needs_zeroing``).
            ``False`` skips that and LETS ONE TENANT READ WHAT ANOTHER LEFT BEHIND: only
            for a single-tenant deployment that wants the allocation latency back.
        offload: tiers (of ``OFFLOAD_TIERS``, in order) where the pressure ladder and
            background reclamation put an unpinned cache instead of evicting it
            (``kvbroker.core.offload``); empty: they evict.
    """

    name: str
    devices: tuple[str, ...]
    min_bytes: int = 0
    max_bytes: int | None = None
    priority: int = 0
    eviction_policy: str = "lru"
    gc_threshold: float = 0.9
    block_bytes: int = 64 * KiB
    segment_bytes: int = 256 * MiB
    default_cache_bytes: int = 0
    placement: Placement = Placement.LEAST_LOADED
    scrub: bool = True
    offload: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        problems = pool_problems({f.name: getattr(self, f.name) for f in fields(self)})
        if problems:
            name, why = problems[0]
            raise InvalidArgument("pool" if name == "name" else f"pools.{self.name}.{name}", why)


def pool_problems(values: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Every problem of a pool's values, as ``(field, why)`` pairs, in field order;
    fields absent from ``values`` take ``PoolSpec``'s defaults.

    The one statement of what a pool may be: ``PoolSpec`` raises the first problem, and
    the daemon's configuration reports them all at once, each under its own key."""
    v = {f.name: f.default for f in fields(PoolSpec) if f.default is not MISSING} | dict(values)
    problems: list[tuple[str, str]] = []

    def check(name: str, ok: bool, why: str) -> None:
        if not ok:
            problems.append((name, f"{why}, got {echo(v[name])}"))

    try:
        validate_id("pool", v.get("name"))
    except InvalidArgument as err:
        problems.append(("name", str(err).partition(": ")[2]))
    devices = v.get("devices", ())
    if not devices:
        problems.append(("devices", "a pool needs at least one device"))
    elif len(set(devices)) != len(devices):
        problems.append(("devices", "lists a device twice"))
    sizes = ("min_bytes", "max_bytes", "block_bytes", "segment_bytes", "default_cache_bytes")
    bad = {n for n in sizes if v[n] is not None and (type(v[n]) is not int or v[n] < 0)}
    for name in sorted(bad, key=sizes.index):
        problems.append((name, f"must be a whole number of bytes >= 0, got {echo(v[name])}"))
    if "max_bytes" not in bad and v["max_bytes"] is not None:
        check("max_bytes", v["max_bytes"] > 0, "must be > 0")
        if "min_bytes" not in bad:
            check("max_bytes", v["max_bytes"] >= v["min_bytes"], f"must be >= min_bytes ({v['min_bytes']})")
    priority = v["priority"]
    check("priority", type(priority) is int and PRIORITY_RANGE[0] <= priority <= PRIORITY_RANGE[1],
          f"must be a 32-bit integer ({PRIORITY_RANGE[0]} to {PRIORITY_RANGE[1]})")  # fmt: skip
    threshold = v["gc_threshold"]
    check("gc_threshold", isinstance(threshold, int | float) and not isinstance(threshold, bool)
          and math.isfinite(threshold) and 0.0 < threshold <= 1.0, "must be in (0, 1]")  # fmt: skip
    block = v["block_bytes"]
    if "block_bytes" not in bad:
        check("block_bytes", block > 0 and block & (block - 1) == 0, "must be a positive power of two")
        if "segment_bytes" not in bad:
            check("segment_bytes", v["segment_bytes"] >= block, f"must be >= block_bytes ({block})")
    if not bad & {"default_cache_bytes", "max_bytes"} and v["max_bytes"] is not None:
        check("default_cache_bytes", v["default_cache_bytes"] <= v["max_bytes"],
              f"must be <= max_bytes ({v['max_bytes']}), or a cache of that size could never fit")  # fmt: skip
    tiers = v.get("offload", ())
    check("offload", isinstance(tiers, tuple) and all(t in OFFLOAD_TIERS for t in tiers)
          and len(set(tiers)) == len(tiers), 'must be "host", "disk" or ["host", "disk"]')  # fmt: skip
    return problems


class AllocationRequest(NamedTuple):
    """What a client asks for. Validated by the broker, not here, so that every error
    names the wire field. A NamedTuple: one is built per Allocate RPC (see ``Extent``).

    Attributes:
        nbytes: requested size (rounded up to the pool's block size when placed).
        cache_id: the id to give the cache; ``None`` lets the broker generate one.
        priority: ``None`` takes the pool's priority.
        pinned: pin the cache for ``holder`` at once.
        retain: keep the cache after its last holder releases it.
        device_hint: place on this device if the pool may use it and it fits there.
        dtype, shape: metadata that the client stub uses to build its tensor view.
    """

    pool: str
    nbytes: int
    holder: str = ANONYMOUS_HOLDER
    cache_id: str | None = None
    model_name: str = ""
    priority: int | None = None
    pinned: bool = False
    retain: bool = False
    device_hint: str | None = None
    dtype: str = ""
    shape: tuple[int, ...] = ()


class Extent(NamedTuple):
    """A contiguous byte range of one segment.

    A NamedTuple rather than a frozen dataclass: it is built on every allocation and a
    frozen dataclass's ``__init__`` costs several times more (measured in
    ``benchmarks/fragmentation.py``'s per-op loop).
    """

    segment_id: int
    offset: int
    nbytes: int

    @property
    def end(self) -> int:
        return self.offset + self.nbytes


@dataclass(frozen=True, slots=True)
class SegmentInfo:
    """A segment as the backends see it: create it, map it, free it.

    ``generation`` is unique per segment over the broker's life; a handle carries it so a
    client can tell a reused segment id from the one it mapped. This broker never reuses
    a segment id, so today it equals ``segment_id``; it stays a field of its own because
    the wire, the backends' object names and the client compare generations, and a
    broker that reuses ids (or restores them after a restart) must keep the two apart.
    """

    segment_id: int
    generation: int
    pool: str
    device_id: str
    nbytes: int


class HolderSummary(NamedTuple):
    """What one holder (a session) has: caches held, pins counted, segments mapped."""

    holds: int
    pins: int
    mapped_segments: int


class CacheInfo(NamedTuple):
    """An immutable view of one cache.

    ``nbytes`` is what was asked for; ``reserved_bytes`` is the block-rounded size it
    occupies. ``extents`` is a tuple so that a future paged mode needs no new type; in
    contiguous mode it holds exactly one extent (none once evicted). ``moving``: a
    compaction is copying it (attach and pin wait until it ends). A NamedTuple because
    every allocate, attach and pin returns one (see ``Extent``).
    """

    cache_id: str
    pool: str
    model_name: str
    nbytes: int
    reserved_bytes: int
    device_id: str
    extents: tuple[Extent, ...]
    state: CacheState
    epoch: int
    pin_count: int
    holders: frozenset[str]
    retain: bool
    priority: int
    created_at: float
    last_access_at: float
    access_count: int
    dtype: str = ""
    shape: tuple[int, ...] = ()
    moving: bool = False

    @property
    def pinned(self) -> bool:
        return self.pin_count > 0


@dataclass(frozen=True, slots=True)
class Event:
    """Something the broker did to a cache or segment that its holders must learn.

    For ``EVICTED`` and ``MOVED``, ``recipients`` are the cache's holders and ``epoch`` its
    new epoch; for ``SEGMENT_RETIRED``, the segment's mappers.
    """

    kind: EventKind
    recipients: frozenset[str]
    cache_id: str = ""
    segment_id: int = -1
    epoch: int = 0
    reason: str = ""
    segment_generation: int = 0
    #: Set for a paged pool's sequence (``kvbroker.core.paged``); ``cache_id`` is then the
    #: pool's arena, which itself did not move or go.
    sequence_id: str = ""


@dataclass(frozen=True, slots=True)
class Move:
    """Copy ``nbytes`` of one cache from ``source`` to ``destination``.

    Moves are applied in plan order; a later move may read bytes an earlier one wrote.
    Source and destination may overlap inside one segment (a slide down), so a backend
    must copy with memmove semantics.
    """

    cache_id: str
    source: Extent
    destination: Extent


@dataclass(frozen=True, slots=True)
class Fragmentation:
    """How the free bytes inside a set of segments lie (``compaction.fragmentation_of``).

    ``within_segments``: the share of the free bytes that lie outside their own
    segment's largest free range (holes between caches): what compaction merges, except
    holes in front of pinned caches. ``across_segments``: the share in the other
    segments' largest ranges: free space split across segments (and pools), which no
    move merges; only giving segments back to the device does (idle retirement, a
    segment taken for another pool, one a compaction emptied). Their sum, ``ratio``, is
    ``1 - largest_free_extent / free_bytes``.
    """

    free_bytes: int = 0
    largest_free_extent: int = 0
    within_segments: float = 0.0
    across_segments: float = 0.0

    @property
    def ratio(self) -> float:
        """``within_segments + across_segments``, computed as the classic figure."""
        return 1.0 - self.largest_free_extent / self.free_bytes if self.free_bytes else 0.0


@dataclass(frozen=True, slots=True)
class CompactionPlan:
    """Moves that pack a set of arenas; computed by ``Broker.plan_compaction``, frozen by
    ``begin_compaction``, applied (wholly or a prefix) by ``commit``.

    Moves are ordered so that every prefix is a consistent layout: each move's
    destination is free once the moves before it ran. ``token`` names the layout the plan
    was computed from: ``begin_compaction`` refuses a plan that a later change of any
    layout made stale, and identifies the compaction in flight until it ends.
    """

    moves: tuple[Move, ...]
    fragmentation_before: float
    fragmentation_after: float
    segments_emptied: tuple[int, ...]
    largest_free_extent_after: int
    token: int
    #: The free space of the plan's segments before and after the moves (emptied
    #: segments count as free until they go back: ``Fragmentation.across_segments``).
    before: Fragmentation = Fragmentation()
    after: Fragmentation = Fragmentation()

    @property
    def bytes_moved(self) -> int:
        return sum(m.destination.nbytes for m in self.moves)

    @property
    def caches_moved(self) -> int:
        return len(self.moves)


class AllocateResult(NamedTuple):
    """The outcome of ``Broker.allocate``.

    Exactly one of ``cache`` and ``compaction`` is set. ``cache`` is ``PENDING``: the
    daemon creates ``new_segment`` if set (then ``Broker.segment_created``), zeroes the
    extent when ``needs_zeroing`` and the pool scrubs, then calls ``Broker.cache_ready``;
    ``Broker.abort_allocation`` undoes it instead. ``compaction`` is a plan to run before
    asking again. ``retired_segments`` were taken to make room: the backend frees them.
    ``needs_zeroing`` is False when every byte of the extent is known to be zero: it lies
    in a new segment, or above its segment's high-water mark of bytes ever handed out.
    """

    cache: CacheInfo | None
    compaction: CompactionPlan | None = None
    new_segment: SegmentInfo | None = None
    retired_segments: tuple[SegmentInfo, ...] = ()
    evicted: tuple[str, ...] = ()
    needs_zeroing: bool = False
