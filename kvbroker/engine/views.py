"""What the engine answers with: plain, immutable views of its state for the server and
the CLI (a compaction's result and moves, a session, the daemon's status, a page of
caches). Kept apart from ``engine.py`` so the facade holds behaviour only; nothing here
does work or holds a reference into the core's mutable state.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from kvbroker.core import CacheInfo, Extent, Fragmentation
from kvbroker.engine.ports import LiveFigures, RpcStats
from kvbroker.security import PeerIdentity


#: Moves a defragment lists one by one (the count covers them all): enough to see which
#: caches a compaction would touch, bounded so a node of 100k caches answers in one page.
MAX_LISTED_MOVES = 1000


class MoveView(NamedTuple):
    """One move of a compaction as operators see it (``DefragmentResult.moves``)."""

    cache_id: str
    pool: str
    device_id: str
    source: Extent
    destination: Extent


@dataclass(frozen=True, slots=True)
class DefragmentResult:
    """What a defragment did (or, ``dry_run``, would do). ``before``/``after``: the free
    space of the compacted segments (``Fragmentation``: within segments, what the moves
    merge, apart from across segments, what only segments going back fix).
    ``segments_freed``: segments the moves empty (back to the device now, or once their
    mappers unmapped them), of ``segments_freed_bytes``. ``moves``: the first
    ``MAX_LISTED_MOVES`` of ``moves_total``, in plan order."""

    caches_moved: int
    bytes_moved: int
    fragmentation_before: float
    fragmentation_after: float
    segments_freed: int
    duration_seconds: float
    dry_run: bool
    before: Fragmentation = Fragmentation()
    after: Fragmentation = Fragmentation()
    segments_freed_bytes: int = 0
    moves: tuple[MoveView, ...] = ()
    moves_total: int = 0
    paged: bool = False  # a paged pool's blocks: caches are sequences, block_moves the copies
    block_moves: tuple[tuple[str, int, int], ...] = ()  # (sequence, from block, to block)


class SessionView(NamedTuple):
    """One live session as operators see it (``Engine.sessions``)."""

    session_id: str
    principal: str
    client_name: str
    pid: int
    host: str
    peer: PeerIdentity | None
    age_seconds: float
    lease_remaining_seconds: float
    watching: bool
    holds: int
    pins: int
    mapped_segments: int


class EngineStatus(NamedTuple):
    """This daemon run, for the Stats RPC. ``rpc`` is None when telemetry is off."""

    version: str
    instance_id: str
    uptime_seconds: float
    lease_seconds: float
    rpc: RpcStats | None
    live: LiveFigures


class CachePage(NamedTuple):
    """One page of ``list_caches``; ``next_page_token`` is "" on the last page."""

    caches: list[CacheInfo]
    next_page_token: str
