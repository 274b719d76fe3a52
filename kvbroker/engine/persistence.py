"""Checkpoints of persistent pools' caches, and their restore at start.

**Never stopping the world.** A checkpoint takes one cache at a time: on the loop (a
short core section) it pins the cache for the broker's own ``~checkpoint`` holder, so
that no eviction, compaction or free touches its bytes; in a thread it copies them into
a host staging buffer (memory or PCIe bandwidth); back on the loop it unpins and lets
go; then, in a thread, the staging buffer is written to its file and fsync'd
(``kvbroker.persistence``) while the next cache is staged (two page-aligned staging
buffers, each the size of the largest cache, so the file is written with direct I/O). Clients keep allocating, attaching and writing meanwhile; a
cache that is PENDING or being moved is waited for first; one freed before its turn is
skipped. An OFFLOADED cache is captured from its tier's copy (``Offloader.read_copy``:
host memory or its disk file), not restored, so a checkpoint never moves caches; it is
restored at the next start like any other, into device memory.

**Consistency guarantee.** Each cache is captured as of its copy into the staging
buffer: a cache nobody writes during that copy (tens of milliseconds per hundred MiB on
the host device, measured on the shared dev box) is saved byte for byte; a cache a
client writes during it is saved with any mix of old and new bytes of that write.
Caches are captured one after the other, not at one instant, and a client's pin does not
hold a checkpoint back (pinned caches are captured like the others). The checkpoint's
own pin counts as a use for the eviction policy: caches are captured in ascending order
of last access, so the policy's order among them is kept.

**Restore** (before the daemon serves): the current generation, else the previous one
(``Store.candidates``); each cache is allocated again with its id, pool, model, dtype,
shape, retain flag and priority through the normal placement (the daemon generates
ids with a fresh per-run prefix, and the core never hands out an id that exists, so
restored ids cannot collide with new ones), and its file read into it while it is
hashed, as the allocation's backing step (the extent is filled, not zeroed; on the host
device a new segment is not prefaulted and ``write_from`` writes its pages through the
object's file, so they are neither zeroed nor mapped by the daemon: about half the CPU
of a restore into a prefaulted segment, see ``kvbroker.memory.host``). Any mismatch rejects the whole generation: its caches are released by force and
the previous one is tried (logged, counted). Restored caches are held by the broker's
``~restored`` holder for ``restore_grace_seconds``, so that background reclamation does
not take them before their clients re-attach; then the holder lets go: retained caches
stay as idle retained caches under the usual rules, caches that were not retained and
that no client re-attached are freed (as their holders' ends would have freed them).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import numpy as np

from kvbroker.core import AllocationRequest, Broker, BrokerError, CacheInfo, CacheState, SegmentInfo
from kvbroker.engine.devicework import DeviceWork
from kvbroker.persistence import CacheMeta, CorruptFile, CorruptGeneration, PersistenceError, Store
from kvbroker.persistence.cachefile import read_cache_file
from kvbroker.persistence.directio import aligned_buffer

log = logging.getLogger(__name__)

CHECKPOINT_HOLDER = "~checkpoint"
RESTORE_HOLDER = "~restored"
#: Caches restored at once: one's segment is created while another's file is read.
RESTORE_CONCURRENCY = 2


@dataclass(frozen=True)
class CheckpointResult:
    """A published generation: its number, the caches and bytes written, the caches
    skipped (freed or evicted before their turn), and how long it took."""

    generation: int
    caches: int
    nbytes: int
    skipped: int
    seconds: float


@dataclass(frozen=True)
class RestoreResult:
    """What the start restored: the generation (None: nothing to restore), its caches
    and bytes, the generations rejected (one message each) and caches not restored."""

    generation: int | None
    caches: int
    nbytes: int
    rejected: tuple[str, ...]
    not_restored: tuple[str, ...]
    seconds: float


class PersistenceObserver:
    """The metric hooks persistence calls (telemetry's recorder implements them)."""

    def checkpoint_finished(self, outcome: str, nbytes: int, seconds: float) -> None:
        pass

    def generation_rejected(self) -> None:
        pass

    def caches_restored(self, count: int) -> None:
        pass


#: ``Allocator.allocate``: (request, wait seconds, fill) -> the backed cache and its handle.
Allocate = Callable[[AllocationRequest, float, Callable[[CacheInfo], Awaitable[None]]], Awaitable[tuple[CacheInfo, object]]]


class Persistence:
    """Checkpoints and restores of the caches of ``pools``.

    Args:
        broker, device: the engine's core and device work.
        allocate: the engine's allocator (placement, backing, waiting).
        settle: the engine's "after a core mutation" step.
        until_settled: waits while a cache is PENDING or MOVING.
        store: the checkpoint directory.
        pools: names of the persistent pools.
        restore_grace_seconds: how long ``~restored`` holds restored caches.
    """

    def __init__(
        self, broker: Broker, device: DeviceWork, allocate: Allocate,
        settle: Callable[[Sequence[SegmentInfo], bool], None], until_settled: Callable[[str], Awaitable[None]],
        store: Store, pools: frozenset[str], *, restore_grace_seconds: float = 60.0,
        observer: PersistenceObserver | None = None,
        read_offloaded: Callable[[str, np.ndarray], Awaitable[bool]] | None = None,
    ) -> None:  # fmt: skip
        self._broker = broker
        self._device = device
        self._allocate = allocate
        self._settle = settle
        self._until_settled = until_settled
        self._read_offloaded = read_offloaded
        self.store = store
        self.pools = pools
        self._grace = restore_grace_seconds
        self.observer = observer or PersistenceObserver()
        self._lock = asyncio.Lock()
        self._tasks: set[asyncio.Task] = set()

    # -- checkpoints ----------------------------------------------------------------

    async def checkpoint(self, reason: str, *, deadline: float | None = None) -> CheckpointResult:
        """Write a new generation of every cache of the persistent pools, resident or
        offloaded (its bytes read from its tier), and publish it. One at a time (a second call waits for the first). ``deadline``
        (``time.monotonic``): past it, the checkpoint is abandoned between two caches.

        Raises ``PersistenceError`` (``BudgetExceeded``, ``DiskFull``): the new
        generation is removed and the previous one stays current."""
        async with self._lock:
            started = time.monotonic()
            try:
                result = await self._checkpoint(deadline)
            except BaseException as err:
                outcome = err.reason if isinstance(err, PersistenceError) else "error"
                self.observer.checkpoint_finished(outcome, 0, time.monotonic() - started)
                log.error("checkpoint (%s) failed, the previous generation stays current: %s", reason, err)
                raise
            self.observer.checkpoint_finished("ok", result.nbytes, result.seconds)
            log.info("checkpoint (%s): generation %d, %d caches, %d bytes in %.3f s (%d skipped)", reason,
                     result.generation, result.caches, result.nbytes, result.seconds, result.skipped)  # fmt: skip
            return result

    async def _checkpoint(self, deadline: float | None) -> CheckpointResult:
        started = time.monotonic()
        caches = [
            c for pool in sorted(self.pools) for c in self._broker.caches(pool=pool)
            if c.state is CacheState.RESIDENT or (c.state is CacheState.OFFLOADED and self._read_offloaded)
        ]
        caches.sort(key=lambda c: (c.last_access_at, c.cache_id))
        writer = await asyncio.to_thread(self.store.begin, sum(c.nbytes for c in caches), len(caches))
        # Two staging buffers, used in turn (one written while the next cache is staged),
        # sized for the largest cache: fresh ones per cache would fault in every page again.
        largest = max((c.nbytes for c in caches), default=0)
        buffers = [aligned_buffer(largest) for _ in range(2 if len(caches) > 1 else 1)]
        written = skipped = nbytes = free = 0
        writing: asyncio.Future[int] | None = None  # the previous cache's file, written meanwhile
        try:
            for info in caches:
                if deadline is not None and time.monotonic() > deadline:
                    raise PersistenceError(f"ran out of time after {written} of {len(caches)} caches")
                staged = await self._stage(info.cache_id, buffers[free])  # the one no write uses
                if writing is not None:
                    nbytes, written, writing = nbytes + await writing, written + 1, None
                if staged is None:
                    skipped += 1
                    continue
                writing = asyncio.ensure_future(asyncio.to_thread(writer.write, *staged))
                free = (free + 1) % len(buffers)
            if writing is not None:
                nbytes, written, writing = nbytes + await writing, written + 1, None
            generation = await asyncio.to_thread(writer.publish)
        except BaseException:
            if writing is not None:
                await asyncio.gather(writing, return_exceptions=True)  # never remove a file being written
            await asyncio.to_thread(writer.abandon)
            raise
        return CheckpointResult(generation, written, nbytes, skipped, time.monotonic() - started)

    async def _stage(self, cache_id: str, buffer: np.ndarray) -> tuple[CacheMeta, np.ndarray] | None:
        """The cache's metadata and a copy of its bytes in ``buffer``, or None when it is
        gone. Runs while the previous cache's file is written (from the other buffer)."""
        await self._until_settled(cache_id)
        broker = self._broker
        for _ in range(3):  # an offloaded cache restored meanwhile is staged as a resident one
            try:
                info = broker.get(cache_id)
            except BrokerError:
                return None
            if info.state is not CacheState.OFFLOADED or self._read_offloaded is None:
                break
            staging = buffer[: info.nbytes] if info.nbytes <= buffer.nbytes else aligned_buffer(info.nbytes)
            try:
                if await self._read_offloaded(cache_id, staging):
                    return CacheMeta.of(info), staging
            except CorruptFile as err:
                log.error("cache %s not in this checkpoint: its offloaded copy failed its checks: %s", cache_id, err)
                return None
            await self._until_settled(cache_id)
        try:
            info = broker.pin(cache_id, CHECKPOINT_HOLDER)
        except BrokerError:
            return None  # freed, evicted, offloaded or moving again since the list was taken
        try:
            extent = info.extents[0]
            # A cache made again under the same id since the list was taken may be larger.
            staging = buffer[: info.nbytes] if info.nbytes <= buffer.nbytes else aligned_buffer(info.nbytes)
            memory = self._device.memory(info.device_id)
            await asyncio.to_thread(memory.read_into, extent.segment_id, extent.offset, staging)
        finally:
            broker.release(cache_id, CHECKPOINT_HOLDER)
            self._settle((), True)
        return CacheMeta.of(info), staging

    def start_periodic(self, interval_seconds: float) -> None:
        """Checkpoint every ``interval_seconds`` (0: never) until ``stop``; a failed
        one is logged and counted, and the next runs at its time (no retry loop)."""
        if interval_seconds > 0:
            self._track(asyncio.get_running_loop().create_task(self._periodic(interval_seconds)))

    async def _periodic(self, interval_seconds: float) -> None:
        while True:
            await asyncio.sleep(interval_seconds)
            try:
                await self.checkpoint("periodic")
            except Exception:  # noqa: BLE001 - logged and counted by checkpoint()
                pass

    async def stop(self) -> None:
        """Cancel the periodic checkpoints and the restore grace timer."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _track(self, task: asyncio.Task) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- restore --------------------------------------------------------------------

    async def restore(self) -> RestoreResult:
        """Restore the newest generation that passes every check (see the module
        docstring). Call before serving."""
        started = time.monotonic()
        rejected: list[str] = []
        for number, digest in self.store.candidates():
            try:
                generation = await asyncio.to_thread(self.store.open, number, digest)
                restored, nbytes, missing = await self._restore(generation)
            except (CorruptGeneration, CorruptFile, OSError) as err:
                rejected.append(f"generation {number}: {err}")
                self.observer.generation_rejected()
                log.error("checkpoint generation %d is not loaded (falling back to the previous one): %s", number, err)
                continue
            self.observer.caches_restored(restored)
            seconds = time.monotonic() - started
            log.info("restored %d caches (%d bytes) of checkpoint generation %d in %.3f s; %d not restored",
                     restored, nbytes, number, seconds, len(missing))  # fmt: skip
            self._track(asyncio.get_running_loop().create_task(self._end_grace()))
            return RestoreResult(number, restored, nbytes, tuple(rejected), tuple(missing), seconds)
        return RestoreResult(None, 0, 0, tuple(rejected), (), time.monotonic() - started)

    async def _restore(self, generation) -> tuple[int, int, list[str]]:
        """Restore every entry, ``RESTORE_CONCURRENCY`` at a time (one cache's segment
        is created while another's file is read); on any failure, release every cache
        restored so far and raise."""
        restored: list[CacheInfo] = []
        missing: list[str] = []
        slots = asyncio.Semaphore(RESTORE_CONCURRENCY)

        async def one(entry) -> None:
            async with slots:
                await self._restore_one(generation, entry, restored, missing)

        outcomes = await asyncio.gather(*(one(e) for e in generation.entries), return_exceptions=True)
        failure = next((o for o in outcomes if isinstance(o, BaseException)), None)
        if failure is not None:
            for info in restored:
                self._broker.release(info.cache_id, RESTORE_HOLDER, force=True)
            self._settle((), True)
            raise failure
        return len(restored), sum(info.nbytes for info in restored), missing

    async def _restore_one(self, generation, entry, restored: list[CacheInfo], missing: list[str]) -> None:
        meta = entry.meta
        if meta.pool not in self.pools:
            missing.append(f"{meta.cache_id}: pool {meta.pool!r} is not a persistent pool now")
            log.error("cache %s of checkpoint generation %d not restored: pool %r is not a persistent pool now",
                      meta.cache_id, generation.number, meta.pool)  # fmt: skip
            return
        request = AllocationRequest(
            pool=meta.pool, nbytes=meta.nbytes, holder=RESTORE_HOLDER, cache_id=meta.cache_id,
            model_name=meta.model_name, priority=meta.priority, retain=meta.retain, dtype=meta.dtype, shape=meta.shape,
        )  # fmt: skip
        path = os.path.join(generation.path, entry.file)

        async def fill(placed: CacheInfo) -> None:
            extent = placed.extents[0]
            memory = self._device.memory(placed.device_id)

            def sink(offset: int, piece: np.ndarray) -> None:
                memory.write_from(extent.segment_id, extent.offset + offset, piece)

            found = await asyncio.to_thread(read_cache_file, path, entry.size, entry.digest, sink)
            if found != meta:
                raise CorruptFile(f"{entry.file} belongs to cache {found.cache_id!r}, not to {meta.cache_id!r}")

        try:
            info, _handle = await self._allocate(request, 0.0, fill)
        except BrokerError as err:
            missing.append(f"{meta.cache_id}: {err}")
            log.error("cache %s of checkpoint generation %d not restored: %s", meta.cache_id, generation.number, err)
            return
        restored.append(info)

    async def _end_grace(self) -> None:
        await asyncio.sleep(self._grace)
        freed = self._broker.drop_holder(RESTORE_HOLDER)
        self._settle((), True)
        log.info("restore grace over: restored caches are the usual idle retained caches now; "
                 "%d not re-attached and not retained were freed", len(freed))  # fmt: skip
