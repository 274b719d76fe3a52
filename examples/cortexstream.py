"""The cortexstream KV-cache guide's use cases (seeds/003), on a broker-owned paged pool.

The guide's ``KVCache`` lived inside one engine process; here the broker owns the arena
(pool ``llama`` of ``deploy/kvbroker.paged.toml``) and any number of engine processes
map it. Run a daemon with that configuration, then this worker:

    kvbroker serve --config deploy/kvbroker.paged.toml --devices host
    python examples/cortexstream.py [TARGET]     # default: $KVBROKER_TARGET, else 127.0.0.1:50051

The guide's calls, and what they are here:

    KVCache(layers, heads, headDim, maxTotalTokens, blockSize)  -> [pools.kv] in the config
    cache.warmup()                        -> client.paged_pool("llama", populate=True)
    cache.allocateFor(id, promptLength[, maxTokens])  -> pool.allocate_for(id, prompt, max_tokens)
    cache.getKView(id, layer) / getVView  -> pool.k_view(id, layer) / pool.v_view(id, layer)
    cache.appendToken(id)                 -> pool.append_token(id) -> Slot(block_id, offset, slot)
    cache.freeFor(id)                     -> pool.free_for(id) (a second call is a no-op)
    getTotalAllocated/Free, getFragmentation, isFull  -> pool.stats()
    dumpCacheStats / dumpBlockMap         -> pool.dump_cache_stats() / pool.dump_block_map()
    the three OOM strategies              -> allocate_for(..., on_oom="reject" | "reduce" | "wait")
"""

from __future__ import annotations

import sys
import threading

import torch

from kvbroker_client import BrokerClient, OutOfTokens


def prefill(pool, seq: str, prompt: int) -> None:
    """Write the prompt's K and V for every layer through the sequence's views (the
    prefill forward pass): zero-copy, the sequence's blocks are one run."""
    lay = pool.layout
    for layer in range(lay.num_layers):
        k, v = pool.k_view(seq, layer), pool.v_view(seq, layer)  # (tokens, heads, head_dim)
        assert k.shape == (prompt, lay.num_kv_heads, lay.head_dim) and pool.is_contiguous(seq)
        k.copy_(torch.full_like(k, 1.0 + layer))
        v.copy_(torch.full_like(v, -1.0 - layer))


def decode(pool, seq: str, steps: int) -> None:
    """The decode loop: each new token's K and V go to the slot append_token returns
    (no RPC while the sequence's granted blocks have room)."""
    lay = pool.layout
    flats = [pool.layer(i).view(2, -1, lay.num_kv_heads, lay.head_dim) for i in range(lay.num_layers)]
    for _ in range(steps):
        where = pool.append_token(seq)
        for layer, flat in enumerate(flats):
            flat[0, where.slot] = 1.0 + layer
            flat[1, where.slot] = -1.0 - layer


def main(target: str | None) -> None:
    with BrokerClient(target) as client:
        # 1. Initialize: the daemon made the arena; map it once, populated (the guide's warmup()).
        pool = client.paged_pool("llama", populate=True)
        lay = pool.layout
        print(f"arena: {lay.num_layers} layers, {lay.num_kv_heads} heads, head_dim {lay.head_dim}, "
              f"{pool.num_blocks} blocks of {lay.block_tokens} tokens, {lay.bytes_per_token} bytes a token, "
              f"populated in {pool.populate_seconds * 1000:.1f} ms")
        # Memory calculation: the guide's arithmetic, on the pool's layout.
        print(f"memory: 4096 tokens = {lay.blocks_for(4096)} blocks = {lay.bytes_for(4096) / 2**20:.0f} MiB; "
              f"layer tensor {tuple(pool.layer(0).shape)}")

        # 2. Allocate for a sequence (prefill), 3. views, 4. append tokens (decode).
        pool.allocate_for("user_123", 100, max_tokens=600)
        prefill(pool, "user_123", 100)
        decode(pool, "user_123", 60)
        k = pool.k_view("user_123", 2)
        print(f"user_123: {pool.tokens_used('user_123')} tokens, K of layer 2 {tuple(k.shape)}, "
              f"all {float(k[0, 0, 0])}: {bool((k == 3.0).all())}, block table {pool.block_table('user_123')[:3]}...")
        print(f"RPCs so far: {pool.rpc_count} (open, allocate, grants) for 160 tokens")

        # Monitoring: statistics, the guide's dumpCacheStats and dumpBlockMap.
        pool.allocate_for("req_002", 300)
        stats = pool.stats()
        print(f"KV Cache: {stats['sequences']} seqs, {stats['total_allocated_bytes'] >> 20}/"
              f"{(stats['total_allocated_bytes'] + stats['total_free_bytes']) >> 20} MB, "
              f"frag={stats['fragmentation']:.2f}, full={stats['is_full']}")
        print(pool.dump_cache_stats())
        print(pool.dump_block_map())

        # OOM strategy 1: reject (a typed error with the tokens asked for and free).
        try:
            pool.allocate_for("too_big", 4000)
        except OutOfTokens as err:
            print(f"reject: {err.tokens_requested} tokens requested, {err.tokens_free} free")
        # OOM strategy 2: reduce max_tokens to what fits (reserved up front, whole).
        granted = pool.allocate_for("reduced", 200, max_tokens=8000, on_oom="reduce")
        print(f"reduce: max_tokens 8000 -> {granted}")
        # OOM strategy 3: wait (with a timeout) for another sequence to finish.
        done = threading.Timer(0.2, pool.free_for, ("reduced",))  # another request completes
        done.start()
        pool.allocate_for("waiting", 1000, on_oom="wait", timeout=30)
        done.join()
        print(f"wait: allocated once 'reduced' was freed ({pool.tokens_used('waiting')} tokens)")

        # 5. Cleanup: free (a second free is a no-op).
        for seq in ("user_123", "req_002", "waiting"):
            assert pool.free_for(seq) is True
        print(f"free twice: {pool.free_for('user_123')}; blocks used now {pool.stats()['blocks_used']}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
