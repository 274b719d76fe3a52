"""Client side of handles: map each broker segment once per process, hand out views.

A ``kvbroker.v1.Handle`` names a segment (host shared memory or a CUDA allocation) and a
byte range in it. ``SegmentMapper`` maps the segment the first time it sees it, keyed by
``(instance_id, segment_id, segment_generation)``, and every later view of that segment
is a slice of the same base tensor: zero-copy, and mapping a 1 GiB cache costs what a
1 MiB one does once its segment is mapped.

Every field of a handle is validated before it reaches the kernel or the CUDA driver: a
handle is data from another process, and an unchecked name or size would let it point
this process at any file or overrun its mapping. A host handle names its
directory (``HostSegmentHandle.shm_dir``, the daemon's ``--shm-dir``); the name must match
``kvbroker.wire.SHM_NAME_PATTERN`` and the directory be absolute without ``..``, and the
object opened must be the very inode the broker created (``st_dev``/``st_ino``): see
``kvbroker_client/handles.py``, which checks this without torch.

This module imports torch at once; the rest of the package imports it on first use (see
``process_mapper``). Of the broker it imports only ``kvbroker.wire`` and the generated
``kvbroker.v1``.
"""

from __future__ import annotations

import math
import mmap
import os
import threading
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch.multiprocessing.reductions import StorageWeakRef

from kvbroker.v1 import broker_pb2
from kvbroker.wire import REF_COUNTER_NAME_PATTERN
from kvbroker_client.handles import DEFAULT_SHM_DIR, HandleError, StaleHandleError, open_host
from kvbroker_client.revoke import remap_private, uncovered

__all__ = [
    "DEFAULT_SHM_DIR", "DeviceNotVisibleError", "HandleError", "SegmentKey", "SegmentMapper",
    "StaleHandleError", "UnsupportedHandleError", "process_mapper",
]  # fmt: skip
#: Handle framing versions of torch's caching allocator this client understands.
_KNOWN_HANDLE_VERSIONS = (1, 2)


class DeviceNotVisibleError(HandleError):
    """The segment lives on a GPU this process cannot see.

    Never mapped through another GPU: CUDA could silently open a slow peer mapping.
    Make the GPU visible (``CUDA_VISIBLE_DEVICES``) or ask for host memory.
    """


class UnsupportedHandleError(HandleError):
    """This process cannot open the handle: a different torch handle framing, a
    non-native CUDA allocator, or the broker's own process."""


class SegmentKey(NamedTuple):
    """What identifies one mapped segment: a reused segment id gets a new generation."""

    instance_id: str
    segment_id: int
    generation: int


@dataclass(eq=False, slots=True)
class _Mapped:
    """One mapping of a segment. ``base`` is None once the mapping is no longer the one
    new views come from (a range of it was revoked, or its segment retired): it then
    lives only as long as the views built from it (``storage``)."""

    identity: tuple[object, ...]  # the handle fields that name the memory itself
    base: torch.Tensor | None  # uint8, the whole segment
    address: int
    storage: Any  # StorageWeakRef of the base: expired once no view uses the mapping
    #: The host mapping's ``mmap`` object (weakly: a strong ref, taken while a range is
    #: revoked, keeps the addresses mapped); None for CUDA, which cannot be revoked.
    mmap_ref: Callable[[], Any] | None
    #: Owner (a client's core) -> byte ranges it built views of, while it holds them.
    claims: dict[object, set[tuple[int, int]]] = field(default_factory=dict)


class SegmentMapper:
    """Maps broker segments into this process, once each, and returns views of them.

    Revocation (``revoke``, kvbroker_client/revoke.py): when a client stops holding a
    cache, the pages of the views it built are replaced by private memory, and the
    mapping stops serving new views (the next view maps the segment afresh), so a view
    built later is never one of those private pages, and an old one never reaches the
    shared bytes again. Views of other holders in the same mapping keep theirs.

    Lifetime: a host segment's ``mmap`` object is referenced by its base tensor (through
    ``torch.frombuffer``) and is never closed explicitly, because closing a mapping that
    tensors use turns their next access into a SIGSEGV; it is unmapped when the last view
    is garbage-collected; ``retire`` and ``drop_instance`` only forget the entry. A CUDA
    segment's storage likewise closes its IPC mapping when its last view dies.

    Thread-safe: mapping happens under a lock, so concurrent first uses map once.

    Args:
        shm_dir: where host segment objects live when a handle does not say (daemons
            older than ``HostSegmentHandle.shm_dir``).
        populate: map host segments with ``MAP_POPULATE``: about 60 ms per GiB at map
            time instead of a page fault on each first access. Off by default: mapping
            then costs the same for 1 MiB and 1 GiB (about 0.3 ms), and a worker pays
            for the pages it touches.
    """

    def __init__(self, *, shm_dir: str = DEFAULT_SHM_DIR, populate: bool = False) -> None:
        self._shm_dir = shm_dir
        self._populate = populate
        self._lock = threading.Lock()
        self._mapped: dict[SegmentKey, _Mapped] = {}
        # Mappings no longer handed out (revoked ranges, retired segments) whose views may
        # still be alive; dropped once their storage expired.
        self._former: dict[SegmentKey, list[_Mapped]] = {}
        self._uuid_to_index: dict[str, int] | None = None

    @staticmethod
    def key_of(handle: broker_pb2.Handle) -> SegmentKey:
        return SegmentKey(handle.instance_id, handle.segment_id, handle.segment_generation)

    def view(
        self,
        handle: broker_pb2.Handle,
        dtype: torch.dtype | None = None,
        shape: Sequence[int] | None = None,
        *,
        owner: object = None,
    ) -> torch.Tensor:
        """A zero-copy tensor over the handle's byte range.

        Args:
            handle: from the broker (Allocate, Attach or Pin).
            dtype: element type; default ``torch.uint8``.
            shape: default: 1-D over all of ``handle.nbytes``. The view may be smaller
                than the range, never larger.
            owner: who holds the cache (a client's core): the range is claimed for it
                until ``revoke(handle, owner)``.

        Raises:
            HandleError: (or a subclass) the handle is invalid, stale or unmappable, the
                offset is not a multiple of the element size, or the view does not fit.

        Cost: the first view of a segment maps it; later ones are slices (microseconds).
        """
        base = self.segment(handle, owner)
        offset, nbytes = handle.byte_offset, handle.nbytes
        if offset + nbytes > base.numel():
            raise HandleError(
                f"handle range [{offset}, {offset + nbytes}) exceeds its segment of {base.numel()} bytes"
            )
        if dtype is None and shape is None:
            return base[offset : offset + nbytes]
        dtype = torch.uint8 if dtype is None else dtype
        itemsize = dtype.itemsize
        if offset % itemsize:
            raise HandleError(f"byte offset {offset} is not a multiple of {dtype}'s size {itemsize}")
        if shape is None:
            if nbytes % itemsize:
                raise HandleError(f"{nbytes} bytes is not a whole number of {dtype} elements")
            shape = (nbytes // itemsize,)
        dims = tuple(int(d) for d in shape)
        if any(d < 0 for d in dims):
            raise HandleError(f"shape {dims} has a negative dimension")
        need = math.prod(dims) * itemsize
        if need > nbytes:
            raise HandleError(f"a {dtype} view of shape {dims} needs {need} bytes; the handle has {nbytes}")
        return base[offset : offset + need].view(dtype).view(dims)

    def segment(self, handle: broker_pb2.Handle, owner: object = None) -> torch.Tensor:
        """The whole segment as one uint8 tensor, mapped on first use and cached; with
        ``owner``, the handle's range is claimed for it (see ``revoke``)."""
        key = self.key_of(handle)
        kind = handle.WhichOneof("segment")
        if kind is None:
            raise HandleError("handle carries no segment (neither host nor cuda)")
        if not handle.instance_id:
            raise HandleError("handle has no instance_id")
        identity = _identity(handle, kind)
        with self._lock:
            mapped = self._mapped.get(key)
            if mapped is None:
                base, mmap_ref = self._map_host(handle.host) if kind == "host" else (self._map_cuda(handle), None)
                storage = StorageWeakRef(base.untyped_storage())
                mapped = self._mapped[key] = _Mapped(identity, base, base.data_ptr(), storage, mmap_ref)
            elif mapped.identity != identity:
                raise StaleHandleError(
                    f"segment {key} is mapped already, but this handle names other memory: "
                    "the broker restarted with the same instance id?"
                )
            if owner is not None:
                mapped.claims.setdefault(owner, set()).add((handle.byte_offset, handle.byte_offset + handle.nbytes))
            assert mapped.base is not None
            return mapped.base

    def revoke(self, handle: broker_pb2.Handle, owner: object, reserved_bytes: int = 0) -> int:
        """``owner`` no longer holds the cache at ``handle``: replace the pages of its views
        of ``[byte_offset, byte_offset + max(nbytes, reserved_bytes))`` with private
        zero-filled memory (kvbroker_client/revoke.py), except pages another owner of this
        process still claims, and stop handing out views from those mappings. Returns the
        bytes revoked (0 for a range it built no view of, or device memory).

        Cost: one ``mmap`` call per uncovered run of pages, under the mapper's lock.
        """
        key = self.key_of(handle)
        lo = handle.byte_offset
        hi = lo + max(handle.nbytes, reserved_bytes)
        revoked = 0
        with self._lock:
            current = self._mapped.get(key)
            for mapped in [*([current] if current is not None else []), *self._former.get(key, [])]:
                ranges = mapped.claims.get(owner, set())
                mine = {r for r in ranges if r[0] < hi and lo < r[1]}
                if not mine:
                    continue
                ranges -= mine
                if not ranges:
                    del mapped.claims[owner]
                keep_alive = mapped.mmap_ref() if mapped.mmap_ref is not None else None
                if keep_alive is None:
                    continue  # device memory, or every view died: the mapping is gone
                others = [r for rs in mapped.claims.values() for r in rs]
                start = min(lo, *(r[0] for r in mine))
                end = max(hi, *(r[1] for r in mine))
                for a, b in uncovered(start, end, others):
                    remap_private(mapped.address + a, b - a)
                    revoked += b - a
                if mapped is current:
                    self._demote(key, mapped)
                del keep_alive
        return revoked

    def _demote(self, key: SegmentKey, mapped: _Mapped) -> None:
        """``mapped`` serves no new view; it lives as long as its views. Caller holds
        the lock."""
        if self._mapped.get(key) is mapped:
            del self._mapped[key]
        mapped.base = None
        former = [m for m in self._former.get(key, []) if not m.storage.expired()]
        self._former[key] = [*former, mapped]

    def retire(self, key: SegmentKey) -> None:
        """The broker retired this segment: forget it, and watch for its last view to die
        (the mapping is unmapped then). See ``still_mapped``."""
        with self._lock:
            mapped = self._mapped.get(key)
            if mapped is not None:
                self._demote(key, mapped)

    def still_mapped(self, key: SegmentKey) -> bool:
        """Whether any tensor of this process still uses the segment (mapped, or retired
        or revoked with a view alive). Cost: a dict look-up and a weak-reference check
        per former mapping."""
        with self._lock:
            if key in self._mapped:
                return True
            former = [m for m in self._former.pop(key, []) if not m.storage.expired()]
            if former:
                self._former[key] = former
            return bool(former)

    def drop_instance(self, instance_id: str) -> int:
        """Forget every segment of one broker instance (it stopped: its segments are
        unlinked, and a view keeps its memory only while it lives); returns how many."""
        with self._lock:
            keys = [k for k in self._mapped if k.instance_id == instance_id]
            for key in keys:
                self._demote(key, self._mapped[key])
            return len(keys)

    def keys(self) -> list[SegmentKey]:
        with self._lock:
            return list(self._mapped)

    def __contains__(self, key: object) -> bool:
        with self._lock:
            return key in self._mapped

    def __len__(self) -> int:
        with self._lock:
            return len(self._mapped)

    def _map_host(self, host: broker_pb2.HostSegmentHandle) -> tuple[torch.Tensor, Callable[[], Any]]:
        fd = open_host(host, self._shm_dir)  # validated: see kvbroker_client/handles.py
        try:
            flags = mmap.MAP_SHARED | (mmap.MAP_POPULATE if self._populate else 0)
            mapping = mmap.mmap(fd, host.size_bytes, flags=flags)
        finally:
            os.close(fd)
        return torch.frombuffer(mapping, dtype=torch.uint8), weakref.ref(mapping)  # keeps `mapping` referenced

    def _map_cuda(self, handle: broker_pb2.Handle) -> torch.Tensor:
        cuda = handle.cuda
        if handle.server_pid == os.getpid():
            raise UnsupportedHandleError(
                "this handle comes from this very process: CUDA cannot open its own IPC "
                "handle; use the broker's tensor directly"
            )
        index = self._cuda_index(cuda.device_uuid)
        backend = torch.cuda.get_allocator_backend()
        if backend != "native":
            raise UnsupportedHandleError(
                f"this process's CUDA allocator is {backend!r}; it cannot open CUDA IPC handles"
            )
        mem_handle = bytes(cuda.mem_handle)
        framed = len(mem_handle) == 66 and mem_handle[1:2] == b"c" and mem_handle[0] in _KNOWN_HANDLE_VERSIONS
        if not (framed or len(mem_handle) == 64):
            raise UnsupportedHandleError(
                f"unsupported CUDA handle framing ({len(mem_handle)} bytes, kind "
                f"{mem_handle[1:2]!r}) from torch {cuda.torch_version or '?'}; this is torch "
                f"{torch.__version__}"
            )
        if not REF_COUNTER_NAME_PATTERN.fullmatch(bytes(cuda.ref_counter_handle)):
            raise HandleError(f"bad ref counter name {bytes(cuda.ref_counter_handle)!r}")
        if len(cuda.event_handle) != 64:
            raise HandleError(f"event handle has {len(cuda.event_handle)} bytes, expected 64")
        if cuda.storage_size_bytes == 0:
            raise HandleError("CUDA segment has storage_size_bytes 0")
        with torch.cuda.device(index):
            storage = torch.UntypedStorage._new_shared_cuda(
                index,
                mem_handle,
                cuda.storage_size_bytes,
                cuda.storage_offset_bytes,
                bytes(cuda.ref_counter_handle),
                cuda.ref_counter_offset,
                bytes(cuda.event_handle),
                bool(cuda.event_sync_required),
            )
        empty = torch.empty(0, dtype=torch.uint8, device=torch.device("cuda", index))
        return empty.set_(storage, 0, (cuda.storage_size_bytes,), (1,))

    def _cuda_index(self, device_uuid: str) -> int:
        """This process's index of the GPU named ``device_uuid``; never another GPU."""
        if self._uuid_to_index is None:
            if not torch.cuda.is_available():
                raise DeviceNotVisibleError(
                    f"the segment is on GPU {device_uuid}, but this process has no CUDA device"
                )
            self._uuid_to_index = {_gpu_uuid(i): i for i in range(torch.cuda.device_count())}
        try:
            return self._uuid_to_index[device_uuid]
        except KeyError:
            raise DeviceNotVisibleError(
                f"GPU {device_uuid} is not visible to this process (visible: {sorted(self._uuid_to_index)})"
            ) from None


def _gpu_uuid(index: int) -> str:
    """The wire form of a GPU's UUID, ``GPU-xxxxxxxx-...``, as the broker writes it."""
    text = str(torch.cuda.get_device_properties(index).uuid)
    return text if text.startswith(("GPU-", "MIG-")) else f"GPU-{text}"


def _identity(handle: broker_pb2.Handle, kind: str) -> tuple[object, ...]:
    if kind == "host":
        h = handle.host
        return ("host", h.shm_dir, h.shm_name, h.size_bytes, h.st_dev, h.st_ino)
    c = handle.cuda
    return ("cuda", c.device_uuid, bytes(c.mem_handle), c.storage_size_bytes, c.storage_offset_bytes)


_process_mapper: SegmentMapper | None = None
_process_mapper_lock = threading.Lock()


def process_mapper() -> SegmentMapper:
    """The process-wide ``SegmentMapper``: each segment is mapped once per process,
    however many clients the process opens (each mapping costs an ``mmap`` or a CUDA IPC
    open, and two mappings of one segment would double its page-table cost)."""
    global _process_mapper
    if _process_mapper is None:
        with _process_mapper_lock:
            if _process_mapper is None:
                _process_mapper = SegmentMapper()
    return _process_mapper
