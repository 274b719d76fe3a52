"""Checking an allocation request, choosing its candidate arenas.

Everything that decides *whether* and *where* a request may go before any byte is
placed. Every error names the wire field at fault and quotes at most ``ECHO_MAX_CHARS``
of what the client sent; a refusal for lack of memory is explained by
``kvbroker.core.refusal``.
"""

from __future__ import annotations

from typing import Protocol

from kvbroker.core.arena import round_up
from kvbroker.core.errors import InvalidArgument, NotFound, echo
from kvbroker.core.pressure import Room, make_room
from kvbroker.core.records import ArenaRecord, DeviceRecord, PoolRecord, SegmentRecord
from kvbroker.core.refusal import exhausted, never_fits
from kvbroker.core.types import PRIORITY_RANGE, AllocationRequest, CompactionPlan, Placement, SegmentInfo

MODEL_NAME_MAX_CHARS = 256
#: The largest size a request can carry (``AllocateRequest.size_bytes`` is a uint64):
#: anything larger is malformed, not merely more than the memory there is.
MAX_SIZE_BYTES = 2**64 - 1


def find_pool(pools: dict[str, PoolRecord], name: str) -> PoolRecord:
    pool = pools.get(name)
    if pool is None:
        if not name:
            raise InvalidArgument("pool", "is required")
        raise NotFound(f"pool {echo(name)} does not exist (pools: {', '.join(sorted(pools))})")
    return pool


def request_size(pool: PoolRecord, nbytes: object) -> tuple[int, int]:
    """The request's size (the pool's default when 0) and its block-rounded size."""
    spec = pool.spec
    if nbytes == 0 and type(nbytes) is int and spec.default_cache_bytes:
        nbytes = spec.default_cache_bytes
    if type(nbytes) is not int or nbytes <= 0:
        raise InvalidArgument(
            "size_bytes",
            f"must be a positive integer, got {echo(nbytes)} (give size_bytes, or dtype and "
            f"shape; pool {spec.name!r} has no default cache size)",
        )
    if nbytes > MAX_SIZE_BYTES:
        raise InvalidArgument("size_bytes", f"must be at most {MAX_SIZE_BYTES} (the wire's uint64), got {echo(nbytes)}")
    return nbytes, round_up(nbytes, spec.block_bytes)


def check_metadata(request: AllocationRequest, priority: object) -> None:
    """Validate the priority, model name and shape (a fast path for the defaults)."""
    if priority == 0 and type(priority) is int and request.model_name == "" and request.shape == ():
        return
    if type(priority) is not int or not PRIORITY_RANGE[0] <= priority <= PRIORITY_RANGE[1]:
        raise InvalidArgument("priority", f"must be a 32-bit integer, got {echo(priority)}")
    name = request.model_name
    if not isinstance(name, str) or len(name) > MODEL_NAME_MAX_CHARS or not name.isprintable():
        raise InvalidArgument("model_name", f"must be at most {MODEL_NAME_MAX_CHARS} printable characters")
    if any(type(n) is not int or n < 0 for n in request.shape):
        raise InvalidArgument("shape", f"dimensions must be non-negative integers, got {echo(request.shape)}")


def candidate_arenas(
    pool: PoolRecord, devices: dict[str, DeviceRecord], hint: str | None, reserved: int
) -> list[ArenaRecord]:
    """The arenas to try, in order: the hinted device's, or the pool's by its placement
    rule. Raises ``InvalidArgument`` (a device the pool does not use), ``NotFound``
    (unknown device) or ``ResourceExhausted`` with ``satisfiable=False`` (above the pool's
    quota or the capacity of every device it may use: it can never fit, so a caller
    that waits for memory must not wait). Cost: O(1) for a one-device pool, else
    O(devices of the pool)."""
    if not hint and pool.single_arena is not None and reserved <= pool.largest_device_bytes:
        if reserved > pool.max_bytes:
            raise never_fits(pool, pool.single_arena, reserved)
        return pool.single_arena
    if hint:
        arena = pool.arenas.get(hint)
        if arena is None:
            if hint not in devices:
                raise NotFound(f"device {echo(hint)} does not exist")
            raise InvalidArgument("device", f"pool {pool.spec.name!r} does not use device {echo(hint)}")
        candidates = [arena]
    elif len(pool.arenas) == 1:
        candidates = list(pool.arenas.values())
    elif pool.spec.placement is Placement.ROUND_ROBIN:
        arenas = list(pool.arenas.values())
        start = pool.next_device % len(arenas)
        pool.next_device += 1
        candidates = arenas[start:] + arenas[:start]
    else:
        candidates = sorted(pool.arenas.values(), key=lambda a: a.allocated_bytes / a.device.spec.capacity_bytes)
    largest = max(a.device.spec.capacity_bytes for a in candidates)
    if reserved > largest or reserved > pool.max_bytes:
        raise never_fits(pool, candidates, reserved)
    return candidates


class Placer(Room, Protocol):
    """What ``find_room`` needs besides the ladder's ``Room``: ``place`` (``Ledger``)."""

    def place(self, arena: ArenaRecord, reserved: int) -> tuple[int, SegmentRecord] | None: ...


def find_room(
    ledger: Placer, pool: PoolRecord, arenas: list[ArenaRecord], reserved: int, priority: int,
    allow_eviction: bool, allow_compaction: bool,
) -> tuple[tuple[int, SegmentRecord] | None, ArenaRecord, CompactionPlan | None, tuple[str, ...], tuple[SegmentInfo, ...]]:
    """Where ``reserved`` bytes go: per candidate arena a free extent (or a new segment);
    when none has room, the pressure ladder per arena not frozen by a compaction.
    Returns ``(spot, arena, plan, evicted, retired)``: ``spot`` (address, segment) in
    ``arena``, or None with the compaction ``plan`` to run first. Raises
    ``ResourceExhausted`` (the evictions made on the way stand)."""
    evicted: tuple[str, ...] = ()
    retired: tuple[SegmentInfo, ...] = ()
    for arena in arenas:
        spot = ledger.place(arena, reserved)
        if spot is not None:
            return spot, arena, None, evicted, retired
    for arena in arenas:
        if arena.compaction is not None:
            continue
        room = make_room(ledger, arena, reserved, priority,
                         allow_eviction=allow_eviction, allow_compaction=allow_compaction)  # fmt: skip
        evicted, retired = evicted + room.evicted, retired + room.retired
        if room.plan is not None:
            return None, arena, room.plan, evicted, retired
        spot = ledger.place(arena, reserved) if room.fits else None
        if spot is not None:
            return spot, arena, None, evicted, retired
    raise exhausted(pool, arenas, reserved)
