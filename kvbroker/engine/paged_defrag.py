"""Executing a paged pool's defragmentation: a core plan's block copies as byte moves.

``kvbroker.core.paged_defrag.plan_defragment`` says which block goes where, in a safe
order; here each block copy becomes one ``Move`` per layer and K/V half (the arena is
``(2, num_blocks, block_tokens, heads, head_dim)`` per layer, ``kvbroker.kvlayout``), in
plan order, so that the backend's ``SegmentMemory.copy`` (memmove semantics, moves applied
in order) reproduces the plan exactly. Cost: ``2 x layers`` moves of
``block_tokens x heads x head_dim x itemsize`` bytes per block copy; the copy runs in a
worker thread (``PagedPools.defragment``).
"""

from __future__ import annotations

from collections.abc import Sequence

from kvbroker.core import Extent, Move
from kvbroker.core.paged_defrag import BlockCopy
from kvbroker.kvlayout import KvLayout


def block_moves(layout: KvLayout, num_blocks: int, arena: Extent, arena_id: str,
                copies: Sequence[BlockCopy]) -> list[Move]:  # fmt: skip
    """The byte moves of ``copies`` over an arena at ``arena`` (one extent)."""
    layer_bytes = layout.layer_bytes(num_blocks)
    half = layer_bytes // 2
    block = half // num_blocks
    moves = []
    for copy in copies:
        for layer in range(layout.num_layers):
            for kv in (0, 1):
                base = arena.offset + layer * layer_bytes + kv * half
                moves.append(Move(
                    arena_id, Extent(arena.segment_id, base + copy.source * block, block),
                    Extent(arena.segment_id, base + copy.destination * block, block),
                ))  # fmt: skip
    return moves
