"""A pool's paged KV layout as configured: the ``kv`` table of a ``[[pools]]`` entry.

    [[pools]]
    name = "llama"
    [pools.kv]
    num_layers = 32
    num_kv_heads = 32
    head_dim = 64
    dtype = "float16"
    block_tokens = 16        # tokens per block (default 16)
    max_tokens = 32768       # the arena's budget in tokens; else the pool's max_bytes
    prefault = true          # touch every page of the arena when the daemon creates it

Parsing only (``kvbroker.config`` calls ``parse_kv``); the arithmetic is
``kvbroker.kvlayout``'s, the one the client and ``kvbroker calc`` use. Every problem is
returned under its key (``pools[0].kv.head_dim``), so one failed start lists them all.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kvbroker.kvlayout import DEFAULT_BLOCK_TOKENS, KvLayout
from kvbroker.wire import DTYPE_BY_NAME

_INT_KEYS = ("num_layers", "num_kv_heads", "head_dim", "block_tokens", "max_tokens")
KV_KEYS = (*_INT_KEYS, "dtype", "prefault")
#: No arena holds more blocks than this (a block map line per 64: 16 384 lines).
MAX_BLOCKS = 1 << 20


@dataclass(frozen=True, slots=True)
class KvPoolConfig:
    """A paged pool: its layout, its budget in tokens (None: the pool's bytes decide) and
    whether the daemon prefaults the arena at creation."""

    layout: KvLayout
    max_tokens: int | None = None
    prefault: bool = True

    def arena_blocks(self, max_bytes: int | None, min_bytes: int) -> int:
        """Blocks of the arena: ``max_tokens``' blocks, else the pool's ``max_bytes``
        (or ``min_bytes``) in whole blocks."""
        if self.max_tokens is not None:
            return self.layout.blocks_for(self.max_tokens)
        return self.layout.blocks_in(max_bytes if max_bytes is not None else min_bytes)


    def arena_segment_bytes(self, pool: dict[str, Any], default_block_bytes: int) -> int:
        """The pool's segment size when the file gives none: the arena, in whole pool
        blocks, so that the arena takes one segment of its own size (not the default
        256 MiB, which would take that much of the device for a small arena)."""
        block = pool.get("block_bytes", default_block_bytes)
        arena = self.arena_blocks(pool.get("max_bytes"), pool.get("min_bytes", 0)) * self.layout.bytes_per_block
        return -(-arena // block) * block


def parse_kv(where: str, table: Any, *, max_bytes: int | None, min_bytes: int) -> tuple[KvPoolConfig | None, list[tuple[str, str]]]:
    """The ``kv`` table of pool ``where`` (``pools[i]``), or None and its problems."""
    key = f"{where}.kv"
    if not isinstance(table, dict):
        return None, [(key, "expected a table (num_layers, num_kv_heads, head_dim, dtype, block_tokens, max_tokens)")]
    problems: list[tuple[str, str]] = []
    for name in table:
        if name not in KV_KEYS:
            problems.append((f"{key}.{name}", f"unknown key (known: {', '.join(sorted(KV_KEYS))})"))
    for name in ("num_layers", "num_kv_heads", "head_dim"):
        if name not in table:
            problems.append((f"{key}.{name}", "is required"))
    for name in _INT_KEYS:
        value = table.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
            problems.append((f"{key}.{name}", f"must be a positive integer, got {value!r}"))
    dtype = table.get("dtype", "float16")
    if dtype not in DTYPE_BY_NAME:
        problems.append((f"{key}.dtype", f"{dtype!r} is not one of {', '.join(sorted(DTYPE_BY_NAME))}"))
    prefault = table.get("prefault", True)
    if not isinstance(prefault, bool):
        problems.append((f"{key}.prefault", f"expected true or false, got {prefault!r}"))
    if problems:
        return None, problems
    layout = KvLayout(table["num_layers"], table["num_kv_heads"], table["head_dim"], dtype,
                      table.get("block_tokens", DEFAULT_BLOCK_TOKENS))  # fmt: skip
    kv = KvPoolConfig(layout, table.get("max_tokens"), prefault)
    if kv.max_tokens is None and max_bytes is None and not min_bytes:
        return None, [(f"{key}.max_tokens", "a paged pool needs a budget: max_tokens here, or the pool's max_bytes")]
    blocks = kv.arena_blocks(max_bytes, min_bytes)
    if blocks < 1:
        budget = max_bytes if max_bytes is not None else min_bytes
        return None, [(f"{where}.max_bytes", f"{budget} bytes hold no block of {layout.bytes_per_block} bytes")]
    if blocks > MAX_BLOCKS:
        return None, [(f"{key}.max_tokens", f"{blocks} blocks is more than {MAX_BLOCKS}: use larger block_tokens")]
    if max_bytes is not None and blocks * layout.bytes_per_block > max_bytes:
        arena = blocks * layout.bytes_per_block
        return None, [(f"{key}.max_tokens", f"the arena ({arena} bytes) is more than the pool's max_bytes ({max_bytes})")]
    return kv, []
