"""Defragment through the RPC: every unpinned cache keeps its bytes, read through a fresh
mapping in a fresh process, and the figures are right."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from kvbroker_client import BrokerClient

from tests.support.daemon import ROOT

MiB = 1 << 20

READER = textwrap.dedent(
    """
    import json, sys, torch
    from kvbroker_client import BrokerClient
    sums = {}
    with BrokerClient(sys.argv[1]) as client:
        for cache_id in sys.argv[2:]:
            cache = client.attach(cache_id)
            t = cache.tensor()
            sums[cache_id] = [int(t.to(torch.int64).sum()), int(t[0]), int(t[-1]), cache.handle.byte_offset]
            cache.release()
    print(json.dumps(sums))
    """
)


def read_in_fresh_process(daemon, cache_ids):
    done = subprocess.run(
        [sys.executable, "-c", READER, daemon.target, *cache_ids],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def pool_usage(client: BrokerClient, pool: str):
    """The pool's usage figures (fragmentation, free extents, segments, counts)."""
    (usage,) = [p.usage for p in client.stats().pools if p.pool == pool]
    return usage


def test_defragment_moves_unpinned_caches_and_keeps_their_bytes(daemon):
    with BrokerClient(daemon.target) as client:
        client.defragment()  # start from a packed layout
        caches = []
        for i in range(12):
            cache = client.allocate("default", size_bytes=2 * MiB, retain=True, cache_id=f"defrag-{i}")
            t = cache.tensor()
            t.copy_(torch.randint(0, 256, (t.numel(),), dtype=torch.uint8, generator=torch.Generator().manual_seed(i)))
            caches.append(cache)
        pinned = caches[7]
        pinned.pin()
        for cache in caches[0:7:2]:
            cache.release(force=True)
        kept = [c for c in caches if not c.released]
        expected = {c.cache_id: [int(c.tensor().to(torch.int64).sum()), int(c.tensor()[0]), int(c.tensor()[-1])] for c in kept}
        offsets = {c.cache_id: c.handle.byte_offset for c in kept}

        pool_before = pool_usage(client, "default")
        dry = client.defragment(pool="default", dry_run=True)
        assert dry.dry_run and dry.caches_moved > 0 and dry.fragmentation_before > 0
        assert pool_usage(client, "default") == pool_before, "a dry run moves nothing"

        result = client.defragment(pool="default")
        assert result.caches_moved == dry.caches_moved
        assert result.bytes_moved == result.caches_moved * 2 * MiB
        assert result.fragmentation_before > result.fragmentation_after
        assert result.fragmentation_after == 0.0
        assert result.duration_seconds > 0

        after = read_in_fresh_process(daemon, list(expected))
        for cache_id, sums in expected.items():
            assert after[cache_id][:3] == sums, cache_id
        moved = [cid for cid in expected if after[cid][3] != offsets[cid]]
        assert len(moved) == result.caches_moved
        assert pinned.cache_id not in moved
        # The dry run named each of them, from where to where they went (issue 10.5).
        assert dry.moves_total == len(dry.moves) == len(moved)
        assert {m.cache_id: (m.from_offset, m.to_offset, m.nbytes, m.pool) for m in dry.moves} == {
            cid: (offsets[cid], after[cid][3], 2 * MiB, "default") for cid in moved
        }
        assert result.fragmentation_within_segments_after == 0.0
        assert client.stats().pools[0].usage.fragmentation_ratio == 0.0

        pinned.unpin()
        for cache in kept:
            cache.release(force=True)


def test_defragment_with_target_bytes_opens_one_extent_moving_the_fewest_bytes(daemon):
    """Pool "small" (one 16 MiB segment) full of 2 MiB caches, then three holes at 2, 6
    and 12 MiB: to open 4 MiB one cache moves (the lowest window: the cache at 0, into
    the hole at 6 MiB); the full pack would move four. The bytes stay, the request fits."""
    with BrokerClient(daemon.target) as client:
        caches = [client.allocate("small", size_bytes=2 * MiB, cache_id=f"target-{i}") for i in range(8)]
        for i, cache in enumerate(caches):
            t = cache.tensor()
            t.copy_(torch.randint(0, 256, (t.numel(),), dtype=torch.uint8, generator=torch.Generator().manual_seed(100 + i)))
        assert [c.handle.byte_offset for c in caches] == [i * 2 * MiB for i in range(8)]
        for i in (1, 3, 6):
            caches[i].release()
        kept = [c for c in caches if not c.released]
        expected = {c.cache_id: [int(c.tensor().to(torch.int64).sum()), int(c.tensor()[0]), int(c.tensor()[-1])] for c in kept}
        usage = pool_usage(client, "small")
        assert usage.largest_free_extent_bytes == 2 * MiB
        assert usage.fragmentation_within_segments_ratio == pytest.approx(usage.fragmentation_ratio) == pytest.approx(2 / 3)
        assert usage.fragmentation_across_segments_ratio == 0.0

        full = client.defragment(pool="small", dry_run=True)
        dry = client.defragment(pool="small", dry_run=True, target_bytes=4 * MiB)
        assert (dry.caches_moved, dry.bytes_moved) == (1, 2 * MiB) and full.bytes_moved == 8 * MiB
        ((move),) = dry.moves
        assert (move.cache_id, move.from_offset, move.to_offset) == ("target-0", 0, 6 * MiB)
        assert dry.largest_free_extent_after_bytes == 4 * MiB

        result = client.defragment(pool="small", target_bytes=4 * MiB)
        assert (result.caches_moved, result.bytes_moved, result.largest_free_extent_after_bytes) == (1, 2 * MiB, 4 * MiB)
        after = read_in_fresh_process(daemon, list(expected))
        for cache_id, sums in expected.items():
            assert after[cache_id][:3] == sums, cache_id
        assert after["target-0"][3] == 6 * MiB
        assert pool_usage(client, "small").largest_free_extent_bytes == 4 * MiB
        again = client.defragment(pool="small", target_bytes=4 * MiB)
        assert again.caches_moved == 0, "the extent is there: nothing moves"
        big = client.allocate("small", size_bytes=4 * MiB)
        assert big.handle.byte_offset == 0
        big.release()
        for cache in kept:
            cache.release()
