"""Handles: what a client needs to map one cache, and the per-segment cache of them.

A segment's ``SegmentInfo`` and backend handle are fixed for its life and every
allocate, attach and pin needs them, so they are remembered per segment: the device
thread that creates a segment fetches its handle right after (``DeviceWork.create``),
and building a ``CacheHandle`` on the loop is then two dictionary lookups. Fetching it on
the loop instead could block it: a backend serializes ``handle`` with its copies (see
``kvbroker/memory/host.py``), and a compaction copy runs for as long as its bytes take.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import NamedTuple

from kvbroker.core import Broker, CacheInfo, CacheState, SegmentInfo
from kvbroker.core.errors import FailedPrecondition
from kvbroker.memory.backend import SegmentHandle, SegmentMemory


class CacheHandle(NamedTuple):
    """Everything a client needs to map one cache: the segment and the range in it.
    (A NamedTuple: one is built per allocate, attach and pin.)"""

    instance_id: str
    server_pid: int
    segment: SegmentInfo
    backend: SegmentHandle
    byte_offset: int
    nbytes: int
    epoch: int


class HandleCache:
    """Segment id -> (segment, backend handle), for the segments the engine created."""

    def __init__(self, broker: Broker, memories: Mapping[str, SegmentMemory], instance_id: str) -> None:
        self._broker = broker
        self._memories = memories
        self._instance_id = instance_id
        self._pid = os.getpid()
        self._segments: dict[int, tuple[SegmentInfo, SegmentHandle]] = {}

    def remember(self, segment: SegmentInfo, handle: SegmentHandle) -> None:
        self._segments[segment.segment_id] = (segment, handle)

    def forget(self, segment_id: int) -> None:
        self._segments.pop(segment_id, None)

    def generation(self, segment_id: int) -> int | None:
        """The generation of a live segment (None when unknown)."""
        entry = self._segments.get(segment_id)
        return None if entry is None else entry[0].generation

    def for_cache(self, info: CacheInfo, holder: str) -> CacheHandle:
        """The handle of a resident cache, recording ``holder`` as a mapper of its
        segment (the core then keeps the segment until the holder unmaps it).

        Raises:
            FailedPrecondition: the cache is not resident (evicted meanwhile).
        """
        if info.state is not CacheState.RESIDENT or not info.extents:
            raise FailedPrecondition(f"cache {info.cache_id!r} was evicted")
        extent = info.extents[0]
        entry = self._segments.get(extent.segment_id)
        if entry is None:
            # Every segment is created through DeviceWork.create, which remembers it;
            # this fallback only serves a segment made behind the engine's back.
            segment = self._broker.segment(extent.segment_id)
            entry = (segment, self._memories[segment.device_id].handle(segment.segment_id))
            self._segments[extent.segment_id] = entry
        self._broker.note_mapped(extent.segment_id, holder)
        segment, backend = entry
        return CacheHandle(
            self._instance_id, self._pid, segment, backend, extent.offset, info.nbytes, info.epoch
        )
