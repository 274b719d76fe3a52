"""Read and write a backend's segment in tests, through a mapping of its own.

The backends have no read/write API (production never needs one); a test looks at the
bytes the way a client would: a host segment through a fresh ``mmap`` of the object named
by its handle (so the handle's ``shm_dir``, name and identity are exercised too), a CUDA
segment through a torch view of the backend's tensor (the owning process cannot open its
own CUDA IPC handle).
"""

from __future__ import annotations

import contextlib
import mmap
import os
from collections.abc import Iterator
from typing import Any

from kvbroker.memory.backend import HostHandle


@contextlib.contextmanager
def host_mapping(memory: Any, segment_id: int) -> Iterator[mmap.mmap]:
    """A shared, writable mapping of a host segment, unmapped on exit.

    Opens ``<shm_dir>/<shm_name>`` as a client does and checks it is the handle's object.
    Do not build tensors over it: it is closed on exit.
    """
    handle = memory.handle(segment_id)
    assert isinstance(handle, HostHandle), handle
    fd = os.open(os.path.join(handle.shm_dir, handle.shm_name), os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        assert (st.st_dev, st.st_ino) == (handle.st_dev, handle.st_ino), "handle names another object"
        mapping = mmap.mmap(fd, handle.size_bytes, flags=mmap.MAP_SHARED)
    finally:
        os.close(fd)
    try:
        yield mapping
    finally:
        mapping.close()


def _cuda_tensor(memory: Any, segment_id: int) -> Any:
    return memory._get(segment_id).tensor  # the backend's own allocation, for tests only


def read_segment(memory: Any, segment_id: int, offset: int = 0, nbytes: int | None = None) -> bytes:
    """``nbytes`` of a segment from ``offset`` (to the end when None)."""
    handle = memory.handle(segment_id)
    if isinstance(handle, HostHandle):
        end = handle.size_bytes if nbytes is None else offset + nbytes
        assert 0 <= offset <= end <= handle.size_bytes, (offset, end, handle.size_bytes)
        with host_mapping(memory, segment_id) as mapping:
            return mapping[offset:end]
    import torch

    tensor = _cuda_tensor(memory, segment_id)
    end = tensor.numel() if nbytes is None else offset + nbytes
    assert 0 <= offset <= end <= tensor.numel()
    torch.cuda.synchronize(tensor.device)
    return tensor[offset:end].cpu().numpy().tobytes()


def write_segment(memory: Any, segment_id: int, offset: int, data: bytes) -> None:
    """Store ``data`` into a segment at ``offset``; visible to the backend on return."""
    handle = memory.handle(segment_id)
    if isinstance(handle, HostHandle):
        assert 0 <= offset and offset + len(data) <= handle.size_bytes
        with host_mapping(memory, segment_id) as mapping:
            mapping[offset : offset + len(data)] = bytes(data)
        return
    import torch

    tensor = _cuda_tensor(memory, segment_id)
    assert 0 <= offset and offset + len(data) <= tensor.numel()
    if data:
        tensor[offset : offset + len(data)].copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    torch.cuda.synchronize(tensor.device)
