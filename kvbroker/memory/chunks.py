"""How a backend runs a copy plan so that a failure leaves a committable prefix.

Both backends run their ``copy`` through ``run_moves`` with their own primitive byte copy,
so the host backend's fault-injection tests prove the CUDA backend's recovery logic too.

A plan is a list of moves, each with memmove semantics. A move whose source and destination
overlap inside one segment cannot be one device copy (the copy would read bytes it already
overwrote), so ``plan_chunks`` splits it into copies that never overlap:

* when the ends are at least ``direct_min`` bytes apart, chunks of that distance copy
  directly, in the order that never overwrites bytes a later chunk reads;
* when they are closer, each chunk goes source -> staging buffer -> destination.

If a copy fails part-way through an overlapping move, the bytes the move already
overwrote are put back: the failing chunk's own source from the staging buffer (a staged
chunk may overlap itself), then the completed chunks by the reverse memmove (their bytes
now sit, unchanged, at the destination). So ``CopyError`` can promise that the failed
move's source is intact. The staging buffer is allocated by the backend before the first
byte moves (``staging_needed`` says how large), because allocating device memory in the
middle of a plan could fail with half a move done.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import NamedTuple

from kvbroker.core.types import Extent
from kvbroker.memory.backend import CopyError

logger = logging.getLogger(__name__)

#: The ``segment_id`` of a ``Place`` in the staging buffer.
STAGING = -1


class Place(NamedTuple):
    """A byte position: a segment (or ``STAGING``) and an offset in it."""

    segment_id: int
    offset: int


class Chunk(NamedTuple):
    """One copy of a split move; ``staged`` copies go through the staging buffer."""

    src_offset: int
    dst_offset: int
    nbytes: int
    staged: bool


#: ``copy_range(source, destination, nbytes)``: the backend's primitive copy of ``nbytes``
#: bytes that do not overlap. It may fail having written any part of its destination.
CopyRange = Callable[[Place, Place, int], None]


def plan_chunks(
    src_offset: int,
    dst_offset: int,
    nbytes: int,
    *,
    same_segment: bool,
    direct_min: int,
    staging: int,
) -> list[Chunk]:
    """Split one memmove into copies that never overlap, in a safe order.

    Overlapping moves whose ends are at least ``direct_min`` apart copy directly in
    chunks of that distance; closer ones go through a staging buffer of ``staging`` bytes.

    Invariant: each direct chunk's source and destination are disjoint, and no chunk
    overwrites bytes a later chunk reads (forward order when sliding down, backward when
    sliding up), so the result equals ``memmove``; the chunks run from one end of the move,
    so the completed ones always form one interval. Cost: O(nbytes / chunk) tuples.
    """
    if nbytes == 0 or (same_segment and src_offset == dst_offset):
        return []
    if not (same_segment and _overlap(src_offset, dst_offset, nbytes)):
        return [Chunk(src_offset, dst_offset, nbytes, False)]
    gap = abs(dst_offset - src_offset)
    staged = gap < direct_min
    chunk = staging if staged else gap
    starts = range(0, nbytes, chunk)
    if dst_offset > src_offset:
        starts = reversed(starts)
    return [Chunk(src_offset + s, dst_offset + s, min(chunk, nbytes - s), staged) for s in starts]


def _overlap(src_offset: int, dst_offset: int, nbytes: int) -> bool:
    return src_offset < dst_offset + nbytes and dst_offset < src_offset + nbytes


def staging_needed(moves: Sequence[tuple[Extent, Extent]], *, direct_min: int, staging: int) -> int:
    """Bytes of staging buffer the moves need: the largest staged chunk, 0 if none.

    That is the largest overlapping move closer than ``direct_min``, capped at
    ``staging`` (longer ones are chunked). Restoring a failed move needs no more. Cost:
    O(number of moves).
    """
    need = 0
    for src, dst in moves:
        if src.segment_id != dst.segment_id or src.offset == dst.offset:
            continue
        if _overlap(src.offset, dst.offset, src.nbytes) and abs(dst.offset - src.offset) < direct_min:
            need = max(need, min(src.nbytes, staging))
    return need


class _MoveFailed(Exception):
    def __init__(self, cause: BaseException, source_intact: bool) -> None:
        super().__init__(cause)
        self.cause = cause
        self.source_intact = source_intact


def run_moves(
    moves: Sequence[tuple[Extent, Extent]],
    copy_range: CopyRange,
    *,
    direct_min: int,
    staging: int,
    fence: Callable[[], None] | None = None,
) -> None:
    """Apply validated ``(source, destination)`` moves in order with memmove semantics.

    ``fence`` runs after each move and must return only once the move's bytes are in
    place (the CUDA backend synchronizes its stream there, so an asynchronous device error
    is charged to the move that caused it). The staging buffer, when ``staging_needed`` is
    not 0, must already exist at ``Place(STAGING, 0)``.

    Raises:
        CopyError: move ``k`` failed; moves before it are done, its source is intact
            unless ``source_intact`` says otherwise. Cost: the copies, plus, on failure, at
            most the failed move's size again to restore it.
    """
    for k, (src, dst) in enumerate(moves):
        try:
            _run_move(src, dst, copy_range, direct_min, staging)
        except _MoveFailed as failed:
            raise CopyError(k, failed.cause, source_intact=failed.source_intact) from failed.cause
        if fence is None:
            continue
        try:
            fence()
        except Exception as err:
            # The device failed the move asynchronously, at an unknown chunk: the source is
            # intact only if the move never wrote over it.
            overlapping = src.segment_id == dst.segment_id and _overlap(src.offset, dst.offset, src.nbytes)
            raise CopyError(k, err, source_intact=not overlapping) from err


def _run_move(src: Extent, dst: Extent, copy_range: CopyRange, direct_min: int, staging: int) -> None:
    same = src.segment_id == dst.segment_id
    chunks = plan_chunks(src.offset, dst.offset, src.nbytes, same_segment=same, direct_min=direct_min, staging=staging)
    overlapping = same and _overlap(src.offset, dst.offset, src.nbytes)
    done_lo = done_hi = None  # the move-relative interval the completed chunks cover
    for chunk in chunks:
        source, target = Place(src.segment_id, chunk.src_offset), Place(dst.segment_id, chunk.dst_offset)
        staged_in = False
        try:
            if chunk.staged:
                copy_range(source, Place(STAGING, 0), chunk.nbytes)
                staged_in = True
                copy_range(Place(STAGING, 0), target, chunk.nbytes)
            else:
                copy_range(source, target, chunk.nbytes)
        except Exception as err:
            intact = True
            if overlapping:
                done = None if done_lo is None else (done_lo, done_hi)
                intact = _restore(src, dst, chunk, staged_in, done, copy_range, direct_min, staging)
            raise _MoveFailed(err, intact) from err
        lo = chunk.src_offset - src.offset
        done_lo = lo if done_lo is None else min(done_lo, lo)
        done_hi = lo + chunk.nbytes if done_hi is None else max(done_hi, lo + chunk.nbytes)


def _restore(
    src: Extent,
    dst: Extent,
    failed: Chunk,
    staged_in: bool,
    done: tuple[int, int] | None,
    copy_range: CopyRange,
    direct_min: int,
    staging: int,
) -> bool:
    """Put back the source bytes an overlapping move overwrote before chunk ``failed`` failed.

    What the failed copy may have damaged: its destination range. That range lies inside
    the failed chunk's own source (a staged chunk that overlaps itself: the staging buffer
    holds those bytes) or inside the source of completed chunks (whose bytes sit intact at
    their destinations, never written since), or outside the source. So: first staging ->
    the failed chunk's source, then the completed interval back from destination to
    source, by ``plan_chunks`` in the reverse direction. The two steps touch disjoint
    bytes: the completed interval's destination lies on the side of the failed chunk away
    from its source. Returns False if a restoring copy failed too.
    """
    try:
        if failed.staged and staged_in:
            copy_range(Place(STAGING, 0), Place(src.segment_id, failed.src_offset), failed.nbytes)
        if done is not None:
            lo, hi = done
            back = plan_chunks(
                dst.offset + lo, src.offset + lo, hi - lo, same_segment=True, direct_min=direct_min, staging=staging
            )
            for chunk in back:
                source, target = Place(src.segment_id, chunk.src_offset), Place(src.segment_id, chunk.dst_offset)
                if chunk.staged:
                    copy_range(source, Place(STAGING, 0), chunk.nbytes)
                    copy_range(Place(STAGING, 0), target, chunk.nbytes)
                else:
                    copy_range(source, target, chunk.nbytes)
    except Exception:
        logger.exception(
            "could not restore the source of a failed overlapping move (segment %d, %d bytes at "
            "offset %d): its bytes are lost",
            src.segment_id,
            src.nbytes,
            src.offset,
        )
        return False
    return True
