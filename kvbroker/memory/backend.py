"""The seam between the broker and device memory: the ``SegmentMemory`` protocol.

The core decides *where* (segment id, offset, nbytes); a backend owns *the bytes*. The
daemon holds one backend per device and calls it with segments and moves the core has
already validated, so a bad argument here is a bug in the caller and raises
``KeyError``/``ValueError``, never a ``BrokerError``. The only client-visible failure is
running out of device memory, which raises ``ResourceExhausted``.

Handles are plain frozen dataclasses with the fields of the proto messages
``HostSegmentHandle`` and ``CudaSegmentHandle``: the server layer converts them to
protobuf, so this layer never imports grpc or protobuf.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, TypeAlias, runtime_checkable

from kvbroker.core.types import Extent, Move, SegmentInfo


@dataclass(frozen=True, slots=True)
class HostHandle:
    """How a client maps a host segment: a named POSIX shm object and its identity.

    The client opens ``/dev/shm/<shm_name>`` without ``O_CREAT`` and refuses it unless
    ``fstat`` reports the same ``(st_dev, st_ino)`` and at least ``size_bytes``, so a stale
    name (a restarted broker, a look-alike) never maps.
    """

    shm_name: str
    size_bytes: int
    st_dev: int
    st_ino: int


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


@runtime_checkable
class SegmentMemory(Protocol):
    """The memory of one device, as whole segments the daemon creates and frees.

    Invariants every implementation keeps:

    * a new segment is zero-filled, so no tenant ever sees another tenant's bytes;
    * a segment's memory is reserved up front (``create`` fails, rather than a later
      access faulting, when the device has no room);
    * the bytes of a segment change only through ``copy`` and ``write``.

    Methods may be called from worker threads (the daemon runs device work off its event
    loop); implementations serialize them internally, so a ``free`` never unmaps memory
    that a running ``copy`` reads.
    """

    def create(self, segment: SegmentInfo) -> None:
        """Reserve ``segment.nbytes``, zero-fill and prefault them.

        Cost: proportional to the size (every page is touched once), so the zero-fill
        never lands on a client's first access.

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
        segments of this device. Blocking: the daemon calls it off the event loop.

        Raises:
            KeyError: a move names an unknown segment.
            ValueError: a move's extents differ in size or fall outside their segment.
        """
        ...

    def read(self, segment_id: int, offset: int, nbytes: int) -> bytes:
        """Copy ``nbytes`` out of a segment (tests and diagnostics)."""
        ...

    def write(self, segment_id: int, offset: int, data: bytes) -> None:
        """Copy ``data`` into a segment (tests and diagnostics)."""
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
