"""The seed's text dumps of a paged pool (``dumpBlockMap``, ``dumpCacheStats``) from a
``BlockMap`` reply; ``PagedPool`` and ``kvbroker blocks`` print them."""

from __future__ import annotations

from kvbroker.v1 import broker_pb2 as pb

__all__ = ["format_block_map", "format_cache_stats"]


def format_block_map(response: pb.BlockMapResponse, width: int = 64) -> str:
    """The seed's block map: header figures, then ``X``/``.`` lines of ``width`` blocks."""
    s = response.stats
    lines = ["KVBlockAllocator State:", f"  Total blocks: {s.num_blocks}",
             f"  Used: {s.blocks_used} Free: {s.blocks_free}", f"  Fragmentation: {s.fragmentation:.2f}",
             "  Block map (. = free, X = used):"]  # fmt: skip
    text = response.block_map
    lines += [f"    {text[i:i + width]}" for i in range(0, len(text), width)]
    return "\n".join(lines)


def format_cache_stats(pool: str, response: pb.BlockMapResponse) -> str:
    """The seed's ``dumpCacheStats`` for one pool (sizes in MiB, blocks as ``[start, +count]``)."""
    s, lay = response.stats, response.stats.layout
    mib = lay.bytes_per_block / 2**20
    lines = [f"=== KVCache Statistics (pool {pool}) ===", "Configuration:",
             f"  Layers: {lay.num_layers}, Heads: {lay.num_kv_heads}, HeadDim: {lay.head_dim}",
             f"  BlockSize: {lay.block_tokens}, TotalBlocks: {s.num_blocks}", "Allocation State:",
             f"  Allocated sequences: {s.sequences}", f"  Total allocated: {s.blocks_used * mib:.2f} MB",
             f"  Total free: {s.blocks_free * mib:.2f} MB", f"  Fragmentation: {s.fragmentation:.2f}",
             f"  Tokens used/reserved/free: {s.tokens_used}/{s.tokens_reserved}/{s.tokens_free}", "Sequences:"]  # fmt: skip
    for seq in response.sequences:
        blocks = ", ".join(f"[{r.first_block}, +{r.count}]" for r in seq.runs)
        pin = " pinned" if seq.pinned else ""
        lines.append(f"  {seq.sequence_id}: {seq.tokens_used}/{seq.tokens_reserved} tokens, blocks {blocks}{pin}")
    return "\n".join(lines)
