"""The offload tier over real host segments: caches offloaded instead of evicted, restored
byte for byte on attach, evicted only when the tier is full, and a disk-tier file that
can never be restored into another cache."""

from __future__ import annotations

import asyncio
import os
import tempfile

import pytest

from kvbroker.core import (
    AllocationRequest, Broker, CacheState, DeviceSpec, FailedPrecondition, PoolSpec, ResourceExhausted,
)
from kvbroker.core.audit import audit
from kvbroker.engine import Engine, EngineSettings
from kvbroker.memory.host import HostMemory

from .support import DoorMemory, MiB, private_shm_dir, steps
from tests.support.segments import read_segment, write_segment


def _engine(shm_dir: str, tiers: tuple[str, ...], *, host: int = 64 * MiB, disk: int = 0, disk_dir: str = "",
            wrap=lambda memory: memory) -> Engine:
    pools = [PoolSpec("p", ("host",), block_bytes=MiB, segment_bytes=4 * MiB, gc_threshold=1.0, offload=tiers)]
    broker = Broker([DeviceSpec("host", 4 * MiB, 4096)], pools, id_prefix="t",
                    offload_budgets={"host": host, "disk": disk})  # fmt: skip
    engine = Engine(broker, {"host": wrap(HostMemory("t", shm_dir=shm_dir))}, "t", EngineSettings(lease_seconds=60))
    if disk_dir:
        engine.offload.use_disk(disk_dir)
    return engine


def _fill(engine: Engine, info, seed: int) -> bytes:
    data = bytes((seed + i * 7) % 251 for i in range(info.nbytes))
    extent = info.extents[0]
    write_segment(engine.memory("host"), extent.segment_id, extent.offset, data)
    return data


def _read(engine: Engine, info) -> bytes:
    extent = info.extents[0]
    return read_segment(engine.memory("host"), extent.segment_id, extent.offset, info.nbytes)


async def _settled(engine: Engine) -> None:
    await engine.idle()
    audit(engine.broker)
    tiers = engine.broker.offload  # host copies and the spare buffers kept for reuse fit the budget
    assert tiers.used["host"] + engine.offload._spare_bytes <= tiers.budgets["host"]


@pytest.mark.parametrize("tiers", [("host",), ("disk",), ("host", "disk")])
def test_a_cache_pushed_out_is_offloaded_and_restored_byte_for_byte(tiers):
    async def body(shm_dir: str, disk_dir: str):
        # With both tiers, a host tier of 1 MiB is too small: the cache overflows to disk.
        engine = _engine(shm_dir, tiers, host=MiB if len(tiers) == 2 else 64 * MiB, disk=64 * MiB, disk_dir=disk_dir)
        tier = "host" if tiers == ("host",) else "disk"
        a, _ = await engine.allocate(AllocationRequest("p", 2 * MiB - 5, holder="A"))
        want = _fill(engine, a, 1)
        b, _ = await engine.allocate(AllocationRequest("p", 3 * MiB, holder="B"))
        await _settled(engine)
        offloaded = engine.cache(a.cache_id)
        assert offloaded.state is CacheState.OFFLOADED and offloaded.extents == ()
        assert offloaded.epoch > a.epoch, "its holders are told to re-map"
        assert engine.broker.offload.used[tier] == a.nbytes
        want_b = _fill(engine, b, 2)
        restored, handle = await engine.attach(a.cache_id, "A")  # B goes out to make room
        await _settled(engine)
        assert restored.state is CacheState.RESIDENT and _read(engine, restored) == want
        assert handle.segment.segment_id == restored.extents[0].segment_id
        assert engine.cache(b.cache_id).state is CacheState.OFFLOADED
        back, _ = await engine.pin(b.cache_id, "B")  # and back again, A out
        await _settled(engine)
        assert _read(engine, back) == want_b
        assert engine.cache(a.cache_id).state is CacheState.OFFLOADED
        assert await engine.release(a.cache_id, "A") is True  # an offloaded cache is freed by its release
        await _settled(engine)
        assert engine.broker.offload.used == {"host": 0, "disk": 0}
        if disk_dir:
            assert os.listdir(disk_dir) == [], "a freed cache's file is deleted"
        await engine.close()

    with private_shm_dir() as shm_dir, tempfile.TemporaryDirectory() as tmp:
        asyncio.run(body(shm_dir, os.path.join(tmp, "offload") if "disk" in tiers else ""))


def test_a_full_tier_evicts_and_a_pinned_cache_is_never_offloaded():
    async def body(shm_dir: str):
        engine = _engine(shm_dir, ("host",), host=2 * MiB)
        a, _ = await engine.allocate(AllocationRequest("p", 2 * MiB, holder="A"))
        b, _ = await engine.allocate(AllocationRequest("p", 2 * MiB, holder="B", pinned=True))
        c, _ = await engine.allocate(AllocationRequest("p", 2 * MiB, holder="C"))  # A goes to the tier
        await _settled(engine)
        assert engine.cache(a.cache_id).state is CacheState.OFFLOADED
        await engine.allocate(AllocationRequest("p", 2 * MiB, holder="D"))  # the tier is full: C is evicted
        await _settled(engine)
        assert engine.cache(c.cache_id).state is CacheState.EVICTED
        assert engine.cache(b.cache_id).state is CacheState.RESIDENT, "pinned: never offloaded"
        with pytest.raises(ResourceExhausted):
            await engine.allocate(AllocationRequest("p", 4 * MiB, holder="E"))
        assert engine.cache(b.cache_id).state is CacheState.RESIDENT
        assert engine.broker.offload.used["host"] == 2 * MiB
        await engine.close()

    with private_shm_dir() as shm_dir:
        asyncio.run(body(shm_dir))


@pytest.mark.parametrize("swap", ["files", "records"])
def test_a_disk_file_swapped_for_another_caches_is_never_restored(swap, caplog):
    """Files swapped on disk fail their digests; with the daemon's records swapped too
    (size and digest then match the file), the cache id bound in the file refuses it."""

    async def body(shm_dir: str, disk_dir: str):
        engine = _engine(shm_dir, ("disk",), disk=64 * MiB, disk_dir=disk_dir)
        a, _ = await engine.allocate(AllocationRequest("p", 2 * MiB, holder="A"))
        _fill(engine, a, 3)
        b, _ = await engine.allocate(AllocationRequest("p", 2 * MiB, holder="B"))
        _fill(engine, b, 4)
        await engine.allocate(AllocationRequest("p", 4 * MiB, holder="C"))  # A and B go to disk
        await _settled(engine)
        assert len(os.listdir(disk_dir)) == 2
        if swap == "files":
            x, y = (engine.offload._disk[c.cache_id].path for c in (a, b))
            os.rename(x, x + ".tmp")
            os.rename(y, x)
            os.rename(x + ".tmp", y)
            why = "digest"
        else:
            copies = engine.offload._disk
            copies[a.cache_id], copies[b.cache_id] = copies[b.cache_id], copies[a.cache_id]
            why = f"belongs to cache {b.cache_id!r}"
        with pytest.raises(FailedPrecondition, match="evicted"):
            await engine.attach(a.cache_id, "A")
        await _settled(engine)
        assert engine.cache(a.cache_id).state is CacheState.EVICTED, "its copy is unusable: it is evicted"
        assert engine.broker.offload.used["disk"] == b.nbytes + 4 * MiB  # B, and C that made room for A
        assert why in caplog.text
        with pytest.raises(FailedPrecondition, match="evicted"):  # B's file is A's bytes: refused too
            await engine.attach(b.cache_id, "B")
        await engine.close()

    with private_shm_dir() as shm_dir, tempfile.TemporaryDirectory() as tmp:
        asyncio.run(body(shm_dir, os.path.join(tmp, "offload")))


@pytest.mark.parametrize("release", [False, True])
def test_while_the_copy_out_runs_the_extent_stays_and_an_attach_waits(release):
    """The copy-out holds the extent: the allocation that pushed the cache out and an
    attach of it both wait until it ends; released meanwhile, the cache is freed then."""

    async def body(shm_dir: str):
        engine = _engine(shm_dir, ("host",), wrap=DoorMemory)
        door = engine.memory("host").doors["read"]
        a, _ = await engine.allocate(AllocationRequest("p", 2 * MiB, holder="A"))
        want = _fill(engine, a, 7)
        door.close()
        pushing = asyncio.ensure_future(engine.allocate(AllocationRequest("p", 3 * MiB, holder="B")))
        await door.arrival()
        info = engine.cache(a.cache_id)
        assert info.state is CacheState.RESIDENT and info.extents == a.extents, "its extent is kept while copied"
        audit(engine.broker)
        if release:
            assert await engine.release(a.cache_id, "A") is False  # freed when the copy ends
            attaching = None
        else:
            attaching = asyncio.ensure_future(engine.attach(a.cache_id, "A"))
        await steps(50)  # let every ready task run: a check that nothing happened meanwhile
        assert not pushing.done() and (attaching is None or not attaching.done())
        door.open()
        b, _ = await pushing
        if release:
            await _settled(engine)
            assert a.cache_id not in {c.cache_id for c in engine.broker.caches()}
            assert engine.broker.offload.used["host"] == 0
        else:
            restored, _ = await attaching  # after the copy-out: restored, B going out for it
            await _settled(engine)
            assert _read(engine, restored) == want
            assert engine.cache(b.cache_id).state is CacheState.OFFLOADED
        await engine.close()

    with private_shm_dir() as shm_dir:
        asyncio.run(body(shm_dir))


def test_an_attach_that_finds_no_room_for_a_restore_fails_or_waits_like_an_allocation():
    """A pinned cache fills the device, so the offloaded cache has no room: an attach
    without a wait fails at once, one with a short wait runs out, and two that wait get
    it once the room comes back (the first restores it, the second attaches what the
    first restored); it stays OFFLOADED, bytes intact, until then."""

    async def body(shm_dir: str):
        from kvbroker.core.errors import DeadlineExceeded

        engine = _engine(shm_dir, ("host",))
        a, _ = await engine.allocate(AllocationRequest("p", 2 * MiB, holder="A"))
        want = _fill(engine, a, 5)
        b, _ = await engine.allocate(AllocationRequest("p", 3 * MiB, holder="B", pinned=True))  # A goes out
        await _settled(engine)
        assert engine.cache(a.cache_id).state is CacheState.OFFLOADED
        with pytest.raises(ResourceExhausted):
            await engine.attach(a.cache_id, "A")
        with pytest.raises(DeadlineExceeded, match="wait_timeout_ms=50"):
            await engine.attach(a.cache_id, "A", wait_timeout_s=0.05)
        assert engine.cache(a.cache_id).state is CacheState.OFFLOADED
        first = asyncio.ensure_future(engine.attach(a.cache_id, "A", wait_timeout_s=60))
        second = asyncio.ensure_future(engine.attach(a.cache_id, "C", wait_timeout_s=60))
        await steps(50)  # let every ready task run: both are waiting for room
        assert not first.done() and not second.done()
        assert engine.cache(a.cache_id).state is CacheState.OFFLOADED
        assert await engine.release(b.cache_id, "B") is True
        (one, _), (two, _) = await asyncio.wait_for(asyncio.gather(first, second), 30)
        await _settled(engine)
        assert one.cache_id == two.cache_id == a.cache_id
        restored = engine.cache(a.cache_id)
        assert restored.state is CacheState.RESIDENT and set(restored.holders) >= {"A", "C"}
        assert _read(engine, restored) == want
        await engine.close()

    with private_shm_dir() as shm_dir:
        asyncio.run(body(shm_dir))


@pytest.mark.parametrize("tier", ["host", "disk"])
def test_a_checkpoint_keeps_an_offloaded_cache_and_the_next_start_restores_it(tier):
    """A persistent pool's cache that pressure offloaded is a cache of the pool all the
    same: a checkpoint takes its bytes from the tier (without restoring it), and a new
    engine over the same store restores it, byte for byte, into device memory."""
    from kvbroker.persistence import Store

    async def body(shm_dir: str, disk_dir: str, store_dir: str):
        engine = _engine(shm_dir, (tier,), disk=64 * MiB, disk_dir=disk_dir if tier == "disk" else "")
        engine.persist(Store(store_dir), frozenset({"p"}), restore_grace_seconds=60)
        a, _ = await engine.allocate(AllocationRequest("p", 2 * MiB - 5, holder="A", retain=True))
        want_a = _fill(engine, a, 3)
        b, _ = await engine.allocate(AllocationRequest("p", 3 * MiB, holder="B", retain=True))  # A goes out
        want_b = _fill(engine, b, 4)
        await _settled(engine)
        assert engine.cache(a.cache_id).state is CacheState.OFFLOADED
        result = await engine.checkpoints.checkpoint("test")
        assert result.caches == 2 and result.skipped == 0
        assert engine.cache(a.cache_id).state is CacheState.OFFLOADED, "a checkpoint does not restore it"
        await engine.close()

        again = _engine(shm_dir, (tier,), disk=64 * MiB, disk_dir=disk_dir if tier == "disk" else "")
        restored = await again.persist(Store(store_dir), frozenset({"p"}), restore_grace_seconds=60).restore()
        assert restored.caches == 2 and restored.not_restored == ()
        for info, want in ((a, want_a), (b, want_b)):
            back = again.cache(info.cache_id)
            if back.state is CacheState.OFFLOADED:  # the device holds one of the two at a time
                back, _ = await again.attach(info.cache_id, "A")
                await _settled(again)
            assert back.state is CacheState.RESIDENT and _read(again, back) == want
        await again.close()

    with private_shm_dir() as shm_dir, tempfile.TemporaryDirectory() as tmp:
        asyncio.run(body(shm_dir, os.path.join(tmp, "offload"), os.path.join(tmp, "checkpoints")))
