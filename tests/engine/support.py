"""Engines over real host segments for the engine and server tests, and a backend whose
device work can be held at the door or made to fail (to see what runs in between)."""

from __future__ import annotations

import asyncio
import errno
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

from kvbroker.core import Broker, DeviceSpec, Move, PoolSpec, SegmentInfo
from kvbroker.core.audit import audit
from kvbroker.engine import Engine, EngineSettings
from kvbroker.memory.backend import CopyError
from kvbroker.memory.host import HostMemory
from tests.support.wait import until  # noqa: F401 - the engine tests' async poll, re-exported

MiB = 1 << 20


@contextmanager
def private_shm_dir() -> Iterator[str]:
    """A directory of our own on the host's tmpfs: segments there cost what /dev/shm
    objects cost, and a test can count exactly the objects its broker made."""
    base = "/dev/shm" if os.path.isdir("/dev/shm") else None
    path = tempfile.mkdtemp(prefix="kvb-test-", dir=base)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


class Door:
    """Where a device thread stops until the test opens the door. ``entered`` is set
    each time a thread arrives."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.opened = threading.Event()
        self.opened.set()

    def close(self) -> None:
        self.opened.clear()

    def open(self) -> None:
        self.opened.set()

    def pass_through(self) -> None:
        self.entered.set()
        if not self.opened.wait(30):
            raise TimeoutError("the test never opened the door")

    async def arrival(self, timeout: float = 10.0) -> None:
        """Until a device thread reached the door."""
        if not await asyncio.to_thread(self.entered.wait, timeout):
            raise TimeoutError("no device thread reached the door")


class DoorMemory:
    """A ``HostMemory`` whose create, zero, copy and read_into pass a ``Door`` first, and whose
    copy can fail after ``copy_fails_after`` moves (the earlier moves complete, the rest
    do not start: what ``CopyError`` promises)."""

    def __init__(self, inner: HostMemory) -> None:
        self.inner = inner
        self.doors = {"create": Door(), "zero": Door(), "copy": Door(), "read": Door()}
        self.copy_fails_after: int | None = None
        self.create_error: BaseException | None = None
        self.zeroed: list[tuple[int, int, int]] = []

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def create(self, segment: SegmentInfo, *, prefault: bool = True) -> None:
        self.doors["create"].pass_through()
        if self.create_error is not None:
            raise self.create_error
        self.inner.create(segment, prefault=prefault)

    def zero(self, segment_id: int, offset: int, nbytes: int) -> None:
        self.doors["zero"].pass_through()
        self.inner.zero(segment_id, offset, nbytes)
        self.zeroed.append((segment_id, offset, nbytes))

    def read_into(self, segment_id: int, offset: int, out) -> None:
        """``ByteAccess.read_into`` (an offload's copy-out), after the "read" door."""
        self.doors["read"].pass_through()
        self.inner.read_into(segment_id, offset, out)

    def copy(self, moves: Sequence[Move]) -> None:
        self.doors["copy"].pass_through()
        k = self.copy_fails_after
        if k is None or k >= len(moves):
            self.inner.copy(moves)
            return
        self.inner.copy(moves[:k])
        raise CopyError(k, OSError(errno.EIO, "injected copy failure"))


def host_engine(
    shm_dir: str,
    *,
    capacity: int = 16 * MiB,
    pools: Sequence[PoolSpec] | None = None,
    settings: EngineSettings | None = None,
    wrap: Callable[[HostMemory], object] = lambda memory: memory,
    instance_id: str = "test",
    observer: object = None,
) -> Engine:
    """An engine over real host segments in ``shm_dir``: one device, by default one
    pool "p" of 1 MiB blocks and 16 MiB segments that never reclaims in the background."""
    if pools is None:
        pools = [PoolSpec("p", ("host",), block_bytes=MiB, segment_bytes=16 * MiB, gc_threshold=1.0)]
    broker = Broker([DeviceSpec("host", capacity, 4096)], pools, id_prefix=instance_id)
    memory = wrap(HostMemory(instance_id, shm_dir=shm_dir))
    return Engine(broker, {"host": memory}, instance_id, settings or EngineSettings(lease_seconds=60), observer)


async def steps(n: int) -> None:
    """Let the loop run ``n`` steps (no time passes: a deterministic interleaving)."""
    for _ in range(n):
        await asyncio.sleep(0)


def shm_objects(shm_dir: str) -> list[str]:
    """The segment objects in ``shm_dir`` (not the owners' lock files, which live as long
    as their HostMemory: see kvbroker/memory/owner.py)."""
    return sorted(
        name for name in os.listdir(shm_dir) if name.startswith("kvb-") and not name.endswith(".lock")
    )


def check(engine: Engine) -> None:
    """The core's accounting is consistent (call when no device work is in flight)."""
    audit(engine.broker)
