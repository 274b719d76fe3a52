"""The offload tier's bytes: copy-outs and restores, off the event loop.

The core decides (``kvbroker.core.offload``): which cache goes to which tier and when,
and keeps every byte counted. This module moves the bytes, in threads between the
core's synchronous sections:

- **copy-out** (a ``COPY_OUT`` job, queued by the core when the pressure ladder or
  background reclamation offloads a cache): the cache's bytes are read from its extent
  (``ByteAccess.read_into``), kept in the tier, then ``Broker.offload.finish`` frees the
  extent (or ``fail`` evicts the cache). The extent stays occupied until then, so the
  thread reads bytes nobody else can be given.
- **restore** (an attach or pin of an OFFLOADED cache, ``restore``): placed by the core
  like an allocation (``Allocator.restore``: the same ladder, compactions and waits for
  creations and offloads in flight), its bytes copied back in from the tier, then made
  RESIDENT; its holders are told MOVED and re-map on next use. A failed copy-in leaves
  it OFFLOADED (the error goes to the caller, as an allocation's would); a copy that
  fails its checks (``CorruptFile``) can never be restored and the cache is evicted.

Tiers: ``host`` keeps each copy in a private numpy buffer of the daemon (anonymous
memory, its total bounded by ``[persistence] host_max_bytes`` through the core's
accounting; buffers of copies that went are reused for copies of the same size while
spare and live buffers together stay within that budget); ``disk`` writes one ``kvbroker.persistence.cachefile`` file per copy under
``<persistence.dir>/offload`` (its total bounded by ``disk_max_bytes``), its cache id in
the file's metadata and its size and digest (``kvbroker.persistence.digests``) kept here: a restore reads it back
through ``read_cache_file`` (size, header, digest) and refuses a file bound to another
cache, so a file can never be restored into another cache.

Cost: a copy-out is one device-to-host copy (plus one file write and fsync for disk); a
restore one placement plus one host-to-device copy (plus one file read and hash).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import shutil
import time
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np

from kvbroker.core import AllocationRequest, Broker, CacheInfo, CacheState, SegmentInfo
from kvbroker.core.errors import FailedPrecondition
from kvbroker.core.offload import COPY_OUT, DISCARD, OffloadJob
from kvbroker.engine.compaction import Compactions
from kvbroker.engine.devicework import DeviceWork
from kvbroker.engine.ports import Observer
from kvbroker.persistence.cachefile import CacheMeta, CorruptFile, read_cache_file, write_cache_file

log = logging.getLogger(__name__)

Settle = Callable[[Sequence[SegmentInfo], bool], None]


class DiskCopy(NamedTuple):
    """One disk-tier file, and what it must match on restore."""

    path: str
    size: int
    digest: str


class Offloader:
    """Copy-outs in flight, the tiers' copies, and restores.

    Args:
        broker, device, compactions, observer: the engine's parts.
        settle: the engine's "after a core mutation" step.
        restore_place: ``Allocator.restore`` (placement, waiting and backing of a restore).
    """

    def __init__(self, broker: Broker, device: DeviceWork, compactions: Compactions, observer: Observer,
                 settle: Settle, restore_place: Callable) -> None:  # fmt: skip
        self._broker = broker
        self._device = device
        self._compactions = compactions
        self._observer = observer
        self._settle = settle
        self._restore_place = restore_place
        self._host: dict[str, np.ndarray] = {}
        #: Buffers of host copies that went (restored or freed), kept for the next copy of
        #: the same size while they and the live copies fit ``host_max_bytes``: a fresh
        #: buffer's pages fault in on first touch, which costs more than the copy itself.
        self._spare: dict[int, list[np.ndarray]] = {}
        self._spare_bytes = 0
        self._disk: dict[str, DiskCopy] = {}
        #: Caches whose host copy a checkpoint is reading: a discard drops such a buffer
        #: instead of handing it to the next copy-out.
        self._lent: set[str] = set()
        self._disk_dir = ""
        self._serial = itertools.count(1)
        #: cache id -> set when its copy-out ends; pool -> the events of its copy-outs.
        self._inflight: dict[str, asyncio.Event] = {}
        self._by_pool: dict[str, set[asyncio.Event]] = {}

    def use_disk(self, directory: str) -> None:
        """Keep disk-tier files in ``directory``, emptied now (nothing offloaded by an
        earlier run has a record any more)."""
        shutil.rmtree(directory, ignore_errors=True)
        os.makedirs(directory, mode=0o700, exist_ok=True)
        self._disk_dir = directory

    def pending(self, cache_id: str) -> asyncio.Event | None:
        """Set when ``cache_id``'s copy-out ends (None: none in flight)."""
        return self._inflight.get(cache_id) if self._inflight else None

    def in_flight(self, pool: str) -> asyncio.Event | None:
        """An event set when one of ``pool``'s copy-outs ends (None: none in flight): an
        allocation the ladder answered with offloads retries then."""
        events = self._by_pool.get(pool)
        return next(iter(events)) if events else None

    # -- jobs from the core ---------------------------------------------------------

    def dispatch(self, jobs: list[OffloadJob]) -> None:
        """Start the copy-outs and drop the discarded copies (called after every core
        mutation, on the loop)."""
        for job in jobs:
            if job.kind == COPY_OUT:
                info = self._broker.get(job.cache_id)
                done = self._inflight[job.cache_id] = asyncio.Event()
                self._by_pool.setdefault(job.pool, set()).add(done)
                task = asyncio.get_running_loop().create_task(self._copy_out(job, info, done))
                self._device.track(task)
            elif job.kind == DISCARD:
                self._discard(job.cache_id, job.tier)

    def _discard(self, cache_id: str, tier: str) -> None:
        if tier == "host":
            data = self._host.pop(cache_id, None)
            tiers = self._broker.offload
            if data is not None and cache_id not in self._lent and \
                    tiers.used["host"] + self._spare_bytes + data.nbytes <= tiers.budgets["host"]:  # fmt: skip
                self._spare.setdefault(data.nbytes, []).append(data)
                self._spare_bytes += data.nbytes
            return
        copy = self._disk.pop(cache_id, None)
        if copy is not None:
            self._device.track(asyncio.get_running_loop().create_task(asyncio.to_thread(_unlink, copy.path)))

    def _buffer(self, nbytes: int) -> np.ndarray:
        """A host-tier buffer of ``nbytes``: a spare one of that size, else a new one."""
        spare = self._spare.get(nbytes)
        if spare:
            self._spare_bytes -= nbytes
            data = spare.pop()
            if not spare:
                del self._spare[nbytes]
            return data
        tiers = self._broker.offload  # this copy is counted in ``used`` already
        while self._spare and tiers.used["host"] + self._spare_bytes > tiers.budgets["host"]:
            size, buffers = next(iter(self._spare.items()))
            buffers.pop()
            self._spare_bytes -= size
            if not buffers:
                del self._spare[size]
        return np.empty(nbytes, np.uint8)

    async def _copy_out(self, job: OffloadJob, info: CacheInfo, done: asyncio.Event) -> None:
        started = time.perf_counter()
        error: BaseException | None = None
        try:
            data = self._buffer(job.nbytes) if job.tier == "host" else np.empty(job.nbytes, np.uint8)
            memory = self._device.memory(job.device_id)
            await asyncio.to_thread(memory.read_into, job.extent.segment_id, job.extent.offset, data)
            if job.tier == "host":
                self._host[job.cache_id] = data
            else:
                meta = CacheMeta.of(info)
                path = os.path.join(self._disk_dir, f"{job.cache_id.encode().hex()}-{next(self._serial)}.safetensors")
                try:
                    size, digest = await asyncio.to_thread(write_cache_file, path, meta, data)
                except BaseException:
                    await asyncio.to_thread(_unlink, path)
                    raise
                self._disk[job.cache_id] = DiskCopy(path, size, digest)
        except Exception as err:
            error = err
        try:
            await self._compactions.quiet(job.pool)  # the core frees extents of unfrozen arenas only
            if error is None:
                kept = self._broker.offload.finish(job.cache_id)
                self._observer.offload_finished(job.pool, job.tier, "ok" if kept else "freed", job.nbytes,
                                                time.perf_counter() - started)  # fmt: skip
            else:
                log.error("offloading cache %s to the %s tier failed (it is evicted): %s", job.cache_id, job.tier, error)
                self._discard(job.cache_id, job.tier)
                self._broker.offload.fail(job.cache_id, str(error))
                self._observer.offload_finished(job.pool, job.tier, "failed", job.nbytes, time.perf_counter() - started)
        finally:
            del self._inflight[job.cache_id]
            events = self._by_pool[job.pool]
            events.discard(done)
            if not events:
                del self._by_pool[job.pool]
            done.set()
            self._settle((), True)

    # -- checkpoints of offloaded caches -------------------------------------------

    async def read_copy(self, cache_id: str, out: np.ndarray) -> bool:
        """Copy an OFFLOADED cache's bytes from its tier into ``out`` (of its size): a
        checkpoint of it. False when no copy of it is here (restored or freed since: the
        caller looks again). In a thread; a host copy is lent meanwhile (``_lent``), and a
        disk file restored or freed meanwhile stays readable through the open descriptor
        or fails the read, which answers False.

        Raises ``CorruptFile`` when the disk copy fails its checks."""
        data = self._host.get(cache_id)
        if data is not None:
            self._lent.add(cache_id)
            try:
                await asyncio.to_thread(np.copyto, out, data)
            finally:
                self._lent.discard(cache_id)
            return True
        copy = self._disk.get(cache_id)
        if copy is None:
            return False
        try:
            found = await asyncio.to_thread(read_cache_file, copy.path, copy.size, copy.digest, out)
        except FileNotFoundError:
            return False
        if found.cache_id != cache_id:
            raise CorruptFile(f"{os.path.basename(copy.path)} belongs to cache {found.cache_id!r}, not to {cache_id!r}")
        return True

    # -- restore --------------------------------------------------------------------

    async def restore_if_offloaded(self, cache_id: str, holder: str, wait_timeout_s: float = 0.0) -> bool:
        """Restore ``cache_id`` for ``holder`` when it is OFFLOADED (else nothing), waiting
        up to ``wait_timeout_s`` for room. Returns True when, meanwhile, the cache stopped
        being OFFLOADED otherwise (another holder's restore): the caller settles again.
        Raises as an allocation does (``ResourceExhausted``, ``DeadlineExceeded``...),
        and ``FailedPrecondition`` when its copy failed its checks (the cache is evicted)."""
        info = self._broker.get(cache_id)
        if info.state is not CacheState.OFFLOADED:
            return False
        tier = self._broker.offload.tier_of(cache_id)
        started = time.perf_counter()
        request = AllocationRequest(pool=info.pool, nbytes=info.nbytes, holder=holder)
        try:
            await self._restore_place(cache_id, request, lambda placed: self._fill(placed, tier), wait_timeout_s)
        except FailedPrecondition:
            if self._broker.get(cache_id).state is not CacheState.OFFLOADED:  # restored by another holder
                return True
            raise
        except CorruptFile as err:
            log.error("cache %s: its %s-tier copy failed its checks (it is evicted): %s", cache_id, tier, err)
            self._broker.offload.lose(cache_id, f"its offloaded copy is corrupt: {err}")
            self._settle((), False)
            self._observer.restore_finished(info.pool, tier, "corrupt", time.perf_counter() - started)
            raise FailedPrecondition(f"cache {cache_id!r} was evicted: its offloaded copy failed its checks") from None
        except BaseException:
            self._observer.restore_finished(info.pool, tier, "failed", time.perf_counter() - started)
            raise
        self._observer.restore_finished(info.pool, tier, "ok", time.perf_counter() - started)
        return False

    async def _fill(self, placed: CacheInfo, tier: str) -> None:
        """Copy the tier's bytes into ``placed``'s new extent, zero its tail (the block
        rounding: bytes an earlier cache may have left there). In threads."""
        extent = placed.extents[0]
        memory = self._device.memory(placed.device_id)
        tail = extent.nbytes - placed.nbytes
        if tail:
            await asyncio.to_thread(memory.zero, extent.segment_id, extent.offset + placed.nbytes, tail)
        if tier == "host":
            data = self._host[placed.cache_id]
            await asyncio.to_thread(memory.write_from, extent.segment_id, extent.offset, data)
            return
        copy = self._disk[placed.cache_id]

        def sink(offset: int, chunk: np.ndarray) -> None:
            memory.write_from(extent.segment_id, extent.offset + offset, chunk)

        found = await asyncio.to_thread(read_cache_file, copy.path, copy.size, copy.digest, sink)
        if found.cache_id != placed.cache_id or found.nbytes != placed.nbytes:
            raise CorruptFile(f"{os.path.basename(copy.path)} belongs to cache {found.cache_id!r}, "
                              f"not to {placed.cache_id!r}")  # fmt: skip


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
