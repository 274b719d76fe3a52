"""torch's CUDA-IPC reference counter of a shared block, and resetting it before a free.

When a block is shared with ``UntypedStorage._share_cuda_()``, torch takes a slot in a
reference-counter file it creates in ``/dev/shm`` (named ``/torch_<pid>_<random>...``) and
sets it to 1. Each client that opens the handle through torch decrements the slot when its
storage dies; when the broker drops its own last reference to the block, torch returns the
block to the caching allocator only if the slot is 0, and otherwise parks it in its "IPC
limbo" until the count reaches 0.

The broker sends one handle to many clients (or to clients that never decrement, or die),
so the count is meaningless: it may never reach 0 (the memory would never come back) or go
negative. The broker frees a segment only when no live session maps it, and resets the slot
to 0 just before, so the free really frees.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import struct

from kvbroker.wire import REF_COUNTER_NAME_PATTERN

logger = logging.getLogger(__name__)

#: torch's ``RefcountedMapAllocator`` puts a 64-byte header before the int64 counter slots.
REF_COUNTER_HEADER_BYTES = 64
#: torch creates the file with ``shm_open``, which lives here on Linux.
REF_COUNTER_DIR = "/dev/shm"


def reset_ref_counter(rc_handle: bytes, rc_offset: int) -> None:
    """Set the int64 slot ``rc_offset`` of the counter file ``rc_handle`` to 0.

    If the file is missing or odd, nothing is written and the block stays in limbo: memory
    is leaked, never freed under a client. Cost: an open, an mmap of the (80 KB) file and
    one store.
    """
    if not REF_COUNTER_NAME_PATTERN.fullmatch(rc_handle):
        logger.warning("unexpected CUDA IPC ref counter name %r; not reset", rc_handle)
        return
    path = os.path.join(REF_COUNTER_DIR, rc_handle.decode("ascii").lstrip("/"))
    position = REF_COUNTER_HEADER_BYTES + 8 * rc_offset
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError as err:
        if err.errno != errno.ENOENT:
            logger.warning("cannot open CUDA IPC ref counter %s: %s", path, err)
        return
    try:
        size = os.fstat(fd).st_size
        if position + 8 > size:
            logger.warning("CUDA IPC ref counter %s is %d bytes, slot %d is past it", path, size, rc_offset)
            return
        with mmap.mmap(fd, size, flags=mmap.MAP_SHARED) as counters:
            struct.pack_into("<q", counters, position, 0)
    finally:
        os.close(fd)
