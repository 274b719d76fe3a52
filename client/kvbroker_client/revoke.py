"""Taking bytes back from views this process already built (issue 13).

A tensor view of a cache cannot be revoked: it is a pointer into a shared mapping of the
broker's segment. When the broker stops counting this process as a holder (its session
ended, the cache was evicted or moved, this client released it), it may hand those bytes
to another tenant at once, and every write through an old view would land in that
tenant's cache. So the client replaces the cache's pages in its own address space with
private anonymous memory: ``mmap(MAP_FIXED | MAP_PRIVATE | MAP_ANONYMOUS)`` over the very
addresses the views point at. Old views stay valid tensors (no SIGSEGV, no dangling
pointer) but now read zeros and write into memory nobody else can see; the shared bytes
are no longer reachable from this process through them.

What is revoked is the page-aligned part of ``[offset, offset + length)`` that no other
live claim of this process covers (``uncovered``): two clients of one process may hold
the same cache, and one client's loss must not take the other's bytes. A cache whose
range does not start and end on page boundaries (``block_bytes`` below the page size)
keeps its partial edge pages shared: use blocks of at least a page (the default is
64 KiB). Device (CUDA) memory cannot be remapped this way: those views are not revoked.

Pure functions around one libc call; no torch.
"""

from __future__ import annotations

import ctypes
import mmap
import os
from collections.abc import Iterable

__all__ = ["PAGE", "remap_private", "uncovered"]

PAGE = mmap.PAGESIZE
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_MAP_FIXED = 0x10  # the same value on every Linux architecture Python runs on
_MAP_FAILED = ctypes.c_void_p(-1).value


def uncovered(lo: int, hi: int, others: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """The whole pages of ``[lo, hi)`` that no range of ``others`` touches, as sorted,
    disjoint ``(start, end)`` byte ranges (multiples of ``PAGE``). A page any other
    range overlaps, even by one byte, is kept: it may hold another holder's bytes."""
    start, end = -(-lo // PAGE) * PAGE, hi // PAGE * PAGE
    pieces = [(start, end)] if start < end else []
    for o_lo, o_hi in sorted(others):
        o_lo, o_hi = o_lo // PAGE * PAGE, -(-o_hi // PAGE) * PAGE  # the pages it touches
        cut: list[tuple[int, int]] = []
        for p_lo, p_hi in pieces:
            if o_hi <= p_lo or o_lo >= p_hi:
                cut.append((p_lo, p_hi))
                continue
            if p_lo < o_lo:
                cut.append((p_lo, o_lo))
            if o_hi < p_hi:
                cut.append((o_hi, p_hi))
        pieces = cut
    return pieces


def remap_private(address: int, length: int) -> None:
    """Replace ``[address, address + length)`` of this process (page-aligned, inside a
    live mapping the caller keeps alive meanwhile) with zero-filled private memory.

    Raises:
        OSError: the kernel refused (out of memory for the page tables; the caller must
            then not hand out the range again either).
    """
    if address % PAGE or length % PAGE or length <= 0:
        raise ValueError(f"remap_private: [{address:#x}, +{length}) is not whole pages")
    flags = _MAP_FIXED | mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
    got = _libc.mmap(address, length, mmap.PROT_READ | mmap.PROT_WRITE, flags, -1, 0)
    if got == _MAP_FAILED or got != address:
        err = ctypes.get_errno()
        raise OSError(err, f"mmap(MAP_FIXED) over {length} bytes at {address:#x}: {os.strerror(err)}")
