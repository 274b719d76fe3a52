"""Raw memory mappings through libc, for the host backend.

Python's ``mmap.mmap`` is not used for segments: on Python < 3.13 it ``dup()``s the file
descriptor and keeps the copy open for the mapping's life (``trackfd=False`` exists only
from 3.13), so a broker with thousands of segments would hold thousands of descriptors and
hit ``ulimit -n``. A mapping made by ``mmap(2)`` directly needs no descriptor once made:
the caller closes it right after ``map_shared``.

Every call here goes through ``ctypes.CDLL`` foreign functions, which release the GIL, so
a long prefault or memset does not stall the daemon's event loop thread.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.restype = ctypes.c_int
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.madvise.restype = ctypes.c_int
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]

_MAP_FAILED = ctypes.c_void_p(-1).value
_PROT_RW = mmap.PROT_READ | mmap.PROT_WRITE
#: ``MADV_POPULATE_WRITE`` (Linux 5.14+): fault every page in writable, in one syscall.
#: Python 3.11's mmap module does not export the constant; its value is 23 on Linux.
MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)


def _mmap(nbytes: int, flags: int, fd: int) -> int:
    address = _libc.mmap(None, nbytes, _PROT_RW, flags, fd, 0)
    if address is None or address == _MAP_FAILED:
        code = ctypes.get_errno()
        raise OSError(code, f"mmap of {nbytes} bytes failed: {os.strerror(code)}")
    return address


def map_shared(fd: int, nbytes: int) -> int:
    """Map ``nbytes`` of the object ``fd`` read-write and shared; return the address.

    The mapping keeps the object alive by itself: close ``fd`` afterwards. Release with
    ``unmap``. Cost: one syscall; no page is touched.

    Raises:
        OSError: ``ENOMEM`` when the process has no room for another mapping
            (``vm.max_map_count``) or address space (``ulimit -v``).
    """
    return _mmap(nbytes, mmap.MAP_SHARED, fd)


def map_anonymous(nbytes: int) -> int:
    """Map ``nbytes`` of private zero memory (a staging buffer); release with ``unmap``.

    Pages are allocated at first touch, so an unused tail costs nothing.
    """
    return _mmap(nbytes, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1)


def unmap(address: int, nbytes: int) -> None:
    """Remove a mapping made here. The caller guarantees nothing uses it any more."""
    if _libc.munmap(address, nbytes) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"munmap failed: {os.strerror(code)}")


def populate(address: int, nbytes: int) -> None:
    """Fault every page of a mapping in writable (tmpfs zero-fills a page on that fault).

    ``MADV_POPULATE_WRITE`` does it in one syscall; on kernels without it (< 5.14,
    ``EINVAL``) every page is written with zeros instead, which faults it the same way.

    Raises:
        OSError: the memory cannot be backed (``ENOMEM``, or ``EFAULT`` on a truncated
            object).
    """
    if _libc.madvise(address, nbytes, MADV_POPULATE_WRITE) == 0:
        return
    code = ctypes.get_errno()
    if code != errno.EINVAL:
        raise OSError(code, f"prefaulting {nbytes} bytes failed: {os.strerror(code)}")
    ctypes.memset(address, 0, nbytes)


def fallocate(fd: int, nbytes: int) -> None:
    """Reserve ``nbytes`` now, so a too-small tmpfs fails here with ENOSPC instead of a
    SIGBUS at a later page touch (``ftruncate`` alone reserves nothing). tmpfs may return
    EINTR for a large request when a signal arrives: retry."""
    while True:
        try:
            os.posix_fallocate(fd, 0, nbytes)
            return
        except InterruptedError:
            continue
