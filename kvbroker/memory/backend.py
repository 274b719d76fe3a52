"""The seam between the broker and device memory: the ``SegmentMemory`` protocol.

The core decides *where* (segment id, offset, nbytes); a backend owns *the bytes*. The
daemon holds one backend per device and calls it with segments and moves the core has
already validated, so a bad argument here is a bug in the caller and raises
``KeyError``/``ValueError``, never a ``BrokerError``. The only client-visible failure is
running out of device memory, which raises ``ResourceExhausted``.

Handles are plain frozen dataclasses with the fields of the proto messages
``HostSegmentHandle`` and ``CudaSegmentHandle``: the server layer converts them to
protobuf, so this layer never imports grpc or protobuf.

A failed ``copy`` raises ``CopyError``, which says how many moves of the plan are done, so
the core commits exactly that prefix (``Broker.commit(plan, completed=k)``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeAlias, runtime_checkable

from kvbroker.core.types import Extent, Move, SegmentInfo


@dataclass(frozen=True, slots=True)
class HostHandle:
    """How a client maps a host segment: a named POSIX shm object and its identity.

    The client opens ``<shm_dir>/<shm_name>`` without ``O_CREAT`` and refuses it unless
    ``fstat`` reports the same ``(st_dev, st_ino)`` and at least ``size_bytes``, so a stale
    name (a restarted broker, a look-alike) never maps. ``shm_dir`` is the absolute
    directory the broker created the object in: the client must not assume ``/dev/shm``,
    because a broker may be configured with another tmpfs.
    """

    shm_name: str
    size_bytes: int
    st_dev: int
    st_ino: int
    shm_dir: str


@dataclass(frozen=True, slots=True)
class CudaHandle:
    """How a client maps a CUDA segment: the fields of ``UntypedStorage._share_cuda_()``.

    The device is named by UUID, never by index, because ``CUDA_VISIBLE_DEVICES``
    renumbers devices per process. ``event_sync_required`` is always False: the backend
    synchronizes before it shares, so clients never open an IPC event.
    """

    device_uuid: str
    torch_version: str
    mem_handle: bytes
    storage_size_bytes: int
    storage_offset_bytes: int
    ref_counter_handle: bytes
    ref_counter_offset: int
    event_handle: bytes
    event_sync_required: bool


SegmentHandle: TypeAlias = HostHandle | CudaHandle


class CopyError(Exception):
    """A move of a ``copy`` plan failed: the first ``completed`` moves are done, no later
    move ran.

    Invariant the backends keep (the core relies on it to commit a prefix of the plan):

    * moves ``0 .. completed-1`` are fully copied;
    * move ``completed`` did not happen: its source bytes are as they were before it
      started. Only its destination range (free space in the core's plan) may hold
      garbage. An overlapping move is staged, and its source restored from the staging
      buffer when it fails part-way;
    * every byte outside that destination range is as the completed prefix left it.

    ``source_intact`` is False only when restoring the failed move's source failed too
    (the device itself is broken, e.g. a sticky CUDA error): the bytes of the cache of move
    ``completed`` are then lost, and the caller must drop that cache rather than keep it
    where it was.

    Attributes:
        completed: how many moves, from the start of the plan, are done.
        cause: the exception that failed move ``completed`` (also ``__cause__``).
        source_intact: see above.
    """

    def __init__(self, completed: int, cause: BaseException, *, source_intact: bool = True) -> None:
        lost = "" if source_intact else "; its source could not be restored (its bytes are lost)"
        super().__init__(f"move {completed} of the copy plan failed: {cause!r}{lost}")
        self.completed = completed
        self.cause = cause
        self.source_intact = source_intact
        self.__cause__ = cause


@runtime_checkable
class SegmentMemory(Protocol):
    """The memory of one device, as whole segments the daemon creates and frees.

    Invariants every implementation keeps:

    * a new segment is zero-filled, so no tenant ever sees another tenant's bytes;
    * a segment's memory is reserved up front (``create`` fails, rather than a later
      access faulting, when the device has no room);
    * the bytes of a segment change only through ``copy`` and ``zero`` (and through the
      clients that map it).

    Methods may be called from worker threads (the daemon runs device work off its event
    loop); implementations serialize them internally, so a ``free`` never unmaps memory
    that a running ``copy`` reads.
    """

    def create(self, segment: SegmentInfo, *, prefault: bool = True) -> None:
        """Reserve ``segment.nbytes``, zero-filled, and (``prefault``) fault them in.

        On failure it leaves nothing behind (what it made is unlinked or freed) and
        raises, so the caller only drops the segment from its own books. Cost:
        proportional to the size (every page is touched once), so the zero-fill never
        lands on a client's first access. ``prefault=False`` is for a segment about to
        be overwritten through ``write_from`` (a restore): a backend whose memory reads
        as zeros untouched (host: tmpfs) then skips the touching, which the write would
        make useless; one that must zero explicitly (CUDA) still does.

        Raises:
            ResourceExhausted: the device has no room (``satisfiable=False``).
            ValueError: the segment id is already in use, or the size is invalid.
        """
        ...

    def free(self, segment_id: int) -> None:
        """Give the segment's memory back. Idempotent: an unknown id is ignored.

        The daemon calls this only once no live session maps the segment.
        """
        ...

    def close(self) -> None:
        """Free every segment. Idempotent."""
        ...

    def handle(self, segment_id: int) -> SegmentHandle:
        """What a client needs to map the segment. Cost: a dictionary lookup.

        Raises:
            KeyError: unknown segment.
        """
        ...

    def copy(self, moves: Sequence[Move]) -> None:
        """Apply ``moves`` in order, each with memmove semantics.

        Source and destination may overlap inside one segment and may lie in different
        segments of this device. Every move is validated, and the staging buffer that
        overlapping moves need is allocated, before the first byte moves. Blocking: the
        daemon calls it off the event loop.

        Raises:
            KeyError: a move names an unknown segment (nothing moved).
            ValueError: a move's extents differ in size or fall outside their segment
                (nothing moved).
            CopyError: a move failed, or the staging buffer could not be allocated
                (``completed=0``); see ``CopyError`` for what is then guaranteed.
        """
        ...

    def zero(self, segment_id: int, offset: int, nbytes: int) -> None:
        """Fill ``[offset, offset + nbytes)`` of a segment with zeros, synchronously.

        The engine zeroes reused bytes before it hands them to another cache, so no tenant
        reads a previous tenant's data. Cost: a memset at memory bandwidth; blocking, so
        the daemon calls it off the event loop.

        Raises:
            KeyError: unknown segment.
            ValueError: the range falls outside the segment.
        """
        ...


class ByteAccess(Protocol):
    """Reading and writing a cache's bytes from the daemon itself: checkpoints copy a
    cache into a host staging buffer (``read_into``) and restores copy a file's bytes
    back (``write_from``). Blocking (memory or PCIe bandwidth): called off the event
    loop, like ``copy``. Both raise ``KeyError`` for an unknown segment and
    ``ValueError`` for a range outside it."""

    def read_into(self, segment_id: int, offset: int, out: Any) -> None:
        """Copy ``len(out)`` bytes at ``offset`` into ``out`` (a writable uint8 numpy array)."""
        ...

    def write_from(self, segment_id: int, offset: int, data: Any) -> None:
        """Copy ``data`` (a uint8 numpy array) to ``offset``."""
        ...


def check_range(segment_id: int, segment_nbytes: int, offset: int, nbytes: int) -> None:
    """Raise ``ValueError`` unless ``[offset, offset + nbytes)`` lies inside the segment.

    Backends call this before touching memory, because an out-of-range address would
    corrupt a neighbour or fault instead of failing cleanly.
    """
    if offset < 0 or nbytes < 0 or offset + nbytes > segment_nbytes:
        raise ValueError(
            f"byte range [{offset}, {offset + nbytes}) is outside segment {segment_id} "
            f"of {segment_nbytes} bytes"
        )


def check_move(move: Move, nbytes_of: dict[int, int]) -> tuple[Extent, Extent]:
    """Validate one move against the segment sizes; return ``(source, destination)``.

    Raises:
        KeyError: a segment of the move is unknown.
        ValueError: the extents differ in size or fall outside their segments.
    """
    src, dst = move.source, move.destination
    if src.nbytes != dst.nbytes:
        raise ValueError(
            f"move of cache {move.cache_id!r}: source has {src.nbytes} bytes but "
            f"destination has {dst.nbytes}"
        )
    for extent in (src, dst):
        if extent.segment_id not in nbytes_of:
            raise KeyError(f"move of cache {move.cache_id!r}: unknown segment {extent.segment_id}")
        check_range(extent.segment_id, nbytes_of[extent.segment_id], extent.offset, extent.nbytes)
    return src, dst
