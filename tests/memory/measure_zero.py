"""What ``HostMemory.zero`` costs, next to a memmove of the same size (not a test).

Run: ``PYTHONPATH=.:client python tests/memory/measure_zero.py``. Prints the median of
several runs for 1 MiB and 1 GiB: ``zero`` (memset through the server's mapping) and
``copy`` of one move between two segments (memmove), and how far another Python thread got
while a 1 GiB zero ran (the GIL is released if it kept counting).
"""

from __future__ import annotations

import os
import statistics
import tempfile
import threading
import time

from kvbroker.core.types import GiB, MiB, Extent, Move, SegmentInfo
from kvbroker.memory.host import HostMemory


def timed(function, repeat: int) -> float:
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        function()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def main() -> None:
    directory = tempfile.mkdtemp(prefix="kvbmeasure-", dir="/dev/shm")
    with HostMemory("measure", shm_dir=directory) as memory:
        memory.create(SegmentInfo(1, 1, "p", "host", GiB))
        memory.create(SegmentInfo(2, 1, "p", "host", GiB))
        for label, nbytes, repeat in (("1 MiB", MiB, 200), ("1 GiB", GiB, 7)):
            zero = timed(lambda: memory.zero(1, 0, nbytes), repeat)
            move = timed(lambda: memory.copy([Move("c", Extent(1, 0, nbytes), Extent(2, 0, nbytes))]), repeat)
            print(
                f"{label}: zero {zero * 1e3:8.3f} ms ({nbytes / zero / GiB:5.1f} GiB/s)   "
                f"memmove {move * 1e3:8.3f} ms ({nbytes / move / GiB:5.1f} GiB/s)"
            )

        counted, stop = [0], threading.Event()

        def count() -> None:
            while not stop.is_set():
                counted[0] += 1

        counter = threading.Thread(target=count)
        counter.start()
        start = time.perf_counter()
        before = counted[0]
        memory.zero(1, 0, GiB)
        during = counted[0] - before
        elapsed = time.perf_counter() - start
        stop.set()
        counter.join()
        print(f"another thread counted {during} times during a {elapsed * 1e3:.0f} ms zero of 1 GiB")
    os.rmdir(directory)


if __name__ == "__main__":
    main()
