"""The chunk planner: how an overlapping CUDA copy is split into copies that never overlap.

A device copy whose source and destination overlap would read bytes it already
overwrote. An overlapping slide by at least ``DIRECT_CHUNK_MIN_BYTES`` copies directly, in
chunks of the slide distance (no extra memory); a closer one goes through a staging buffer
of at most ``STAGING_BYTES`` of device memory.
"""

from __future__ import annotations

from kvbroker.core.types import MiB

#: Overlapping moves whose source and destination are closer than this go through a
#: staging buffer of ``STAGING_BYTES``; farther ones copy directly in chunks of the
#: distance, which never overlap and cost no extra memory.
DIRECT_CHUNK_MIN_BYTES = 2 * MiB
STAGING_BYTES = 64 * MiB


def plan_chunks(
    src_offset: int,
    dst_offset: int,
    nbytes: int,
    *,
    same_segment: bool,
    direct_min: int = DIRECT_CHUNK_MIN_BYTES,
    staging: int = STAGING_BYTES,
) -> list[tuple[int, int, int, bool]]:
    """Split one memmove into copies that never overlap, in a safe order.

    Overlapping moves whose ends are at least ``direct_min`` apart copy directly in
    chunks of that distance; closer ones go through a staging buffer of ``staging`` bytes.

    Returns:
        ``(src_offset, dst_offset, nbytes, staged)`` tuples to run in order; ``staged``
        copies go source -> staging buffer -> destination.

    Invariant: each direct chunk's source and destination are disjoint, and no chunk
    overwrites bytes a later chunk reads (forward order when sliding down, backward when
    sliding up), so the result equals ``memmove``. Cost: O(nbytes / chunk) tuples.
    """
    if nbytes == 0 or (same_segment and src_offset == dst_offset):
        return []
    overlapping = same_segment and src_offset < dst_offset + nbytes and dst_offset < src_offset + nbytes
    if not overlapping:
        return [(src_offset, dst_offset, nbytes, False)]
    gap = abs(dst_offset - src_offset)
    staged = gap < direct_min
    chunk = staging if staged else gap
    starts = range(0, nbytes, chunk)
    if dst_offset > src_offset:
        starts = reversed(starts)
    return [(src_offset + s, dst_offset + s, min(chunk, nbytes - s), staged) for s in starts]
