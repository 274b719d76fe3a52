"""What a host handle names, checked without torch: where the object is, and whether it is
the very object the broker created.

A host handle (``kvbroker.v1.HostSegmentHandle``) names a POSIX shared-memory object by
its directory (``shm_dir``: the daemon's ``--shm-dir``) and name. Both come from another
process, so they are validated before they reach the kernel: the name must match
``kvbroker.wire.SHM_NAME_PATTERN``, the directory be absolute without ``..``, and the
object opened must be the inode the broker created (``st_dev``/``st_ino``), never one
that took its name since.

``kvbroker_client.mapping`` maps what ``open_host`` opens; ``check_handle`` is the same
opening without the mapping, so ``allocate`` can find out, before it returns, that this
process cannot reach the broker's memory (a worker that does not share the daemon's shm
directory) and give the cache back instead of leaving it behind (issue 10.1). The
exception types live here, not in ``mapping``, so raising them does not import torch.
"""

from __future__ import annotations

import os
import stat

from kvbroker.v1 import broker_pb2
from kvbroker.wire import SHM_NAME_PATTERN

__all__ = [
    "DEFAULT_SHM_DIR", "HandleError", "StaleHandleError", "check_handle", "host_path", "open_host",
]  # fmt: skip

#: Where host segments live when the handle does not say (daemons before ``shm_dir``).
DEFAULT_SHM_DIR = "/dev/shm"


class HandleError(ValueError):
    """A handle that cannot be mapped, or a view that does not fit it."""


class StaleHandleError(HandleError):
    """The segment the handle names is gone or is another object now.

    The broker freed the segment or restarted: ask it again (attach the cache) for a
    fresh handle. Or this process does not see the broker's shm directory at all.
    """


def host_path(host: broker_pb2.HostSegmentHandle, default_dir: str = DEFAULT_SHM_DIR) -> str:
    """The object's path: the handle's directory (``default_dir`` when it names none)
    and its name, both validated. Raises ``HandleError``."""
    if not SHM_NAME_PATTERN.fullmatch(host.shm_name):
        raise HandleError(f"shm_name {host.shm_name!r} does not match {SHM_NAME_PATTERN.pattern}")
    directory = host.shm_dir or default_dir
    if host.shm_dir and (
        not os.path.isabs(directory) or ".." in directory.split("/") or "\0" in directory
    ):  # a handle may name where the broker keeps its objects, never a relative or climbing path
        raise HandleError(f"shm_dir {directory!r} is not an absolute path without '..'")
    return os.path.join(directory, host.shm_name)


def open_host(host: broker_pb2.HostSegmentHandle, default_dir: str = DEFAULT_SHM_DIR) -> int:
    """Open the object ``host`` names, read-write, and check that it is the broker's
    (the inode it created, a regular file, at least ``size_bytes`` long). Returns the
    file descriptor; the caller closes it.

    Raises:
        StaleHandleError: it does not exist here, or another object has its name.
        HandleError: an invalid handle, or the object cannot be opened.
    """
    path = host_path(host, default_dir)
    if host.size_bytes == 0:
        raise HandleError("host segment has size_bytes 0")
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)  # never O_CREAT
    except FileNotFoundError:
        raise StaleHandleError(
            f"{path} does not exist: the broker freed the segment or restarted, or this process "
            "does not share the broker's shm directory"
        ) from None
    except OSError as err:
        raise HandleError(f"cannot open {path}: {err.strerror}") from err
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise HandleError(f"{path} is not a regular file")
        if (st.st_dev, st.st_ino) != (host.st_dev, host.st_ino):
            raise StaleHandleError(
                f"{path} is another object than the handle names (device/inode "
                f"{st.st_dev}/{st.st_ino}, expected {host.st_dev}/{host.st_ino})"
            )
        if st.st_size < host.size_bytes:
            raise StaleHandleError(f"{path} has {st.st_size} bytes, fewer than the handle's {host.size_bytes}")
    except BaseException:
        os.close(fd)
        raise
    return fd


def check_handle(handle: broker_pb2.Handle, default_dir: str = DEFAULT_SHM_DIR) -> None:
    """Raise ``HandleError`` unless this process can reach the memory ``handle`` names.

    A host object is opened and checked as ``open_host`` does, then closed (an open, an
    fstat and a close: microseconds). A CUDA handle is left to its first view: opening
    it needs the GPU visible here and creates a CUDA context, which a process that
    allocates for other workers may not want.
    """
    if handle.WhichOneof("segment") == "host":
        os.close(open_host(handle.host, default_dir))
