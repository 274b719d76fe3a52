"""Large copies split into pieces copied at once by worker threads (memory bandwidth).

One thread's ``memmove`` reaches a fraction of a machine's memory bandwidth (on a
many-core server, one core's share of the memory controllers' queues); several threads
copying disjoint pieces of one range reach several times that. The copy primitive must
release the GIL (``ctypes.memmove`` does: a ``CFUNCTYPE`` foreign function; so do
numpy and torch copies), or the threads only take turns.

Why this is safe for the copy contract (``kvbroker.memory.chunks``): ``copy_range``
only ever gets a source and a destination that do not overlap, so its pieces, disjoint
slices of both, may run in any order and at once; a call returns (or raises) only once
every piece finished, so no thread still writes while the plan runner restores a failed
move. A piece that fails may have written any part of its slice, which is what the
primitive's contract allows for the whole range anyway.

Cost: a range below ``min_bytes`` is one inline call; a larger one is ``threads``
pieces (``align``-aligned, 4 KiB by default), one run by the calling thread, so a copy waits for its slowest
piece plus a thread hand-off (microseconds) per piece.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

#: The default number of copy threads: the cores this process may run on, at most 8
#: (more rarely adds bandwidth: a few cores saturate a socket's memory channels).
MAX_DEFAULT_THREADS = 8
PIECE_ALIGN = 4096


def default_threads() -> int:
    return max(1, min(MAX_DEFAULT_THREADS, len(os.sched_getaffinity(0))))


class ParallelCopier:
    """Runs ``copy(destination, source, nbytes)`` over pieces of a range in parallel.

    Args:
        threads: how many threads copy one range (the caller's included); 1 copies
            inline, 0 means ``default_threads()``.
        min_bytes: ranges smaller than this are copied inline in one call.
        align: pieces start at multiples of this many bytes of the range.
    """

    def __init__(self, threads: int = 0, *, min_bytes: int = 4 << 20, align: int = PIECE_ALIGN) -> None:
        if type(threads) is not int or threads < 0:
            raise ValueError(f"threads must be a whole number >= 0, got {threads!r}")
        self.threads = threads or default_threads()
        self.min_bytes = min_bytes
        self.align = align
        self._pool = (
            ThreadPoolExecutor(self.threads - 1, thread_name_prefix="kvbroker-copy") if self.threads > 1 else None
        )

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)

    def pieces(self, nbytes: int) -> list[tuple[int, int]]:
        """(offset, length) of each piece of an ``nbytes`` range, in order."""
        if self._pool is None or nbytes < self.min_bytes:
            return [(0, nbytes)] if nbytes else []
        step = -(-nbytes // self.threads)
        step = -(-step // self.align) * self.align
        return [(start, min(step, nbytes - start)) for start in range(0, nbytes, step)]

    def copy(self, copy: Callable[[int, int, int], None], destination: int, source: int, nbytes: int) -> None:
        """Copy ``nbytes`` from ``source`` to ``destination`` (addresses that must not
        overlap) with ``copy`` over pieces; returns once every piece finished. Raises the
        first piece's exception (in piece order) when any failed."""
        pieces = self.pieces(nbytes)
        if len(pieces) <= 1:
            if nbytes:
                copy(destination, source, nbytes)
            return
        assert self._pool is not None
        futures: list[Future[None]] = [
            self._pool.submit(copy, destination + start, source + start, length) for start, length in pieces[1:]
        ]
        first: BaseException | None = None
        start, length = pieces[0]
        try:
            copy(destination + start, source + start, length)
        except BaseException as err:  # noqa: BLE001 - raised below, after every piece ended
            first = err
        for future in futures:
            err = future.exception()  # waits for the piece
            if err is not None and first is None:
                first = err
        if first is not None:
            raise first
