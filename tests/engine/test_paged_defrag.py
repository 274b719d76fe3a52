"""A paged pool's defragment in the engine, over real host segments: the bytes of every
layer's K and V of each moved block arrive at its new block; a sequence call made while
the copy runs waits for the commit (and then sees the new blocks); a failed copy evicts
the sequences it was moving and leaves the pool usable; a pinned sequence never moves; a
session that ends mid-copy frees its sequence and the commit skips it."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from kvbroker.core import PoolSpec
from kvbroker.engine.paged import PagedPools, PagedPoolSpec
from kvbroker.kvlayout import KvLayout
from kvbroker.memory.backend import CopyError

from .support import MiB, DoorMemory, host_engine, private_shm_dir, steps

LAYOUT = KvLayout(2, 2, 8, "float32", 4)  # 256 bytes a token per layer pair, 128 B per block half
NUM_BLOCKS = 16


@pytest.fixture
def setup():
    with private_shm_dir() as shm_dir:
        pools = [PoolSpec("kv", ("host",), block_bytes=4096, segment_bytes=MiB, gc_threshold=1.0)]
        engine = host_engine(shm_dir, pools=pools, wrap=DoorMemory)
        paged = PagedPools(engine, {"kv": PagedPoolSpec("kv", LAYOUT, NUM_BLOCKS, prefault=False)})
        yield engine, paged
        asyncio.run(engine.close())


def _half(block: int, layer: int, kv: int) -> int:
    layer_bytes = LAYOUT.layer_bytes(NUM_BLOCKS)
    half_block = layer_bytes // 2 // NUM_BLOCKS
    return layer * layer_bytes + kv * (layer_bytes // 2) + block * half_block, half_block


async def _split(engine, paged) -> tuple[object, object]:
    """``s`` in blocks 0-1 and 4-5 (``g`` was in between), each block half filled with a
    byte that says which token block, layer and half it is."""
    await paged.create_arena("kv")
    await paged.allocate("kv", "s", "h", prompt_tokens=8, max_tokens=0, tokens_wanted=8)
    await paged.allocate("kv", "g", "h", prompt_tokens=8, max_tokens=0, tokens_wanted=8)
    await paged.extend("kv", "s", "h", tokens_used=8, tokens_needed=16, tokens_wanted=16)
    await paged.free("kv", "g", "h")
    assert paged.arena("kv").get("s").runs == ((0, 2), (4, 2))
    info = paged._arena_infos["kv"]
    memory, extent = engine.memory(info.device_id), info.extents[0]
    for i, block in enumerate((0, 1, 4, 5)):
        for layer in range(2):
            for kv in (0, 1):
                offset, size = _half(block, layer, kv)
                memory.write_from(extent.segment_id, extent.offset + offset, np.full(size, 10 * i + 2 * layer + kv + 1, np.uint8))
    return memory, extent


def _token_blocks(memory, extent, table: list[int]) -> list[list[int]]:
    seen = []
    for block in table:
        values = []
        for layer in range(2):
            for kv in (0, 1):
                offset, size = _half(block, layer, kv)
                out = np.empty(size, np.uint8)
                memory.read_into(extent.segment_id, extent.offset + offset, out)
                assert len(set(out.tolist())) == 1
                values.append(int(out[0]))
        seen.append(values)
    return seen


def test_the_copy_moves_every_layer_and_half_and_sequence_calls_wait_for_the_commit(setup):
    engine, paged = setup

    async def body():
        memory, extent = await _split(engine, paged)
        want = [[10 * i + 2 * layer + kv + 1 for layer in range(2) for kv in (0, 1)] for i in range(4)]
        assert _token_blocks(memory, extent, [0, 1, 4, 5]) == want
        door = memory.doors["copy"]
        door.close()
        defrag = asyncio.create_task(paged.defragment("kv", dry_run=False))
        await door.arrival()
        extend = asyncio.create_task(paged.extend("kv", "s", "h", tokens_used=16, tokens_needed=20, tokens_wanted=20))
        new = asyncio.create_task(paged.allocate("kv", "n", "h2", prompt_tokens=4, max_tokens=0, tokens_wanted=4))
        await steps(50)
        assert not extend.done() and not new.done(), "a sequence call ran while the copy did"
        door.open()
        result = await defrag
        view = await extend
        assert (await new).runs == ((5, 1),)  # placed after the commit, in the free blocks it left
        assert result.paged and result.caches_moved == 1 and result.moves_total == 2
        assert [(s, f, t) for s, f, t in result.block_moves] == [("s", 4, 2), ("s", 5, 3)]
        assert view.runs == ((0, 5),), "the extension saw the new blocks and grew them in place"
        assert view.epoch == 1
        assert _token_blocks(memory, extent, [0, 1, 2, 3]) == want
        paged.arena("kv").check()

    asyncio.run(body())


def test_a_failed_copy_evicts_the_moving_sequences_and_a_pinned_one_stays(setup):
    engine, paged = setup

    async def body():
        memory, _ = await _split(engine, paged)
        await paged.allocate("kv", "p", "h", prompt_tokens=4, max_tokens=0, tokens_wanted=4, pinned=True)
        pinned_runs = paged.arena("kv").get("p").runs
        memory.copy_fails_after = 1
        with pytest.raises(CopyError):
            await paged.defragment("kv", dry_run=False)
        arena = paged.arena("kv")
        assert "s" not in arena and arena.get("p").runs == pinned_runs
        arena.check()
        memory.copy_fails_after = None
        await paged.allocate("kv", "again", "h", prompt_tokens=4, max_tokens=0, tokens_wanted=4)  # not stuck

    asyncio.run(body())


def test_a_session_that_ends_during_the_copy_frees_its_sequence_and_the_commit_skips_it(setup):
    engine, paged = setup

    async def body():
        memory, _ = await _split(engine, paged)
        door = memory.doors["copy"]
        door.close()
        defrag = asyncio.create_task(paged.defragment("kv", dry_run=False))
        await door.arrival()
        paged._session_ended("h")  # the engine's session-end hook: synchronous, it cannot wait
        door.open()
        result = await defrag
        arena = paged.arena("kv")
        assert result.caches_moved == 0 and len(arena) == 0
        assert arena.free_runs() == [(0, NUM_BLOCKS)]
        arena.check()

    asyncio.run(body())
