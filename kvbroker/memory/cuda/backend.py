"""CUDA segments: one PyTorch allocation per segment, shared with clients by CUDA IPC.

Each step of making a segment has a reason:

* the allocator runs with ``expandable_segments:False`` (``configure_cuda_allocator_env``),
  else handles are of the ``'e'`` kind that needs ``pidfd_getfd`` and fails in containers;
* each segment is one ``torch.empty(nbytes, uint8)`` of a multiple of 2 MiB and at least
  10 MiB, made right after ``empty_cache()``, so the caching allocator gives it a
  ``cudaMalloc`` block of its own: a CUDA IPC handle maps the *whole* block, and a shared
  block would expose other memory to clients. ``memory_snapshot()`` proves it;
* the segment is zeroed and the device synchronized before ``_share_cuda_()``, so the
  handle goes out with ``event_sync_required=False`` and clients never open an IPC event;
* ``_share_cuda_()`` is called once per segment and its tuple cached: each call takes a
  new ref-counter slot and may create an event.

torch is imported lazily, inside functions, so that importing this module costs nothing
on a machine without CUDA and the daemon can configure the allocator before torch loads.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from kvbroker.core.errors import ResourceExhausted, amount
from kvbroker.core.types import MiB, Move, SegmentInfo
from kvbroker.memory.backend import CopyError, CudaHandle, check_move, check_range
from kvbroker.memory.chunks import STAGING, Place, run_moves, staging_needed
from kvbroker.memory.cuda.chunks import DIRECT_CHUNK_MIN_BYTES, STAGING_BYTES
from kvbroker.memory.cuda.discovery import discover_gpus
from kvbroker.memory.cuda.refcounter import reset_ref_counter

#: Every CUDA segment size is a multiple of this: the caching allocator rounds large
#: requests up to 2 MiB, so such a request gets a block of exactly its size.
CUDA_SEGMENT_ALIGNMENT_BYTES = 2 * MiB
#: Requests below 10 MiB are carved out of shared 20 MiB blocks by the caching allocator;
#: a segment must be at least this large to own its block.
CUDA_MIN_SEGMENT_BYTES = 10 * MiB


@dataclass(slots=True)
class _CudaSegment:
    info: SegmentInfo
    tensor: Any  # torch.Tensor, uint8, 1-D, owning its cudaMalloc block
    handle: CudaHandle | None  # None only while being created


class CudaMemory:
    """The ``SegmentMemory`` of one GPU, named by UUID.

    Thread-safe: one lock serializes every method, because segment creation relies on
    the caching allocator holding no cached block (``empty_cache`` then allocate) and
    ``free`` must never release memory a copy is using.

    Raises (constructor):
        ValueError: no visible GPU has ``device_uuid`` (never falls back to another GPU).
        RuntimeError: the CUDA allocator cannot share IPC handles (a non-native backend).
    """

    def __init__(self, device_uuid: str) -> None:
        import torch

        by_uuid = {gpu.uuid: gpu for gpu in discover_gpus()}
        if device_uuid not in by_uuid:
            raise ValueError(f"no visible GPU has UUID {device_uuid!r}; visible: {sorted(by_uuid)}")
        backend = torch.cuda.get_allocator_backend()
        if backend != "native":
            raise RuntimeError(f"the CUDA allocator backend is {backend!r}; CUDA IPC needs 'native'")
        self._torch = torch
        self._uuid = device_uuid
        self._index = by_uuid[device_uuid].index
        self._device = torch.device("cuda", self._index)
        self._stream = torch.cuda.Stream(device=self._device)
        self._lock = threading.Lock()
        self._segments: dict[int, _CudaSegment] = {}
        self._closed = False

    @property
    def device_uuid(self) -> str:
        return self._uuid

    @property
    def index(self) -> int:
        return self._index

    def create(self, segment: SegmentInfo, *, prefault: bool = True) -> None:
        """Allocate, zero, check and share one segment. See ``SegmentMemory.create``
        (``prefault`` changes nothing here: device memory is zeroed explicitly either way).

        Cost: one ``cudaMalloc`` and a memset at device bandwidth, a device synchronize,
        and a ``memory_snapshot()`` walk over the allocator's segments.

        Raises:
            ResourceExhausted: CUDA out of memory.
            ValueError: id in use, or a size that is not a multiple of 2 MiB of at least
                10 MiB (such a segment could not own its ``cudaMalloc`` block).
            RuntimeError: the allocation does not own its block, or torch produced an
                unexpected handle (e.g. expandable segments): never shared.
        """
        torch, nbytes = self._torch, segment.nbytes
        if nbytes < CUDA_MIN_SEGMENT_BYTES or nbytes % CUDA_SEGMENT_ALIGNMENT_BYTES:
            raise ValueError(
                f"segment {segment.segment_id}: a CUDA segment must be a multiple of "
                f"{CUDA_SEGMENT_ALIGNMENT_BYTES} bytes and at least {CUDA_MIN_SEGMENT_BYTES}, "
                f"got {nbytes}"
            )
        with self._lock, torch.cuda.device(self._index):
            if self._closed:
                raise ValueError("CudaMemory is closed")
            if segment.segment_id in self._segments:
                raise ValueError(f"segment {segment.segment_id} already exists")
            torch.cuda.empty_cache()  # no cached block may be split to serve this request
            try:
                tensor = torch.empty(nbytes, dtype=torch.uint8, device=self._device)
            except torch.cuda.OutOfMemoryError as err:
                free, _total = torch.cuda.mem_get_info(self._index)
                raise ResourceExhausted(
                    f"GPU {self._uuid} has no room for segment {segment.segment_id} of {amount(nbytes)}: "
                    f"the driver reports {amount(free)} free on the GPU",
                    requested_bytes=nbytes,
                    free_bytes=free,
                    largest_free_extent_bytes=free,
                    satisfiable=False,
                ) from err
            tensor.zero_()
            torch.cuda.synchronize(self._index)
            seg, shared = _CudaSegment(segment, tensor, None), None
            del tensor  # `seg` holds the only reference, so _release really frees it
            try:
                self._check_owns_block(seg.tensor, nbytes)
                shared = seg.tensor.untyped_storage()._share_cuda_()
                seg.handle = self._handle_of(shared, nbytes)
            except BaseException:
                self._release(seg, shared)
                raise
            self._segments[segment.segment_id] = seg

    def _check_owns_block(self, tensor: Any, nbytes: int) -> None:
        address = tensor.data_ptr()
        for block in self._torch.cuda.memory_snapshot():
            if block.get("device") == self._index and block["address"] == address:
                if block["total_size"] != nbytes or block.get("is_expandable", False):
                    raise RuntimeError(
                        f"the segment's allocation lies in a cudaMalloc block of "
                        f"{block['total_size']} bytes (expandable: {block.get('is_expandable')}),"
                        f" not one of its own {nbytes} bytes: sharing it would expose other memory"
                    )
                return
        raise RuntimeError("the segment's allocation does not start a cudaMalloc block")

    def _handle_of(self, shared: tuple[Any, ...], nbytes: int) -> CudaHandle:
        _device, mem_handle, size, offset, rc_handle, rc_offset, _event, _sync = shared
        mem_handle = bytes(mem_handle or b"")
        if len(mem_handle) != 66 or mem_handle[1:2] != b"c" or offset != 0 or size != nbytes:
            raise RuntimeError(
                f"unexpected CUDA IPC handle from torch {self._torch.__version__}: "
                f"{len(mem_handle)} bytes, kind {mem_handle[1:2]!r}, offset {offset}, size {size} "
                f"(expected 66 bytes, kind b'c', offset 0, size {nbytes}); expandable segments?"
            )
        return CudaHandle(
            device_uuid=self._uuid,
            torch_version=self._torch.__version__,
            mem_handle=mem_handle,
            storage_size_bytes=size,
            storage_offset_bytes=offset,
            ref_counter_handle=bytes(rc_handle),
            ref_counter_offset=rc_offset,
            event_handle=bytes(64),  # synchronized before sharing: no event to wait on
            event_sync_required=False,
        )

    def free(self, segment_id: int) -> None:
        """Return the segment's memory to the device (``cudaFree``). Idempotent.

        Freeing memory another process still maps is undefined behaviour in CUDA: the
        daemon calls this only once no live session maps the segment. Clients may have
        decremented torch's IPC ref counter any number of times (or never, if they died),
        so the counter is reset to 0 first; otherwise torch would park the block in its
        IPC limbo forever and the memory would never come back.
        """
        with self._lock:
            seg = self._segments.pop(segment_id, None)
            if seg is not None:
                self._release(seg)

    def _release(self, seg: _CudaSegment, shared: tuple[Any, ...] | None = None) -> None:
        """Drop the segment's tensor and ``cudaFree`` its block. ``shared``: the
        ``_share_cuda_()`` tuple when creation failed before ``seg.handle`` was set."""
        torch = self._torch
        with torch.cuda.device(self._index):
            torch.cuda.synchronize(self._index)
            if seg.handle is not None:
                reset_ref_counter(seg.handle.ref_counter_handle, seg.handle.ref_counter_offset)
            elif shared is not None:
                reset_ref_counter(bytes(shared[4]), shared[5])
            seg.tensor = None  # last reference: torch's IPC deleter returns the block
            torch.cuda.ipc_collect()
            torch.cuda.empty_cache()

    def close(self) -> None:
        """Free every segment and refuse new ones. Idempotent."""
        with self._lock:
            self._closed = True
            segments, self._segments = list(self._segments.values()), {}
            for seg in segments:
                self._release(seg)

    def __enter__(self) -> CudaMemory:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def handle(self, segment_id: int) -> CudaHandle:
        """The segment's ``CudaHandle`` (cached at creation). ``KeyError`` if unknown."""
        with self._lock:
            return self._get(segment_id).handle

    def segment_ids(self) -> list[int]:
        with self._lock:
            return sorted(self._segments)

    def copy(self, moves: Sequence[Move]) -> None:
        """Apply moves in order on the backend's stream. See ``SegmentMemory.copy``.

        Every move is validated, and the staging buffer overlapping moves need (at most
        ``STAGING_BYTES``) allocated, before the first byte moves: running out of device
        memory half-way through a plan is thus impossible. The stream is synchronized
        after each move, so a device error is charged to the move that caused it and
        ``CopyError.completed`` is exact. The staging buffer is released, with
        ``empty_cache``, before returning. Cost: device-to-device copies at memory
        bandwidth (twice for staged chunks), one synchronize per move.

        Raises:
            CopyError: see ``kvbroker.memory.backend.CopyError``; ``completed=0`` with a
                ``torch.cuda.OutOfMemoryError`` cause when the staging buffer does not fit.
        """
        torch = self._torch
        with self._lock, torch.cuda.device(self._index), torch.cuda.stream(self._stream):
            sizes = {sid: seg.info.nbytes for sid, seg in self._segments.items()}
            checked = [check_move(move, sizes) for move in moves]
            involved = {extent.segment_id for pair in checked for extent in pair}
            tensors = {sid: self._segments[sid].tensor for sid in involved}
            need = staging_needed(checked, direct_min=DIRECT_CHUNK_MIN_BYTES, staging=STAGING_BYTES)
            if need:
                try:
                    tensors[STAGING] = torch.empty(need, dtype=torch.uint8, device=self._device)
                except torch.cuda.OutOfMemoryError as err:
                    raise CopyError(0, err) from err

            def copy_range(source: Place, destination: Place, nbytes: int) -> None:
                src = tensors[source.segment_id][source.offset : source.offset + nbytes]
                dst = tensors[destination.segment_id][destination.offset : destination.offset + nbytes]
                self._copy_range(dst, src)

            try:
                run_moves(
                    checked,
                    copy_range,
                    direct_min=DIRECT_CHUNK_MIN_BYTES,
                    staging=STAGING_BYTES,
                    fence=self._stream.synchronize,
                )
            finally:
                if need:
                    self._stream.synchronize()  # no copy may still read the buffer
                    del tensors[STAGING]
                    torch.cuda.empty_cache()

    def _copy_range(self, destination: Any, source: Any) -> None:
        """Enqueue one copy between two non-overlapping views on the backend's stream.

        The one primitive every byte of a ``copy`` goes through; a test may override it
        to fail part-way.
        """
        destination.copy_(source)

    def zero(self, segment_id: int, offset: int, nbytes: int) -> None:
        """Fill a byte range of a segment with zeros. See ``SegmentMemory.zero``.

        ``zero_()`` on a view, on the backend's stream, then a synchronize, so the bytes
        are zero when this returns (the engine hands the cache out next). Cost: a device
        memset at memory bandwidth (well under a millisecond per GiB) plus the synchronize.
        """
        torch = self._torch
        with self._lock:
            seg = self._get(segment_id)
            check_range(segment_id, seg.info.nbytes, offset, nbytes)
            if not nbytes:
                return
            with torch.cuda.device(self._index), torch.cuda.stream(self._stream):
                seg.tensor[offset : offset + nbytes].zero_()
                self._stream.synchronize()

    def read_into(self, segment_id: int, offset: int, out: Any) -> None:
        """Copy bytes of a segment into ``out``, a host numpy array (``ByteAccess``):
        one device-to-host copy on the backend's stream, then a synchronize."""
        self._transfer(segment_id, offset, out, to_device=False)

    def write_from(self, segment_id: int, offset: int, data: Any) -> None:
        """Copy ``data``, a host numpy array, into a segment (``ByteAccess``)."""
        self._transfer(segment_id, offset, data, to_device=True)

    def _transfer(self, segment_id: int, offset: int, host: Any, *, to_device: bool) -> None:
        torch = self._torch
        with self._lock:
            seg = self._get(segment_id)
            check_range(segment_id, seg.info.nbytes, offset, host.nbytes)
            if not host.nbytes:
                return
            view = seg.tensor[offset : offset + host.nbytes]
            with torch.cuda.device(self._index), torch.cuda.stream(self._stream):
                if to_device:
                    view.copy_(torch.from_numpy(host))
                else:
                    torch.from_numpy(host).copy_(view)
                self._stream.synchronize()

    def _get(self, segment_id: int) -> _CudaSegment:
        try:
            return self._segments[segment_id]
        except KeyError:
            raise KeyError(f"segment {segment_id} does not exist on GPU {self._uuid}") from None
